"""Wan 2.2's denoisers: per-token noise levels (TI2V-5B) against diffusers' ``WanTransformer3DModel`` given a
timestep per token, and the 2.2 transformer configs (5B: 48 channels; I2V-A14B: condition latents, no CLIP)."""

import dataclasses

import pytest
import torch
from test_dit import inputs, max_rel_diff, pair

from vidlatent.config import DiTConfig, load_config
from vidlatent.models.dit import config_from_diffusers


@pytest.fixture(scope="module")
def cfg48():
    """The tiny denoiser at TI2V-5B's 48 latent channels."""
    return dataclasses.replace(load_config(DiTConfig, "dit", "tiny"), in_channels=48, out_channels=48)


@pytest.mark.parametrize("shape", [(3, 8, 12), (5, 4, 6), (1, 6, 4)])
def test_per_token_sigma_equals_diffusers(cfg48, shape):
    ours, ref = pair(cfg48, seed=3)
    t, h, w = shape
    x, _, context = inputs(cfg48, batch=2, t=t, h=h, w=w, seed=t)
    n = t * (h // 2) * (w // 2)
    g = torch.Generator().manual_seed(h)
    # a clean first frame (level 0) and noisy rest, as TI2V's animate; a different level in each sample
    sigma = torch.rand(2, 1, generator=g).expand(2, n).clone()
    sigma[:, : n // t] = 0.0
    with torch.no_grad():
        out = ours(x, sigma, context)
        expected = ref(x, 1000 * sigma, context).sample
        plain = ours(x, sigma[:, -1], context)
    assert max_rel_diff(out, expected) <= 1e-4
    if t > 1:  # the clean frame's level changes what the model says
        assert (out - plain).abs().max() > 1e-2


def test_one_level_per_token_equals_one_per_sample(cfg48):
    ours, _ = pair(cfg48, seed=4)
    x, sigma, context = inputs(cfg48, batch=2, t=3, h=4, w=8)
    n = 3 * 2 * 4
    with torch.no_grad():
        a = ours(x, sigma, context)
        b = ours(x, sigma[:, None].expand(2, n), context)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_per_token_sigma_of_the_wrong_length_is_refused(cfg48):
    ours, _ = pair(cfg48, seed=4)
    x, _, context = inputs(cfg48, batch=2, t=3, h=4, w=8)
    with pytest.raises(ValueError, match=r"sigma must have shape \(2,\) .* or \(2, 24\)"):
        ours(x, torch.zeros(2, 23), context)


def test_wan22_transformer_configs_load():
    """The config.json keys of diffusers' Wan 2.2 transformers (TI2V-5B, I2V-A14B) map onto DiTConfig."""
    ti2v = dict(_class_name="WanTransformer3DModel", added_kv_proj_dim=None, attention_head_dim=128,
                cross_attn_norm=True, eps=1e-6, ffn_dim=14336, freq_dim=256, image_dim=None, in_channels=48,
                num_attention_heads=24, num_layers=30, out_channels=48, patch_size=[1, 2, 2],
                pos_embed_seq_len=None, qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
                text_dim=4096)  # fmt: skip
    cfg = config_from_diffusers(ti2v)
    assert (cfg.in_channels, cfg.out_channels, cfg.dim, cfg.num_heads, cfg.condition_channels) == (48, 48, 3072,
                                                                                                     24, 0)  # fmt: skip
    i2v = {**ti2v, "in_channels": 36, "out_channels": 16, "num_attention_heads": 40, "ffn_dim": 13824}
    cfg = config_from_diffusers(i2v)
    assert (cfg.condition_channels, cfg.image_dim) == (20, None)
