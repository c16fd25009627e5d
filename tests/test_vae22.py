"""The Wan 2.2 VAE (4x16x16, 48 latent channels): parity with diffusers' ``AutoencoderKLWan`` in its 2.2
configuration, the original ``Wan2.2_VAE.pth`` layout, causality, chunk-size invariance, streaming, tiling,
loading (diffusers vae/ folder, original file, a pipeline root holding a 2.2 VAE) and the 2.1/2.2 mix-up."""

import copy
import re

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
from safetensors.torch import save_file
from test_vae import maxdiff, psnr, randomize, video

from vidlatent import CausalVAE, StreamCache
from vidlatent.config import VAEConfig, load_config
from vidlatent.config.models import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD
from vidlatent.models.vae import diffusers_key_map, export_state_dict, vae_config_to_diffusers, wan_key_map

REL = 1e-4  # parity: max abs difference relative to the reference's largest value


def with_channels(c: int) -> dict:
    """Config fields for ``c`` latent channels (with neutral statistics)."""
    return dict(latent_channels=c, latents_mean=[0.0] * c, latents_std=[1.0] * c)


def make_pair(preset: str, seed: int = 0, **fields):
    vae = randomize(CausalVAE.from_pretrained(preset, **fields), seed)
    ref = AutoencoderKLWan(**vae_config_to_diffusers(vae.config)).eval()
    ref.load_state_dict(export_state_dict(vae, diffusers_key_map(vae), like=ref.state_dict()), strict=True)
    return vae, ref


@pytest.fixture(scope="module")
def pair():
    return make_pair("tiny2.2")


def close(ours, ref, rel=REL):
    scale = ref.abs().max().item()
    assert scale > 0.05, "the reference should be O(1) for a meaningful comparison"
    assert maxdiff(ours, ref) <= rel * scale, (maxdiff(ours, ref), scale)


def check_parity(vae, ref, x):
    """Encode (mean, logvar), raw decoder output and the public clamped decode, ours vs diffusers."""
    b, _, t, h, w = x.shape
    with torch.no_grad():
        post, ref_post = vae.encode(x), ref.encode(x).latent_dist
        assert post.mean.shape == (b, vae.config.latent_channels, 1 + (t - 1) // 4, h // 16, w // 16)
        close(post.mean, ref_post.mean)
        close(post.logvar, ref_post.logvar)
        z = post.mean
        cache = StreamCache()
        ours_raw = torch.cat([vae.decode_step(z[:, :, i : i + 1], cache)[0] for i in range(z.shape[2])], 2)
        ref.clear_cache()
        zz = ref.post_quant_conv(z)
        ref_raw = torch.cat(
            [
                ref.decoder(zz[:, :, i : i + 1], feat_cache=ref._feat_map, feat_idx=[0], first_chunk=i == 0)
                for i in range(z.shape[2])
            ],
            dim=2,
        )
        close(ours_raw, unpatchify(ref_raw, ref.config.patch_size))
        out, ref_out = vae.decode(z), ref.decode(z).sample
        assert out.shape == x.shape
        close(out, ref_out)


def wan22_on_meta() -> CausalVAE:
    """The full wan2.2 preset's structure without allocating its 705M parameters."""
    with torch.device("meta"):
        return CausalVAE(load_config(VAEConfig, "vae", "wan2.2"))


def test_presets_are_wan22():
    vae = wan22_on_meta()
    assert abs(sum(p.numel() for p in vae.parameters()) / 1e6 - 704.7) < 0.05
    assert (vae.spatial_factor, vae.temporal_factor, vae.config.latent_channels) == (16, 4, 48)
    assert vae.config.latents_mean == WAN22_LATENTS_MEAN and vae.config.latents_std == WAN22_LATENTS_STD
    tiny = CausalVAE.from_pretrained("tiny2.2")
    assert tiny.spatial_factor == 16 and tiny.config.stage_shortcut == "resample"


@pytest.mark.parametrize(
    "t, h, w, seed",
    [
        (5, 32, 48, 1),
        (1, 48, 32, 3),
        pytest.param(1, 16, 16, 4, marks=pytest.mark.slow),
        pytest.param(5, 16, 32, 5, marks=pytest.mark.slow),
    ],
)
def test_parity_tiny22(pair, t, h, w, seed):
    check_parity(*pair, video(t, h, w, seed))


@pytest.mark.slow
def test_parity_other_weights_and_batch():
    vae, ref = make_pair("tiny2.2", seed=7, **with_channels(4))
    x = torch.cat([video(5, 32, 32, seed=8), video(5, 32, 32, seed=9)])
    check_parity(vae, ref, x)


@pytest.mark.slow
def test_parity_wan22_full_config():
    vae, ref = make_pair("wan2.2")
    check_parity(vae, ref, video(t=5, h=32, w=48))  # non-square clip
    check_parity(vae, ref, video(t=1, h=48, w=32, seed=2))  # an image


def wan22_to_diffusers_names(key: str, n: int = 2) -> str:
    """The original Wan 2.2 layout's name of a parameter as diffusers names it, written from the two
    modules' definitions (Wan2.2 ``wan/modules/vae2_2.py``, diffusers ``autoencoder_kl_wan.py``)."""
    res = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.", "residual.6.": "conv2."}
    key = re.sub(r"^conv1\.", "quant_conv.", key)
    key = re.sub(r"^conv2\.", "post_quant_conv.", key)
    key = re.sub(r"^(encoder|decoder)\.conv1\.", r"\1.conv_in.", key)
    key = re.sub(r"^(encoder|decoder)\.head\.0\.", r"\1.norm_out.", key)
    key = re.sub(r"^(encoder|decoder)\.head\.2\.", r"\1.conv_out.", key)
    key = re.sub(r"^(encoder|decoder)\.middle\.1\.", r"\1.mid_block.attentions.0.", key)
    key = re.sub(
        r"^(encoder|decoder)\.middle\.([02])\.", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) // 2}.", key
    )
    key = re.sub(
        r"^encoder\.downsamples\.(\d+)\.downsamples\.(\d+)\.",
        lambda m: f"encoder.down_blocks.{m[1]}." + ("downsampler." if int(m[2]) == n else f"resnets.{m[2]}."),
        key,
    )
    key = re.sub(
        r"^decoder\.upsamples\.(\d+)\.upsamples\.(\d+)\.",
        lambda m: f"decoder.up_blocks.{m[1]}." + ("upsampler." if int(m[2]) == n + 1 else f"resnets.{m[2]}."),
        key,
    )
    for a, b in res.items():
        key = key.replace(a, b)
    return key.replace(".shortcut.", ".conv_shortcut.")


@pytest.mark.parametrize("suffix", [".pth", pytest.param(".safetensors", marks=pytest.mark.slow)])
def test_original_wan22_layout(tmp_path, pair, suffix):
    vae, ref = pair
    wan_sd = export_state_dict(vae, wan_key_map(vae))
    assert "encoder.downsamples.1.downsamples.2.time_conv.weight" in wan_sd  # Wan 2.2's nested stages
    assert "decoder.upsamples.0.upsamples.3.time_conv.weight" in wan_sd
    renamed = {wan22_to_diffusers_names(k): v for k, v in wan_sd.items()}
    ref_sd = ref.state_dict()
    assert set(renamed) == set(ref_sd)
    for k, v in ref_sd.items():
        assert torch.equal(renamed[k].reshape(v.shape), v), k
    path = tmp_path / f"Wan2.2_VAE{suffix}"
    tensors = {k: v.contiguous() for k, v in wan_sd.items()}
    torch.save(tensors, path) if suffix == ".pth" else save_file(tensors, path)
    loaded = CausalVAE.from_pretrained(
        path, latents_mean=vae.config.latents_mean, latents_std=vae.config.latents_std
    )
    runtime = {"chunk_size", "tile_size", "tile_overlap", "auto_tile_above"}  # not stored in the file
    for name, value in vars(vae.config).items():  # structure, widths and patching told from the file alone
        assert name in runtime or getattr(loaded.config, name) == value, name
    x = video(5, 32, 48)
    with torch.no_grad():
        close(loaded.encode(x).mean, ref.encode(x).latent_dist.mean)
        z = loaded.encode(x).mean
        close(loaded.decode(z), ref.decode(z).sample)


def test_original_file_of_48_channels_gets_wan22_stats(tmp_path):
    vae = CausalVAE.from_pretrained("tiny2.2", **with_channels(48))
    path = tmp_path / "Wan2.2_VAE.safetensors"
    save_file({k: v.contiguous() for k, v in export_state_dict(vae, wan_key_map(vae)).items()}, path)
    loaded = CausalVAE.from_pretrained(path)
    assert loaded.config.latents_mean == WAN22_LATENTS_MEAN and loaded.config.latents_std == WAN22_LATENTS_STD


def test_diffusers_folder_round_trip(tmp_path, pair):
    vae, ref = pair
    ref.save_pretrained(tmp_path / "vae")
    loaded = CausalVAE.from_pretrained(tmp_path / "vae")
    runtime = {"chunk_size", "tile_size", "tile_overlap", "auto_tile_above"}  # not part of a diffusers config
    for name, value in vars(vae.config).items():
        assert name in runtime or getattr(loaded.config, name) == value, name
    x = video(5, 48, 32)
    with torch.no_grad():
        close(loaded.encode(x).mean, ref.encode(x).latent_dist.mean)
        z = loaded.encode(x).mean
        close(loaded.decode(z), ref.decode(z).sample)


def test_vidlatent_folder_round_trip(tmp_path, pair):
    vae, _ = pair
    vae.save_pretrained(tmp_path / "ours")
    loaded = CausalVAE.from_pretrained(tmp_path / "ours")
    assert loaded.config == vae.config
    for k, v in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_causality_and_image_is_first_frame(pair):
    vae, _ = pair
    x = video(t=9, h=16, w=16)
    with torch.no_grad():
        full = vae.encode(x).mean
        for j in range(2):
            assert maxdiff(vae.encode(x[:, :, : 1 + 4 * j]).mean, full[:, :, : 1 + j]) <= 1e-5
        dec = vae.decode(full)
        assert maxdiff(vae.decode(full[:, :, :1]), dec[:, :, :1]) <= 1e-5  # an image decodes alone
        assert maxdiff(vae.decode(full[:, :, :2]), dec[:, :, :5]) <= 1e-5
        y = x.clone()
        y[:, :, 5:] = -y[:, :, 5:]
        changed = vae.encode(y).mean
        assert maxdiff(changed[:, :, :2], full[:, :, :2]) <= 1e-5
        assert maxdiff(changed[:, :, 2], full[:, :, 2]) > 1e-3


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_chunk_size_invariance(pair, seed):
    vae, _ = pair
    x = video(t=13, h=16, w=32, seed=seed)
    with torch.no_grad():
        means = [vae.encode(x, chunk_size=c).mean for c in (0, 1, 2)]
        outs = [vae.decode(means[0], chunk_size=c) for c in (0, 1, 2)]
    for m in means[1:]:
        assert maxdiff(m, means[0]) <= 1e-5
    for o in outs[1:]:
        assert maxdiff(o, outs[0]) <= 1e-5


def test_streaming_api_matches_encode(pair):
    vae, _ = pair
    x = video(t=13, h=16, w=16)
    with torch.no_grad():
        chunks = [x[:, :, :1], x[:, :, 1:5], x[:, :, 5:13]]
        streamed = torch.cat([p.mean for p in vae.encode_stream(chunks)], dim=2)
        full = vae.encode(x).mean
        assert maxdiff(streamed, full) <= 1e-5
        first_big = torch.cat([p.mean for p in vae.encode_stream([x[:, :, :5], x[:, :, 5:]])], dim=2)
        assert maxdiff(first_big, full) <= 1e-5
        pixels = torch.cat(list(vae.decode_stream([full[:, :, :1], full[:, :, 1:3], full[:, :, 3:]])), dim=2)
        assert maxdiff(pixels, vae.decode(full)) <= 1e-5


@pytest.mark.slow
def test_tiling_agrees_and_stays_causal(pair):
    vae = copy.deepcopy(pair[0])
    vae.config.tile_size, vae.config.tile_overlap = 64, 32  # 2 x 3 tiles of 64 px (4 latent px)
    x = video(t=5, h=96, w=128, seed=3)
    with torch.no_grad():
        plain = vae.encode(x, tile=False).mean
        tiled = vae.encode(x, tile=True).mean
        assert tiled.shape == plain.shape == (1, 6, 2, 6, 8)
        enc_psnr = psnr(tiled / plain.abs().max(), plain / plain.abs().max())
        dec_plain = vae.decode(plain, tile=False)
        dec_tiled = vae.decode(plain, tile=True)
        assert dec_tiled.shape == x.shape
        dec_psnr = psnr(dec_tiled, dec_plain)
        print(f"tiled vs untiled PSNR: encode {enc_psnr:.1f} dB, decode {dec_psnr:.1f} dB")
        # Random weights and small tiles (4 latent px: the mid-block attention sees one tile, not the frame)
        # bound the agreement; measured 30.4 / 19.0 dB here.
        assert enc_psnr > 26 and dec_psnr > 16
        assert maxdiff(vae.encode(x[:, :, :1], tile=True).mean, tiled[:, :, :1]) <= 1e-5
        assert maxdiff(vae.decode(plain[:, :, :1], tile=True), dec_tiled[:, :, :1]) <= 1e-5


def test_normalize_uses_48_channel_stats():
    vae = wan22_on_meta()
    z = torch.randn(1, 48, 2, 3, 4)
    mean = torch.tensor(WAN22_LATENTS_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(WAN22_LATENTS_STD).view(1, -1, 1, 1, 1)
    assert torch.allclose(vae.normalize(z), (z - mean) / std)
    assert torch.allclose(vae.denormalize(vae.normalize(z)), z, atol=1e-5)


def test_wan21_vae_given_wan22_latents_names_the_mismatch():
    v21 = CausalVAE.from_pretrained("tiny", **with_channels(16))
    z = torch.zeros(1, 48, 2, 2, 2)
    for call in (v21.decode, v21.normalize, v21.denormalize):
        with pytest.raises(ValueError) as err:
            call(z)
        msg = str(err.value)
        assert "\n" not in msg
        assert "48 channels" in msg and "Wan 2.2" in msg and "16 channels" in msg and "Wan 2.1" in msg, msg
    v22 = CausalVAE.from_pretrained("tiny2.2", **with_channels(48))
    with pytest.raises(ValueError, match=r"16 channels \(as a Wan 2.1 VAE makes\).*48 channels"):
        v22.decode(torch.zeros(1, 16, 2, 2, 2))


@pytest.mark.parametrize(
    "shape, match",
    [
        ((1, 3, 5, 24, 32), "multiples of 16"),
        ((1, 3, 5, 32, 40), "multiples of 16"),
        ((1, 3, 4, 32, 32), r"1\+4k"),
    ],
)
def test_bad_video_sizes(pair, shape, match):
    with pytest.raises(ValueError, match=match):
        pair[0].encode(torch.zeros(shape))


@pytest.mark.parametrize(
    "field, match",
    [
        ({"stage_shortcut": "avg"}, "stage_shortcut must be one of none, resample"),
        ({"patch_size": 0}, "patch_size"),
    ],
)
def test_bad_config(field, match):
    with pytest.raises(ValueError, match=match):
        CausalVAE.from_pretrained("tiny2.2", **field)


def test_pipeline_root_with_a_wan22_vae(tmp_path):
    """A diffusers Wan root whose vae/ is a 2.2 VAE loads, and runs as diffusers' WanPipeline does."""
    from diffusers import WanPipeline
    from wan_folders import wan_t2v_parts

    from vidlatent import VideoPipeline

    parts = wan_t2v_parts()
    z = parts["vae"].config.z_dim  # the tiny transformer's channels
    parts["vae"] = make_pair("tiny2.2", seed=3, **with_channels(z))[1]
    ref = WanPipeline(**parts)
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(str(tmp_path / "root"))
    pipe = VideoPipeline.from_pretrained(tmp_path / "root")
    assert pipe.vae.spatial_factor == 16 and pipe.vae.config.stage_shortcut == "resample"
    noise = torch.randn(1, z, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    kw = dict(prompt="a red circle", negative_prompt="blue", num_inference_steps=4, guidance_scale=5.0)
    ref_video = ref(**kw, height=64, width=64, num_frames=9, latents=noise.clone(), output_type="pt").frames
    ref_video = ref_video.permute(0, 2, 1, 3, 4) * 2 - 1
    video = pipe.generate("a red circle", "blue", steps=4, guidance=5.0, noise=noise.clone(), progress=False)
    assert video.shape == ref_video.shape == (1, 3, 9, 64, 64)
    assert ref_video.std() > 0.1
    assert (video.clamp(-1, 1) - ref_video).abs().max() <= 1e-3
