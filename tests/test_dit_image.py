"""The image-conditioned VideoDiT (Wan 2.1 I2V / FLF2V): parity with diffusers, the three key layouts, configs
read from diffusers and original Wan folders, and the errors for inputs that do not fit the model."""

import dataclasses
import json

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import save_file
from test_dit import inputs, max_rel_diff, pair

from vidlatent.config import DiTConfig, load_config
from vidlatent.models.dit import (
    VideoDiT,
    config_from_diffusers,
    config_from_wan,
    detect_layout,
    from_wan_state_dict,
    infer_config,
    to_diffusers_config,
    to_wan_state_dict,
)


def image_cfg(base: str = "tiny", flf: bool = False, **changes) -> DiTConfig:
    """An I2V (or FLF2V) config: 36 = 16 noise + 4 mask + 16 image-latent channels in, 16 out."""
    cfg = load_config(DiTConfig, "dit", base)
    tokens = changes.pop("tokens", 5)
    image = dict(
        in_channels=36, image_dim=changes.pop("image_dim", 24), image_pos_len=2 * tokens if flf else None
    )
    return dataclasses.replace(cfg, **image, **changes)


def image_pair(cfg: DiTConfig, seed: int = 0):
    """``pair`` with a position embedding that matters (the generic randomizer makes it ~1e-3)."""
    ours, ref = pair(cfg, seed)
    if cfg.image_pos_len:
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            ref.condition_embedder.image_embedder.pos_embed.normal_(generator=g)
            ours.image_embed.pos.copy_(ref.condition_embedder.image_embedder.pos_embed)
    return ours, ref


def image_inputs(cfg: DiTConfig, batch=2, tokens=5, seed=2, **kw):
    """Noisy latents, the condition channels, sigma, text and CLIP tokens (both frames' for FLF2V)."""
    x, sigma, context = inputs(dataclasses.replace(cfg, in_channels=cfg.out_channels), batch=batch, **kw)
    g = torch.Generator().manual_seed(seed)
    condition = torch.randn(batch, cfg.condition_channels, *x.shape[2:], generator=g)
    image = torch.randn(batch, cfg.image_pos_len or tokens, cfg.image_dim, generator=g)
    return x, condition, sigma, context, image


def reference(ref, x, condition, sigma, context, image, flf: bool):
    """diffusers' call: the 36 channels at once, and for FLF2V the two frames' tokens as two rows per sample
    (its image embedder joins them). It takes the image tokens back off the joined context as all but the last
    512 (Wan's text length), so ``context`` must be 512 tokens long."""
    assert context.shape[1] == 512
    if flf:
        image = image.reshape(-1, image.shape[1] // 2, image.shape[2])
    hidden = torch.cat([x, condition], dim=1)
    return ref(hidden, 1000 * sigma, context, encoder_hidden_states_image=image).sample


@pytest.fixture(scope="module", params=[False, True], ids=["i2v", "flf2v"])
def tiny(request):
    cfg = image_cfg(flf=request.param)
    return cfg, *image_pair(cfg), request.param


def test_parity_tiny(tiny):
    cfg, ours, ref, flf = tiny
    x, condition, sigma, context, image = image_inputs(cfg, pad=500)
    with torch.no_grad():
        out = ours(x, sigma, context, image=image, condition=condition)
        expected = reference(ref, x, condition, sigma, context, image, flf)
        without_image = ours(x, sigma, context, image=torch.zeros_like(image), condition=condition)
    assert out.shape == x.shape
    assert max_rel_diff(out, expected) <= 1e-4
    assert (out - without_image).abs().max() > 1e-2  # the image tokens do take part


@pytest.mark.slow  # measured over ~4 s on 2 idle cores; run by .ci/run in its slow step
@pytest.mark.parametrize("flf", [False, True], ids=["i2v", "flf2v"])
def test_parity_at_real_widths_two_layers(flf):
    # Wan 2.1 I2V/FLF2V are 14B models; the 1.3B widths with 2 layers, CLIP's real width and token count keep
    # the test in seconds while every tensor has a real model's shapes except the depth and the width
    cfg = image_cfg("wan2.1-t2v-1.3b", flf=flf, num_layers=2, image_dim=1280, tokens=257)
    ours, ref = image_pair(cfg, seed=7)
    x, condition, sigma, context, image = image_inputs(
        cfg, batch=1, tokens=257, t=3, h=8, w=12, text=20, pad=492
    )
    with torch.no_grad():
        out = ours(x, sigma, context, image=image, condition=condition)
        expected = reference(ref, x, condition, sigma, context, image, flf)
    diff = max_rel_diff(out, expected)
    print(f"{'FLF2V' if flf else 'I2V'} 1.3B-width parity: max |ours - diffusers| / std = {diff:.2e}")
    assert diff <= 1e-4


def test_diffusers_folder_round_trip(tmp_path, tiny):
    cfg, ours, ref, flf = tiny
    ref.save_pretrained(tmp_path / "transformer")
    loaded = VideoDiT.from_pretrained(tmp_path / "transformer")
    assert loaded.config == dataclasses.replace(cfg, text_len=512)  # diffusers does not record text_len
    x, condition, sigma, context, image = image_inputs(cfg)
    with torch.no_grad():
        a = loaded(x, sigma, context, image=image, condition=condition)
        b = ours(x, sigma, context, image=image, condition=condition)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert to_diffusers_config(loaded.config)["added_kv_proj_dim"] == cfg.dim


def test_original_wan_layout_matches_diffusers_converter(tiny):
    cfg, ours, ref, flf = tiny
    wan = to_wan_state_dict(ours.state_dict())
    # the names of Wan 2.1's wan/modules/model.py: MLPProj img_emb.proj.{0,1,3,4} (+ emb_pos for flf2v), and
    # WanI2VCrossAttention's k_img, v_img, norm_k_img
    assert {
        "img_emb.proj.0.weight",
        "img_emb.proj.1.weight",
        "img_emb.proj.3.bias",
        "img_emb.proj.4.bias",
    } <= set(wan)
    assert {f"blocks.1.cross_attn.{n}.weight" for n in ("k_img", "v_img", "norm_k_img")} <= set(wan)
    assert ("img_emb.emb_pos" in wan) == flf
    assert detect_layout(wan) == "wan"
    # diffusers' converter for original checkpoints gives the diffusers model's keys and tensors; it leaves
    # emb_pos unrenamed (diffusers' own conversion script maps it to image_embedder.pos_embed, as we do)
    converted = convert_wan_transformer_to_diffusers({k: v.clone() for k, v in wan.items()})
    expected = ref.state_dict()
    if flf:
        assert torch.equal(
            converted.pop("img_emb.emb_pos"), expected.pop("condition_embedder.image_embedder.pos_embed")
        )
    assert set(converted) == set(expected)
    for key, value in converted.items():
        assert torch.equal(value, expected[key]), key
    assert from_wan_state_dict(wan).keys() == ours.state_dict().keys()


def test_original_wan_folder_and_inferred_config(tmp_path, tiny):
    cfg, ours, _, flf = tiny
    folder = tmp_path / "Wan2.1-tiny"
    folder.mkdir()
    wan_config = dict(model_type="flf2v" if flf else "i2v", in_dim=36, out_dim=16, dim=cfg.dim, ffn_dim=cfg.ffn_dim,
                      freq_dim=cfg.freq_dim, text_dim=cfg.text_dim, text_len=cfg.text_len, num_heads=cfg.num_heads,
                      num_layers=cfg.num_layers, patch_size=[1, 2, 2], eps=cfg.eps)  # fmt: skip
    (folder / "config.json").write_text(json.dumps(wan_config))
    save_file(to_wan_state_dict(ours.state_dict()), folder / "diffusion_pytorch_model.safetensors")
    # Wan hard-codes CLIP's 1280-wide tokens (and 2 x 257 of them for flf2v), so config.json alone is not
    # enough for this tiny model: the config read off the tensors is what fits
    assert config_from_wan(wan_config).image_dim == 1280
    assert config_from_wan(wan_config).image_pos_len == (514 if flf else None)
    state = from_wan_state_dict(to_wan_state_dict(ours.state_dict()))
    assert infer_config(state, num_heads=cfg.num_heads) == dataclasses.replace(cfg, text_len=512)
    loaded = VideoDiT.from_pretrained(folder, config=cfg)
    x, condition, sigma, context, image = image_inputs(cfg)
    with torch.no_grad():
        a = loaded(x, sigma, context, image=image, condition=condition)
        b = ours(x, sigma, context, image=image, condition=condition)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_14b_presets_and_original_configs_on_meta():
    for name, flf in (("wan2.1-i2v-14b", False), ("wan2.1-flf2v-14b", True)):
        cfg = load_config(DiTConfig, "dit", name)
        assert (cfg.in_channels, cfg.out_channels, cfg.dim, cfg.num_layers, cfg.image_dim) == (
            36,
            16,
            5120,
            40,
            1280,
        )
        assert cfg.image_pos_len == (514 if flf else None)
        wan = dict(model_type="flf2v" if flf else "i2v", in_dim=36, dim=5120, ffn_dim=13824, num_heads=40,
                   num_layers=40, out_dim=16, text_len=512)  # fmt: skip
        assert config_from_wan(wan) == cfg
        assert (
            config_from_diffusers({"_class_name": "WanTransformer3DModel", **to_diffusers_config(cfg)}) == cfg
        )
        with torch.device("meta"):
            state = VideoDiT(dataclasses.replace(cfg, num_layers=1)).state_dict()
        assert infer_config(state) == dataclasses.replace(cfg, num_layers=1)


def test_wrong_inputs_say_what_the_model_takes(tiny):
    cfg, ours, _, flf = tiny
    x, condition, sigma, context, image = image_inputs(cfg)
    n = "10" if flf else "i"
    cases = [
        (dict(condition=condition), rf"needs image=\(b=2, {n}, image_dim=24\) CLIP image tokens.*got none"),
        (dict(image=image[..., :8], condition=condition), r"image_dim=24.*got \(2, \d+, 8\)"),
        (dict(image=image), r"condition=\(b, 20, t, h, w\) = \(2, 20, 3, 8, 12\).*got none"),
        (dict(image=image, condition=condition[:, :4]), r"got \(2, 4, 3, 8, 12\)"),
    ]
    if flf:
        cases.append(
            (dict(image=image[:, :5], condition=condition), r"first frame's then the last.*got \(2, 5, 24\)")
        )
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            ours(x, sigma, context, **kwargs)
    with pytest.raises(ValueError, match="has 36 channels; this model accepts 16"):
        ours(torch.cat([x, condition], dim=1), sigma, context, image=image)


def test_text_to_video_model_refuses_image_inputs_and_configs_that_wan_has_not():
    t2v = VideoDiT(load_config(DiTConfig, "dit", "tiny"))
    x, sigma, context = inputs(t2v.config)
    with pytest.raises(
        ValueError, match=r"text-to-video denoiser.*takes no image tokens.*VideoPipeline.animate"
    ):
        t2v(x, sigma, context, image=torch.zeros(2, 5, 24))
    with pytest.raises(ValueError, match="takes no condition latents"):
        t2v(x, sigma, context, condition=torch.zeros(2, 20, *x.shape[2:]))
    base = {
        "_class_name": "WanTransformer3DModel",
        **to_diffusers_config(load_config(DiTConfig, "dit", "tiny")),
    }
    for bad in (dict(image_dim=24), dict(image_dim=24, added_kv_proj_dim=32), dict(added_kv_proj_dim=64)):
        with pytest.raises(ValueError, match=r"accepted: both unset \(text-to-video\) or image_dim with"):
            config_from_diffusers({**base, **bad})
    with pytest.raises(ValueError, match=r"model_type 'vace'; accepted: t2v, i2v, flf2v"):
        config_from_wan(dict(model_type="vace", dim=64, num_heads=2))
    with pytest.raises(ValueError, match="image_pos_len .* needs image_dim"):
        VideoDiT(dataclasses.replace(load_config(DiTConfig, "dit", "tiny"), image_pos_len=10))


@pytest.mark.slow  # measured over ~4 s on 2 idle cores; run by .ci/run in its slow step
def test_gradient_checkpointing_with_image_tokens(tiny):
    cfg, ours, _, _ = tiny
    x, condition, sigma, context, image = image_inputs(cfg)
    grads = []
    for flag in (False, True):
        ours.zero_grad(set_to_none=True)
        ours.gradient_checkpointing = flag
        ours(x, sigma, context, image=image, condition=condition).square().mean().backward()
        grads.append([p.grad.clone() for p in ours.parameters()])
    ours.gradient_checkpointing = False
    ours.zero_grad(set_to_none=True)
    assert all(g.abs().sum() > 0 for g in grads[0][:3])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
