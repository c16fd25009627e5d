"""CausalVAE: parity with diffusers' AutoencoderKLWan, checkpoint layouts, causality, streaming, tiling, errors."""

import math
from dataclasses import replace

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors.torch import save_file

from vidlatent import CausalVAE, StreamCache
from vidlatent.checkpoint import CheckpointMismatchError
from vidlatent.models.vae import (
    diffusers_key_map,
    export_state_dict,
    vae_config_to_diffusers,
    wan_key_map,
)

TOL = 1e-4


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (norm gains and biases included), scaled so activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def make_pair(preset: str):
    vae = randomize(CausalVAE.from_pretrained(preset))
    ref = AutoencoderKLWan(**vae_config_to_diffusers(vae.config)).eval()
    ref.load_state_dict(export_state_dict(vae, diffusers_key_map(vae), like=ref.state_dict()), strict=True)
    return vae, ref


def video(t=9, h=32, w=48, seed=1):
    """A smooth random clip in [-1, 1] (low-frequency noise, like natural video)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 3, t, max(h // 8, 1), max(w // 8, 1), generator=gen)
    up = torch.nn.functional.interpolate(base, size=(t, h, w), mode="trilinear", align_corners=False)
    return torch.tanh(up + 0.1 * torch.randn(1, 3, t, h, w, generator=gen))


def maxdiff(a, b):
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def tiny_pair():
    return make_pair("tiny")


def check_parity(vae, ref, x):
    with torch.no_grad():
        post = vae.encode(x)
        ref_post = ref.encode(x).latent_dist
        assert post.mean.shape == (
            1,
            vae.config.latent_channels,
            1 + (x.shape[2] - 1) // 4,
            x.shape[3] // 8,
            x.shape[4] // 8,
        )
        assert maxdiff(post.mean, ref_post.mean) <= TOL
        assert maxdiff(post.logvar, ref_post.logvar) <= TOL
        z = post.mean
        # unclamped decoder output, then the public (clamped) decode
        cache = StreamCache()
        ours_raw = torch.cat(
            [vae.decode_step(z[:, :, i : i + 1], cache)[0] for i in range(z.shape[2])], dim=2
        )
        ref.clear_cache()
        zz = ref.post_quant_conv(z)
        ref_raw = torch.cat(
            [
                ref.decoder(zz[:, :, i : i + 1], feat_cache=ref._feat_map, feat_idx=[0], first_chunk=i == 0)
                for i in range(z.shape[2])
            ],
            dim=2,
        )
        assert 0.05 < ref_raw.abs().mean() < 5, "decoder output should be O(1) for a meaningful comparison"
        assert maxdiff(ours_raw, ref_raw) <= TOL
        out, ref_out = vae.decode(z), ref.decode(z).sample
        assert out.shape == x.shape
        assert maxdiff(out, ref_out) <= TOL


def test_parity_tiny(tiny_pair):
    check_parity(*tiny_pair, video())


def test_parity_image_tiny(tiny_pair):
    check_parity(*tiny_pair, video(t=1, h=16, w=24))


@pytest.mark.slow
def test_parity_wan21_full_config():
    vae, ref = make_pair("wan2.1")
    assert abs(sum(p.numel() for p in vae.parameters()) / 1e6 - 126.9) < 0.05
    check_parity(vae, ref, video(t=9, h=32, w=48))


@pytest.mark.slow
def test_diffusers_folder_round_trip(tmp_path, tiny_pair):
    vae, ref = tiny_pair
    ref.save_pretrained(tmp_path / "diffusers_vae")
    loaded = CausalVAE.from_pretrained(tmp_path / "diffusers_vae")
    runtime = {"chunk_size", "tile_size", "tile_overlap", "auto_tile_above"}  # not part of a diffusers config
    for name, value in vars(vae.config).items():
        assert name in runtime or getattr(loaded.config, name) == value, name
    x = video()
    with torch.no_grad():
        assert maxdiff(loaded.encode(x).mean, ref.encode(x).latent_dist.mean) <= TOL
        z = loaded.encode(x).mean
        assert maxdiff(loaded.decode(z), ref.decode(z).sample) <= TOL


@pytest.mark.parametrize("suffix", [pytest.param(".pth", marks=pytest.mark.slow), ".safetensors"])
def test_original_wan_layout(tmp_path, tiny_pair, suffix):
    vae, ref = tiny_pair
    wan_sd = export_state_dict(vae, wan_key_map(vae))
    # diffusers' own converter is the oracle for what the original layout means
    converted = convert_wan_vae_to_diffusers(dict(wan_sd))
    ref_sd = ref.state_dict()
    assert set(converted) == set(ref_sd)
    for k, v in ref_sd.items():
        assert torch.equal(converted[k].reshape(v.shape), v), k
    path = tmp_path / f"Wan2.1_VAE{suffix}"
    tensors = {k: v.contiguous() for k, v in wan_sd.items()}
    torch.save(tensors, path) if suffix == ".pth" else save_file(tensors, path)
    loaded = CausalVAE.from_pretrained(
        path, latents_mean=vae.config.latents_mean, latents_std=vae.config.latents_std
    )
    x = video()
    with torch.no_grad():
        assert maxdiff(loaded.encode(x).mean, ref.encode(x).latent_dist.mean) <= TOL
        assert (
            maxdiff(loaded.decode(loaded.encode(x).mean), ref.decode(ref.encode(x).latent_dist.mean).sample)
            <= TOL
        )


def test_vidlatent_folder_round_trip(tmp_path, tiny_pair):
    vae, _ = tiny_pair
    vae.save_pretrained(tmp_path / "ours")
    assert not [p for p in (tmp_path / "ours").iterdir() if p.name.startswith(".")], "no temp files left"
    loaded = CausalVAE.from_pretrained(tmp_path / "ours")
    assert loaded.config == vae.config
    for k, v in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_mismatched_checkpoint_lists_keys(tmp_path, tiny_pair):
    vae, _ = tiny_pair
    sd = export_state_dict(vae, wan_key_map(vae))
    sd.pop("decoder.head.2.bias")
    sd["encoder.conv1.weight"] = sd["encoder.conv1.weight"][:, :, :2]
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        CausalVAE.from_pretrained(path)
    msg = str(err.value)
    assert "decoder.conv_out.bias" in msg and "missing" in msg
    assert "encoder.conv_in.weight" in msg and "wrong shape" in msg
    assert "extra.weight" in msg and "unexpected" in msg


def test_unknown_source():
    with pytest.raises(FileNotFoundError, match="tiny"):
        CausalVAE.from_pretrained("no-such-preset")


def test_causality_and_image_is_first_frame(tiny_pair):
    vae, _ = tiny_pair
    x = video(t=13, h=16, w=16)
    with torch.no_grad():
        full = vae.encode(x).mean
        for j in range(3):
            prefix = vae.encode(x[:, :, : 1 + 4 * j]).mean
            assert maxdiff(prefix, full[:, :, : 1 + j]) <= 1e-5
        # decoding is causal too: a latent prefix decodes to the pixel prefix
        dec = vae.decode(full)
        assert maxdiff(vae.decode(full[:, :, :2]), dec[:, :, :5]) <= 1e-5
        # changing a late frame never changes earlier latents
        y = x.clone()
        y[:, :, 9:] = -y[:, :, 9:]
        assert maxdiff(vae.encode(y).mean[:, :, :3], full[:, :, :3]) <= 1e-5
        assert maxdiff(vae.encode(y).mean[:, :, 3], full[:, :, 3]) > 1e-3


@pytest.mark.parametrize("preset", ["tiny", pytest.param("wan2.1", marks=pytest.mark.slow)])
def test_chunk_size_invariance(preset, tiny_pair):
    vae = tiny_pair[0] if preset == "tiny" else randomize(CausalVAE.from_pretrained(preset))
    x = video(t=17, h=16, w=16)
    with torch.no_grad():
        means = [vae.encode(x, chunk_size=c).mean for c in (0, 1, 2, 3)]
        outs = [vae.decode(means[0], chunk_size=c) for c in (0, 1, 2, 3)]
    for m in means[1:]:
        assert maxdiff(m, means[0]) <= 1e-5
    for o in outs[1:]:
        assert maxdiff(o, outs[0]) <= 1e-5


def test_streaming_api_matches_encode(tiny_pair):
    vae, _ = tiny_pair
    x = video(t=13, h=16, w=16)
    with torch.no_grad():
        chunks = [x[:, :, :1], x[:, :, 1:5], x[:, :, 5:13]]
        streamed = torch.cat([p.mean for p in vae.encode_stream(chunks)], dim=2)
        full = vae.encode(x).mean
        assert maxdiff(streamed, full) <= 1e-5
        pixels = torch.cat(list(vae.decode_stream([full[:, :, :1], full[:, :, 1:]])), dim=2)
        assert maxdiff(pixels, vae.decode(full)) <= 1e-5


def psnr(a, b):
    mse = ((a - b) ** 2).mean().item()
    return 10 * math.log10(4.0 / max(mse, 1e-20))


@pytest.mark.slow
def test_tiling_agrees_and_stays_causal(tiny_pair):
    vae, _ = tiny_pair
    x = video(t=9, h=96, w=128, seed=3)
    with torch.no_grad():
        plain = vae.encode(x, tile=False).mean
        tiled = vae.encode(x, tile=True).mean
        assert tiled.shape == plain.shape
        enc_psnr = psnr(tiled / plain.abs().max(), plain / plain.abs().max())
        dec_plain = vae.decode(plain, tile=False)
        dec_tiled = vae.decode(plain, tile=True)
        dec_psnr = psnr(dec_tiled, dec_plain)
        print(f"tiled vs untiled PSNR: encode {enc_psnr:.1f} dB, decode {dec_psnr:.1f} dB")
        # Random weights and the per-frame attention in the mid block (it sees the whole tile, not the whole
        # frame) bound the agreement; measured 30.0 / 23.5 dB here, 32.5 / 25.5 dB with a 48 px overlap.
        assert enc_psnr > 26 and dec_psnr > 20
        # tiles never break causality in time
        assert maxdiff(vae.encode(x[:, :, :5], tile=True).mean, tiled[:, :, :2]) <= 1e-5
        assert maxdiff(vae.decode(plain[:, :, :2], tile=True), dec_tiled[:, :, :5]) <= 1e-5


def test_auto_tiling_switches_on_above_threshold():
    vae = CausalVAE.from_pretrained("tiny", auto_tile_above=64, tile_size=32, tile_overlap=8)
    calls = []
    original = vae._encode_moments

    def spy(v, chunk):
        calls.append(tuple(v.shape[-2:]))
        return original(v, chunk)

    vae._encode_moments = spy
    with torch.no_grad():
        vae.encode(video(t=1, h=64, w=64))
        assert calls == [(64, 64)]
        calls.clear()
        vae.encode(video(t=1, h=64, w=72))
        assert len(calls) > 1 and all(c == (32, 32) for c in calls)


def test_normalize_round_trip(tiny_pair):
    vae, _ = tiny_pair
    z = torch.randn(2, 4, 3, 2, 2)
    n = vae.normalize(z)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    assert torch.allclose(n, (z - mean) / std)
    assert torch.allclose(vae.denormalize(n), z, atol=1e-6)


def test_first_frame_statistics_normalize_frame_zero_alone(tiny_pair, first_stats_vae):
    vae = first_stats_vae(tiny_pair[0])
    cfg = vae.config
    z = torch.randn(2, cfg.latent_channels, 3, 2, 2) * 3
    n = vae.normalize(z)
    view = (1, -1, 1, 1)
    first = (z[:, :, 0] - torch.tensor(cfg.first_latents_mean).view(view)) / torch.tensor(
        cfg.first_latents_std
    ).view(view)
    later = (z[:, :, 1:] - torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)) / torch.tensor(
        cfg.latents_std
    ).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(n[:, :, 0], first)
    torch.testing.assert_close(n[:, :, 1:], later)
    torch.testing.assert_close(vae.denormalize(n), z, atol=1e-5, rtol=1e-5)
    # an image (one latent frame) is normalized exactly like a clip's first frame; one clip (c, t, h, w) alike
    torch.testing.assert_close(vae.normalize(z[:, :, :1]), n[:, :, :1])
    torch.testing.assert_close(vae.normalize(z[1]).reshape(n[1].shape), n[1])


def test_a_still_first_frame_is_coded_as_later_frames_are_and_streams_alike(tiny_pair, tmp_path):
    """first_frame="still": a still clip's first two latent frames are equal (frame 0 coded as the clip's second
    latent frame), an image is a clip's first frame, later latent frames are the "alone" VAE's own, the encoding
    stays causal, every chunk size and the streaming API agree, the setting survives a save, and diffusers' layout
    (which codes frame 0 alone) is refused; a bad value names what is accepted."""
    alone = tiny_pair[0]
    vae = CausalVAE(replace(alone.config, first_frame="still")).eval()
    vae.load_state_dict(alone.state_dict())
    x = video(t=13, h=16, w=16)
    with torch.no_grad():
        full, theirs = vae.encode(x).mean, alone.encode(x).mean
        assert (
            maxdiff(full[:, :, 1:], theirs[:, :, 1:]) <= 1e-6
            and maxdiff(full[:, :, 0], theirs[:, :, 0]) > 1e-3
        )
        still = vae.encode(x[:, :, :1].expand(-1, -1, 5, -1, -1)).mean
        assert (
            maxdiff(still[:, :, 0], still[:, :, 1]) <= 1e-5 and maxdiff(still[:, :, 0], full[:, :, 0]) <= 1e-5
        )
        assert maxdiff(vae.encode(x[:, :, :1]).mean, full[:, :, :1]) <= 1e-6
        assert maxdiff(vae.encode(x[:, :, :5]).mean, full[:, :, :2]) <= 1e-5  # causal
        for c in (0, 2):
            assert maxdiff(vae.encode(x, chunk_size=c).mean, full) <= 1e-5
        chunks = [x[:, :, :1], x[:, :, 1:5], x[:, :, 5:13]]
        assert maxdiff(torch.cat([p.mean for p in vae.encode_stream(chunks)], dim=2), full) <= 1e-5
    vae.save_pretrained(tmp_path / "still")
    assert CausalVAE.from_pretrained(tmp_path / "still").config.first_frame == "still"
    with pytest.raises(ValueError, match="encodes a clip's first frame as a still"):
        vae_config_to_diffusers(vae.config)
    with pytest.raises(
        ValueError, match="first_frame must be one of alone, still, still_context, got 'first'"
    ):
        CausalVAE(replace(alone.config, first_frame="first"))


def test_a_still_context_codes_the_clip_after_its_first_frame_held_still_and_streams_alike(tiny_pair):
    """first_frame="still_context": the latents are those of the clip with frame 0 repeated in front (1 +
    temporal_factor copies in all), the first dropped; so frame 0 is coded as with "still" and the later frames
    after that still, not after frame 0 alone as with "still". Causal; every chunk size and the stream agree."""
    alone = tiny_pair[0]
    vae = CausalVAE(replace(alone.config, first_frame="still_context")).eval()
    vae.load_state_dict(alone.state_dict())
    still = CausalVAE(replace(alone.config, first_frame="still")).eval()
    still.load_state_dict(alone.state_dict())
    x = video(t=13, h=16, w=16)
    with torch.no_grad():
        full = vae.encode(x).mean
        held = alone.encode(torch.cat([x[:, :, :1].expand(-1, -1, 4, -1, -1), x], dim=2)).mean
        assert full.shape == alone.encode(x).mean.shape and maxdiff(full, held[:, :, 1:]) <= 1e-5
        other = still.encode(x).mean
        assert (
            maxdiff(full[:, :, 0], other[:, :, 0]) <= 1e-5 and maxdiff(full[:, :, 1:], other[:, :, 1:]) > 1e-3
        )
        assert maxdiff(vae.encode(x[:, :, :1]).mean, full[:, :, :1]) <= 1e-6  # an image: the clip's frame 0
        assert maxdiff(vae.encode(x[:, :, :5]).mean, full[:, :, :2]) <= 1e-5  # causal
        for c in (0, 2):
            assert maxdiff(vae.encode(x, chunk_size=c).mean, full) <= 1e-5
        chunks = [x[:, :, :1], x[:, :, 1:5], x[:, :, 5:13]]
        assert maxdiff(torch.cat([p.mean for p in vae.encode_stream(chunks)], dim=2), full) <= 1e-5
    with pytest.raises(ValueError, match="encodes a clip's first frame as a still"):
        vae_config_to_diffusers(vae.config)


def test_first_frame_statistics_are_checked(tiny_pair):
    cfg = tiny_pair[0].config
    c = cfg.latent_channels
    with pytest.raises(ValueError, match="set together"):
        CausalVAE(replace(cfg, first_latents_mean=[0.0] * c))
    with pytest.raises(ValueError, match=f"first_latents_std needs {c} values, got 2"):
        CausalVAE(replace(cfg, first_latents_mean=[0.0] * c, first_latents_std=[1.0, 1.0]))


def test_posterior_sampling_is_seeded(tiny_pair):
    vae, _ = tiny_pair
    with torch.no_grad():
        post = vae.encode(video(t=1, h=16, w=16))
    a = post.sample(torch.Generator().manual_seed(7))
    b = post.sample(torch.Generator().manual_seed(7))
    c = post.sample(torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(post.mode(), post.mean)
    assert post.kl().shape == (1,)


@pytest.mark.parametrize(
    "shape, dtype, match",
    [
        ((1, 3, 8, 16, 16), torch.float32, r"1\+4k"),
        ((1, 3, 5, 20, 16), torch.float32, "multiples of 8"),
        ((1, 4, 5, 16, 16), torch.float32, "3 channels"),
        ((3, 5, 16, 16), torch.float32, "5 dims"),
        ((1, 3, 5, 16, 16), torch.uint8, "float"),
    ],
)
def test_bad_video_inputs(shape, dtype, match, tiny_pair):
    vae, _ = tiny_pair
    with pytest.raises(ValueError, match=match):
        vae.encode(torch.zeros(shape, dtype=dtype))


def test_bad_latents(tiny_pair):
    vae, _ = tiny_pair
    with pytest.raises(ValueError, match="4 channels"):
        vae.decode(torch.zeros(1, 16, 2, 2, 2))
    with pytest.raises(ValueError, match="float tensor"):
        vae.decode(torch.zeros(1, 4, 2, 2))
