"""VideoDiT: parity with diffusers' WanTransformer3DModel, checkpoint layouts, masking, input checks."""

import dataclasses
import json
import math

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import save_file

from vidlatent.checkpoint import CheckpointMismatchError, load_into
from vidlatent.config import DiTConfig, load_config
from vidlatent.models.dit import (
    VideoDiT,
    detect_layout,
    from_diffusers_state_dict,
    from_wan_state_dict,
    infer_config,
    to_diffusers_config,
    to_diffusers_state_dict,
    to_wan_state_dict,
)
from vidlatent.models.layers import apply_rope, rope_3d

# diffusers' own init leaves gates, norms and tables at values where the blocks barely touch the output,
# so a parity test over them could pass with a broken block. Unit-gain random weights make every part count
# (checked: dropping rope or nudging one modulation shift by 0.01 moves the output by >= 1e-2).


def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                value = 1 + 0.2 * torch.randn(p.shape, generator=g)
            elif p.ndim >= 2 and "scale_shift" not in name and "modulation" not in name:
                value = torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel())
            else:
                value = 0.5 * torch.randn(p.shape, generator=g)
            p.copy_(value)


def pair(cfg: DiTConfig, seed: int = 0):
    """diffusers' model with random weights, and ours holding the same weights under our names."""
    ref = WanTransformer3DModel(**to_diffusers_config(cfg)).eval()
    randomize(ref, seed)
    with torch.device("meta"):
        ours = VideoDiT(cfg)
    load_into(ours, from_diffusers_state_dict(ref.state_dict()))
    return ours.eval(), ref


def inputs(cfg: DiTConfig, batch=2, t=3, h=8, w=12, text=12, pad=0, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, t, h, w, generator=g)
    sigma = torch.rand(batch, generator=g)
    context = torch.randn(batch, text + pad, cfg.text_dim, generator=g)
    context[:, text:] = 0  # Wan zero-pads prompts to its text length
    return x, sigma, context


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.std()).item()


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_config(DiTConfig, "dit", "tiny")


@pytest.fixture(scope="module")
def tiny_pair(tiny_cfg):
    return pair(tiny_cfg)


def test_parity_tiny(tiny_cfg, tiny_pair):
    ours, ref = tiny_pair
    x, sigma, context = inputs(tiny_cfg, pad=4)
    with torch.no_grad():
        out = ours(x, sigma, context)
        expected = ref(x, 1000 * sigma, context).sample
    assert out.shape == x.shape[:1] + (tiny_cfg.out_channels,) + x.shape[2:]
    assert max_rel_diff(out, expected) <= 1e-4


def test_parity_at_real_1_3b_widths_two_layers():
    cfg = dataclasses.replace(load_config(DiTConfig, "dit", "wan2.1-t2v-1.3b"), num_layers=2)
    ours, ref = pair(cfg, seed=5)
    x, sigma, context = inputs(cfg, batch=2, t=5, h=8, w=12, text=20, pad=44)
    sigma[1] = 1.0  # pure noise
    with torch.no_grad():
        out = ours(x, sigma, context)
        expected = ref(x, 1000 * sigma, context).sample
    diff = max_rel_diff(out, expected)
    print(f"1.3B-width parity: max |ours - diffusers| / std = {diff:.2e}")
    assert diff <= 1e-4


def test_image_t1_and_odd_grids_match_diffusers(tiny_cfg, tiny_pair):
    ours, ref = tiny_pair
    for t, h, w in ((1, 6, 10), (2, 14, 4)):
        x, sigma, context = inputs(tiny_cfg, t=t, h=h, w=w)
        with torch.no_grad():
            assert max_rel_diff(ours(x, sigma, context), ref(x, 1000 * sigma, context).sample) <= 1e-4


def test_padding_tokens_masked_out_change_nothing(tiny_cfg, tiny_pair):
    ours, _ = tiny_pair
    x, sigma, context = inputs(tiny_cfg, text=7)
    lengths = [7, 4]  # sample 1 has 4 real tokens
    with torch.no_grad():
        alone = [ours(x[i : i + 1], sigma[i : i + 1], context[i : i + 1, : lengths[i]]) for i in range(2)]
        junk = torch.randn(2, 9, tiny_cfg.text_dim) * 10  # padding that is anything but zero
        padded = torch.cat([context, junk], dim=1)
        mask = torch.zeros(padded.shape[:2], dtype=torch.bool)
        for i, n in enumerate(lengths):
            mask[i, :n] = True
        batched = ours(x, sigma, padded, mask)
        unmasked = ours(x, sigma, padded)
    for i in range(2):
        torch.testing.assert_close(batched[i : i + 1], alone[i], rtol=0, atol=1e-5)
    assert (unmasked - batched).abs().max() > 1e-2  # without the mask the junk does change the output


def test_all_true_mask_equals_no_mask_and_empty_rows_are_rejected(tiny_cfg, tiny_pair):
    ours, _ = tiny_pair
    x, sigma, context = inputs(tiny_cfg)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, sigma, context, torch.ones(context.shape[:2], dtype=torch.bool)),
                                   ours(x, sigma, context), rtol=0, atol=0)  # fmt: skip
        mask = torch.ones(context.shape[:2], dtype=torch.bool)
        mask[1] = False
        with pytest.raises(ValueError, match="no text token"):
            ours(x, sigma, context, mask)


def test_bad_inputs_are_rejected_with_what_is_accepted(tiny_cfg, tiny_pair):
    ours, _ = tiny_pair
    x, sigma, context = inputs(tiny_cfg)
    cases = [
        ((x[:, :, :, :7], sigma, context), r"h=7.*h of 2"),
        ((x[..., :11], sigma, context), r"w=11.*w of 2"),
        ((x[:, :3], sigma, context), r"has 3 channels; this model accepts 16"),
        ((x[0], sigma, context), r"\(b, c, t, h, w\).*got shape \(16, 3, 8, 12\)"),
        ((x, torch.rand(3), context), r"sigma must have shape \(2,\).*got \(3,\)"),
        ((x, sigma, context[..., :8]), r"text_dim=32.*got \(2, 12, 8\)"),
        (
            (x, sigma, context, torch.ones(2, 5, dtype=torch.bool)),
            r"context_mask must be \(b, m\) = \(2, 12\)",
        ),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            ours(*args)


def test_scalar_sigma_broadcasts_and_output_keeps_input_dtype(tiny_cfg, tiny_pair):
    ours, _ = tiny_pair
    x, _, context = inputs(tiny_cfg)
    with torch.no_grad():
        a = ours(x, 0.5, context)
        b = ours(x, torch.full((2,), 0.5), context)
        c = ours(x.double(), 0.5, context)
    assert torch.equal(a, b) and c.dtype == torch.float64


def test_diffusers_folder_round_trip_sharded(tmp_path, tiny_cfg, tiny_pair):
    ours, ref = tiny_pair
    ref.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="200KB")
    assert (tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = VideoDiT.from_pretrained(tmp_path / "pipe")  # a pipeline root finds transformer/
    assert loaded.config == dataclasses.replace(tiny_cfg, text_len=512)  # diffusers does not record text_len
    x, sigma, context = inputs(tiny_cfg)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, sigma, context), ours(x, sigma, context), rtol=0, atol=0)


def test_vidlatent_folder_round_trip_and_dtype(tmp_path, tiny_cfg, tiny_pair):
    ours, _ = tiny_pair
    ours.save_pretrained(tmp_path / "dit")
    loaded = VideoDiT.from_pretrained(tmp_path / "dit")
    for (name, a), (_, b) in zip(ours.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    half = VideoDiT.from_pretrained(tmp_path / "dit", dtype=torch.bfloat16)
    assert half.blocks[0].mlp.fc1.weight.dtype == torch.bfloat16
    assert (
        half.blocks[0].modulation.dtype == torch.float32 and half.time_embed.fc1.weight.dtype == torch.float32
    )
    x, sigma, context = inputs(tiny_cfg)
    with torch.no_grad():
        out, expected = half(x, sigma, context), ours(x, sigma, context)
    assert out.dtype == torch.float32 and max_rel_diff(out, expected) < 0.1  # bf16 has ~3 significant digits


def test_original_wan_layout_matches_diffusers_converter(tiny_cfg, tiny_pair):
    ours, ref = tiny_pair
    wan = to_wan_state_dict(ours.state_dict())
    assert (
        "blocks.0.self_attn.q.weight" in wan
        and "head.modulation" in wan
        and "time_projection.1.weight" in wan
    )
    assert detect_layout(wan) == "wan"
    # diffusers' own converter for original Wan checkpoints must accept our export exactly
    converted = convert_wan_transformer_to_diffusers({k: v.clone() for k, v in wan.items()})
    assert set(converted) == set(ref.state_dict())
    for key, value in converted.items():
        assert torch.equal(value, ref.state_dict()[key]), key
    assert from_wan_state_dict(wan).keys() == ours.state_dict().keys()
    assert to_diffusers_state_dict(ours.state_dict()).keys() == ref.state_dict().keys()


def test_original_wan_file_with_inferred_config(tmp_path):
    cfg = DiTConfig(dim=256, ffn_dim=96, freq_dim=32, text_dim=48, num_heads=2, num_layers=2)  # head dim 128
    model = VideoDiT(cfg)
    randomize(model, 3)
    wan = {"model.diffusion_model." + k: v for k, v in to_wan_state_dict(model.state_dict()).items()}
    save_file(wan, tmp_path / "wan.safetensors")
    torch.save({k.removeprefix("model.diffusion_model."): v for k, v in wan.items()}, tmp_path / "wan.pth")
    x, sigma, context = inputs(cfg, batch=1)
    with torch.no_grad():
        expected = model(x, sigma, context)
        for name in ("wan.safetensors", "wan.pth"):
            loaded = VideoDiT.from_pretrained(tmp_path / name)
            assert loaded.config == cfg
            torch.testing.assert_close(loaded(x, sigma, context), expected, rtol=0, atol=0)


def test_infer_config_at_1_3b_widths_on_meta():
    cfg = dataclasses.replace(load_config(DiTConfig, "dit", "wan2.1-t2v-1.3b"), num_layers=3)
    with torch.device("meta"):
        state = VideoDiT(cfg).state_dict()
    assert infer_config(state) == cfg
    assert infer_config(from_wan_state_dict(to_wan_state_dict(state))) == cfg


def test_mismatched_checkpoint_lists_keys(tmp_path, tiny_cfg, tiny_pair):
    ours, _ = tiny_pair
    state = dict(ours.state_dict())
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.0.extra.weight"] = torch.zeros(3)
    state["head.proj.weight"] = torch.zeros(5, tiny_cfg.dim)
    ours.save_pretrained(tmp_path / "ok")
    save_file(state, tmp_path / "ok" / "model.safetensors")
    with pytest.raises(CheckpointMismatchError) as err:
        VideoDiT.from_pretrained(tmp_path / "ok")
    text = str(err.value)
    assert "missing (1): blocks.1.mlp.fc2.bias" in text
    assert "unexpected (1): blocks.0.extra.weight" in text
    assert "head.proj.weight: checkpoint (5, 64) vs model (64, 64)" in text


def test_presets_and_unknown_source():
    assert VideoDiT.from_pretrained("tiny").config.num_layers == 2
    for name, layers, dim, heads in (("wan2.1-t2v-1.3b", 30, 1536, 12), ("wan2.1-t2v-14b", 40, 5120, 40)):
        cfg = load_config(DiTConfig, "dit", name)
        assert (cfg.num_layers, cfg.dim, cfg.num_heads, cfg.dim // cfg.num_heads) == (layers, dim, heads, 128)
    with torch.device("meta"):
        n = sum(p.numel() for p in VideoDiT(load_config(DiTConfig, "dit", "wan2.1-t2v-1.3b")).parameters())
    assert 1.40e9 < n < 1.43e9  # Wan 2.1 T2V-1.3B has 1.42 B parameters
    with pytest.raises(FileNotFoundError, match="nor a dit preset"):
        VideoDiT.from_pretrained("no-such-model")


def test_fresh_model_outputs_zero_and_blocks_start_as_identity(tiny_cfg):
    model = VideoDiT(tiny_cfg)
    x, sigma, context = inputs(tiny_cfg)
    with torch.no_grad():
        assert torch.equal(model(x, sigma, context), torch.zeros_like(x))
        tokens = torch.randn(2, 10, tiny_cfg.dim)
        mod = torch.zeros(2, 6, tiny_cfg.dim)
        rope = rope_3d((1, 2, 5), tiny_cfg.dim // tiny_cfg.num_heads)
        text = torch.randn(2, 4, tiny_cfg.dim)
        out = model.blocks[0](tokens, text, mod, rope, None)
    # the cross-attention residual has no gate in Wan; the gated attention and feed-forward add nothing
    cross = model.blocks[0].cross_attn(model.blocks[0].cross_norm(tokens), context=text)
    torch.testing.assert_close(out, tokens + cross)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_cfg, tiny_pair):
    ours, _ = tiny_pair
    x, sigma, context = inputs(tiny_cfg)
    grads = []
    for flag in (False, True):
        ours.zero_grad(set_to_none=True)
        ours.gradient_checkpointing = flag
        ours(x, sigma, context).square().mean().backward()
        grads.append([p.grad.clone() for p in ours.parameters()])
    ours.gradient_checkpointing = False
    ours.zero_grad(set_to_none=True)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_rope_rotates_pairs_by_position_and_compiled_path_agrees(monkeypatch):
    head_dim = 32  # time gets 12 channels (6 pairs), height and width 10 each (5 pairs)
    rope = rope_3d((3, 4, 5), head_dim)
    assert rope.shape == (60, 16, 2)
    x = torch.zeros(1, 60, 1, head_dim)
    x[..., 0] = 1.0  # the unit vector of the first time pair
    out = apply_rope(x, rope)
    token = 1 * 20 + 2 * 5 + 3  # (t, h, w) = (1, 2, 3)
    torch.testing.assert_close(
        out[0, token, 0, :2], torch.tensor([torch.cos(torch.tensor(1.0)), torch.sin(torch.tensor(1.0))])
    )
    # attention scores depend only on the offset between positions
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, head_dim, generator=g), torch.randn(1, 1, 1, head_dim, generator=g)
    rq, rk = apply_rope(q.expand(1, 60, 1, -1), rope), apply_rope(k.expand(1, 60, 1, -1), rope)
    score = lambda i, j: (rq[0, i, 0] * rk[0, j, 0]).sum()  # noqa: E731
    torch.testing.assert_close(
        score(0 * 20 + 1 * 5 + 1, 1 * 20 + 2 * 5 + 3), score(1 * 20 + 0 * 5 + 0, 2 * 20 + 1 * 5 + 2)
    )
    # the real-arithmetic path used under torch.compile computes the same rotation
    y = torch.randn(2, 60, 3, head_dim, generator=g)
    eager = apply_rope(y, rope)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(apply_rope(y, rope), eager, rtol=0, atol=1e-6)


def test_attention_kernels_agree_and_unknown_ones_are_rejected(tiny_cfg, tiny_pair):
    ours, _ = tiny_pair
    x, sigma, context = inputs(tiny_cfg)
    mask = torch.ones(context.shape[:2], dtype=torch.bool)
    mask[0, 5:] = False
    with torch.no_grad():
        default = ours(x, sigma, context, mask)
        ours.set_attention("math")
        try:
            torch.testing.assert_close(ours(x, sigma, context, mask), default, rtol=0, atol=1e-5)
        finally:
            ours.set_attention("sdpa")
    with pytest.raises(ValueError, match="available: sdpa, cudnn, flash, efficient, math"):
        ours.set_attention("xformers")
    with pytest.raises(ValueError, match="unknown attention"):
        VideoDiT(dataclasses.replace(tiny_cfg, attention="fast"))


def test_bf16_diffusers_folder_loads_in_bf16_by_default(tmp_path, tiny_pair):
    _, ref = tiny_pair
    # a bf16 diffusers checkpoint keeps a few small modules (time embedder, tables) in fp32
    state = {
        k: v if "scale_shift" in k or "time_embedder" in k else v.bfloat16()
        for k, v in ref.state_dict().items()
    }
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel", **ref.config}))
    loaded = VideoDiT.from_pretrained(tmp_path)
    assert loaded.blocks[0].mlp.fc1.weight.dtype == torch.bfloat16
    assert (
        loaded.blocks[0].modulation.dtype == torch.float32
        and loaded.time_embed.fc1.weight.dtype == torch.float32
    )
