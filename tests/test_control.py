"""The VACE control branch: parity with diffusers' WanVACETransformer3DModel, scale 0 and a fresh branch leave
the denoiser as it is, diffusers folders and original VACE names load, bad inputs name both shapes."""

import dataclasses
import json

import pytest
import torch
from diffusers import WanVACETransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import save_file
from test_dit import inputs, max_rel_diff, randomize

from vidlatent.checkpoint import load_into
from vidlatent.config import DiTConfig, control_config_for, load_config
from vidlatent.models.control import (
    ControlBranch,
    ControlledDiT,
    join_vace_state_dict,
    split_vace_state_dict,
)
from vidlatent.models.dit import VideoDiT, detect_layout, to_diffusers_config

TINY_LAYERS, SCALES = [0, 2], [0.7, 1.3]


def vace_pair(cfg: DiTConfig, layers, in_channels=96, seed=0):
    """diffusers' VACE model with random weights, and ours holding the same weights under our names."""
    ref = WanVACETransformer3DModel(
        **to_diffusers_config(cfg), vace_layers=layers, vace_in_channels=in_channels
    ).eval()
    randomize(ref, seed)
    dit_state, control_state = split_vace_state_dict(ref.state_dict())
    with torch.device("meta"):
        dit = VideoDiT(cfg)
        branch = ControlBranch(control_config_for(cfg, layers=layers, in_channels=in_channels))
    load_into(dit, dit_state), load_into(branch, control_state)
    return ControlledDiT(dit.eval(), branch.eval()), ref


def control_latents(x, channels=96, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape[0], channels, *x.shape[2:], generator=g)


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_config(DiTConfig, "dit", "tiny", overrides=["num_layers=3"])


@pytest.fixture(scope="module")
def tiny_vace(tiny_cfg):
    return vace_pair(tiny_cfg, TINY_LAYERS)


def reference(ref, x, sigma, context, control, scale):
    return ref(x, 1000 * sigma, context, control_hidden_states=control,
               control_hidden_states_scale=torch.tensor(scale)).sample  # fmt: skip


def test_parity_tiny_with_a_scale_list(tiny_cfg, tiny_vace):
    model, ref = tiny_vace
    x, sigma, context = inputs(tiny_cfg, pad=4)
    control = control_latents(x)
    with torch.no_grad():
        out = model(x, sigma, context, control=control, control_scale=SCALES)
        expected = reference(ref, x, sigma, context, control, SCALES)
        plain = model.dit(x, sigma, context)
    diff = max_rel_diff(out, expected)
    print(f"tiny VACE parity: max |ours - diffusers| / std = {diff:.2e}")
    assert diff <= 1e-4
    assert max_rel_diff(plain, expected) > 0.05  # the hints matter: the test can fail


def test_parity_at_real_1_3b_widths_two_layers():
    cfg = dataclasses.replace(load_config(DiTConfig, "dit", "wan2.1-t2v-1.3b"), num_layers=2)
    model, ref = vace_pair(cfg, [0, 1], seed=5)
    x, sigma, context = inputs(cfg, batch=1, t=3, h=8, w=8, text=20, pad=12)
    control = control_latents(x)
    with torch.no_grad():
        out = model(x, sigma, context, control=control, control_scale=[0.5, 1.5])
        expected = reference(ref, x, sigma, context, control, [0.5, 1.5])
    diff = max_rel_diff(out, expected)
    print(f"1.3B-width VACE parity: max |ours - diffusers| / std = {diff:.2e}")
    assert diff <= 1e-4


def test_scale_zero_is_the_plain_denoiser_exactly(tiny_cfg, tiny_vace):
    model, _ = tiny_vace
    x, sigma, context = inputs(tiny_cfg)
    with torch.no_grad():
        plain = model.dit(x, sigma, context)
        assert torch.equal(model(x, sigma, context, control=control_latents(x), control_scale=0.0), plain)
        per_sample = torch.tensor([[0.0, 0.0], [1.0, 1.0]])  # one scale per sample and hint
        mixed = model(x, sigma, context, control=control_latents(x), control_scale=per_sample)
    assert torch.equal(mixed[0], plain[0]) and not torch.allclose(mixed[1], plain[1])


def test_a_fresh_branch_leaves_the_denoiser_unchanged(tiny_cfg, tiny_vace):
    dit = tiny_vace[0].dit
    fresh = ControlledDiT(dit, ControlBranch(control_config_for(tiny_cfg, layers=TINY_LAYERS)))
    x, sigma, context = inputs(tiny_cfg)
    with torch.no_grad():
        assert torch.equal(fresh(x, sigma, context, control=control_latents(x), control_scale=3.0),
                           dit(x, sigma, context))  # fmt: skip


def test_diffusers_folder_loads(tmp_path, tiny_cfg, tiny_vace):
    model, ref = tiny_vace
    ref.save_pretrained(tmp_path / "transformer")
    loaded = ControlledDiT.from_pretrained(tmp_path)  # a pipeline root: its transformer/ is read
    assert loaded.control.config.layers == TINY_LAYERS and loaded.control.config.in_channels == 96
    assert loaded.dit.config == dataclasses.replace(tiny_cfg, text_len=512)
    x, sigma, context = inputs(tiny_cfg)
    with torch.no_grad():
        kw = dict(control=control_latents(x), control_scale=SCALES)
        # not bitwise: loaded weights sit at other memory alignments, and CPU kernels then round differently
        torch.testing.assert_close(
            loaded(x, sigma, context, **kw), model(x, sigma, context, **kw), rtol=0, atol=1e-5
        )


def test_original_vace_names_load(tmp_path, tiny_cfg, tiny_vace):
    """The original names are checked against diffusers' own converter for original Wan/VACE checkpoints
    (``convert_wan_transformer_to_diffusers``, which renames before_proj/after_proj to proj_in/proj_out)."""
    model, ref = tiny_vace
    original = join_vace_state_dict(model.dit.state_dict(), model.control.state_dict(), "wan")
    for key in ("vace_patch_embedding.weight", "vace_blocks.0.before_proj.weight", "vace_blocks.1.after_proj.bias",
                "vace_blocks.1.self_attn.q.weight", "vace_blocks.0.modulation", "blocks.2.ffn.0.weight"):  # fmt: skip
        assert key in original, key
    assert "vace_blocks.1.before_proj.weight" not in original  # block 0 alone takes the denoiser's tokens
    assert detect_layout(original) == "wan"
    converted = convert_wan_transformer_to_diffusers({k: v.clone() for k, v in original.items()})
    assert converted.keys() == ref.state_dict().keys()
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in converted.items())
    # an original checkpoint folder: its VaceWanModel config.json and keys under model.diffusion_model.
    folder = tmp_path / "Wan2.1-VACE-tiny"
    folder.mkdir()
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in original.items()},
              str(folder / "diffusion_pytorch_model.safetensors"))  # fmt: skip
    meta = dict(_class_name="VaceWanModel", model_type="vace", dim=64, ffn_dim=128, freq_dim=32, text_dim=32,
                num_heads=2, num_layers=3, in_dim=16, out_dim=16, vace_layers=TINY_LAYERS, vace_in_dim=96)  # fmt: skip
    (folder / "config.json").write_text(json.dumps(meta))
    loaded = ControlledDiT.from_pretrained(folder)
    x, sigma, context = inputs(tiny_cfg)
    with torch.no_grad():
        kw = dict(control=control_latents(x), control_scale=SCALES)
        # not bitwise: loaded weights sit at other memory alignments, and CPU kernels then round differently
        torch.testing.assert_close(
            loaded(x, sigma, context, **kw), model(x, sigma, context, **kw), rtol=0, atol=1e-5
        )


def test_hint_layers_are_read_off_the_shapes_without_a_config(tmp_path):
    cfg = load_config(DiTConfig, "dit", "tiny", overrides=["num_layers=4", "dim=128", "num_heads=1"])
    model, _ = vace_pair(cfg, [0, 2], in_channels=48)
    original = join_vace_state_dict(model.dit.state_dict(), model.control.state_dict(), "wan")
    save_file({k: v.contiguous() for k, v in original.items()}, str(tmp_path / "vace.safetensors"))
    loaded = ControlledDiT.from_pretrained(tmp_path / "vace.safetensors")
    assert (loaded.control.config.layers, loaded.control.config.in_channels) == ([0, 2], 48)


def test_bad_inputs_name_both_shapes(tiny_cfg, tiny_vace):
    model, _ = tiny_vace
    x, sigma, context = inputs(tiny_cfg, t=3)
    short = control_latents(x)[:, :, :2]
    with pytest.raises(
        ValueError, match=r"\(2, 96, 3, 8, 12\) to fit x \(2, 16, 3, 8, 12\); got \(2, 96, 2, 8, 12\)"
    ):
        model(x, sigma, context, control=short)
    with pytest.raises(ValueError, match=r"one per hint.*\(2, 2\); got shape \(3,\)"):
        model(x, sigma, context, control=control_latents(x), control_scale=[1.0, 1.0, 1.0])
    wide = control_config_for(dataclasses.replace(tiny_cfg, dim=128, num_heads=2, ffn_dim=256), layers=[0])
    with pytest.raises(
        ValueError, match=r"= \(128, 2, 256, \[1, 2, 2\], None\); this denoiser has \(64, 2, 128"
    ):
        ControlledDiT(model.dit, ControlBranch(wide))
    with pytest.raises(ValueError, match=r"after blocks \[0, 5\]; this denoiser has 3 blocks"):
        ControlledDiT(model.dit, ControlBranch(control_config_for(tiny_cfg, layers=[0, 5])))


def test_residuals_are_drawn_when_their_block_is_reached():
    """``VideoDiT``'s residuals from an iterator: each drawn at its block (none ahead of need past the next one),
    transformed as taken; a dict is read as given; a residual for a block already run is an error."""
    from vidlatent.models.dit import Residuals

    drawn = []

    def pairs():
        for layer in (0, 2, 3):
            drawn.append(layer)
            yield layer, torch.full((1,), float(layer))

    residuals = Residuals(pairs())
    residuals.transform = lambda v: v + 10
    assert drawn == [] and residuals.take(0).item() == 10 and drawn == [0]
    assert residuals.take(1) is None and drawn == [0, 2]  # the next one is drawn, kept for block 2
    assert residuals.take(2).item() == 12 and drawn == [0, 2]
    assert residuals.take(3).item() == 13 and residuals.take(4) is None
    assert Residuals({1: torch.ones(1)}).take(1).item() == 1 and Residuals({}).take(0) is None
    late = Residuals(iter([(1, torch.ones(1))]))
    with pytest.raises(RuntimeError, match="the residual for block 1 was drawn after block 2 ran"):
        late.take(2)
