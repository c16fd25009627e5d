"""Wan 2.2 folders through our pipeline give what diffusers' pipelines give on the same weights, prompts, steps,
guidance and start noise: TI2V-5B (``expand_timesteps``) from text and from an image, A14B's two experts from
text (``WanPipeline``) and from an image (``WanImageToVideoPipeline``, no CLIP); the experts' offload; the
folders and errors."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from wan22_folders import pipeline, saved, tiny_vae

from vidlatent import VideoPipeline
from vidlatent.cli import main
from vidlatent.models.dit import VideoDiT
from vidlatent.models.vae import CausalVAE
from vidlatent.pipelines.wan import diffusers_pipeline_config

PROMPT, NEGATIVE = "a red circle moving left", "blue square"
FRAMES, SIZE = 9, 64
WIDE = (64, 96)  # TI2V's (height, width): non-square, 4x6 latents through the 16x VAE
BOUNDARY = 0.7  # with shift 3 and 6 steps the experts split the run 3 / 3


@pytest.fixture(scope="module", autouse=True)
def _prompt_clean_without_ftfy():
    """diffusers 0.42's I2V pipeline calls ftfy even where it is not installed; borrow the T2V clean-up (the
    same without ftfy, and these prompts are ASCII)."""
    from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_i2v

    with pytest.MonkeyPatch.context() as mp:
        if not pipeline_wan.is_ftfy_available():
            mp.setattr(pipeline_wan_i2v, "prompt_clean", pipeline_wan.prompt_clean)
        yield


def make_still(folder, height, width):
    """A PNG still: a red disk on a colour ramp, ``height`` x ``width``."""
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    disk = ((x - 0.3) ** 2 + (y - 0.4) ** 2 < 0.03)[..., None]
    pixels = np.where(disk, [0.9, 0.1, 0.2], np.stack([x, y, 1 - x / 2], axis=-1))
    path = folder / f"still_{height}x{width}.png"
    Image.fromarray((pixels * 255).round().astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def still(tmp_path_factory):
    return make_still(tmp_path_factory.mktemp("still"), SIZE, SIZE)


@pytest.fixture(scope="module")
def wide_still(tmp_path_factory):
    return make_still(tmp_path_factory.mktemp("still"), *WIDE)


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    """A TI2V-5B-shaped folder (a Wan 2.2-structured 16x VAE of 48 latent channels, expand_timesteps) and
    diffusers' WanPipeline on it."""
    return saved(
        tmp_path_factory.mktemp("wan22") / "Wan2.2-TI2V-tiny-Diffusers", "WanPipeline", expand_timesteps=True
    )


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    """A T2V-A14B-shaped folder (two experts, boundary_ratio) and diffusers' WanPipeline on it."""
    return saved(
        tmp_path_factory.mktemp("wan22") / "Wan2.2-T2V-A14B-tiny-Diffusers",
        "WanPipeline",
        latent_channels=16,
        experts=2,
        boundary_ratio=BOUNDARY,
    )


def noise(channels, seed=0, latent_hw=(8, 8)):
    return torch.randn(1, channels, 3, *latent_hw, generator=torch.Generator().manual_seed(seed))


def as_video(frames):
    """diffusers' output_type="pt" frames (b, t, c, h, w) in [0, 1] -> (b, c, t, h, w) in [-1, 1]."""
    return (frames * 2 - 1).permute(0, 2, 1, 3, 4)


def ref_kw(start, steps=6, size=(SIZE, SIZE), **kw):
    return dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, height=size[0],
                width=size[1], num_frames=FRAMES, latents=start.clone(), output_type="pt", **kw)  # fmt: skip


def close(ours, ref, size=(SIZE, SIZE), what="video"):
    """Max abs difference <= 1e-3 (the videos are in [-1, 1]); prints it relative to the reference's max abs."""
    assert ours.shape == ref.shape == (1, 3, FRAMES, *size)
    assert ref.std() > 0.2  # a real video, not a blank one that would match anything
    diff = (ours.clamp(-1, 1) - ref).abs().max().item()
    print(
        f"{what}: max |ours - diffusers| = {diff:.4g}, relative to max |diffusers| {diff / ref.abs().max():.4g} (ref std {ref.std():.4g})"
    )
    assert diff <= 1e-3, diff
    return diff


# ------------------------------------------------------------------------------------------ TI2V-5B


def test_ti2v_vae_is_wan22_structured(ti2v):
    path, ref = ti2v
    vae = VideoPipeline.from_pretrained(path).vae
    assert (vae.spatial_factor, vae.temporal_factor, vae.config.latent_channels) == (16, 4, 48)
    assert vae.config.patch_size == 2 and vae.config.stage_shortcut == "resample"
    assert ref.vae.config.is_residual and ref.vae.config.patch_size == 2


@pytest.mark.parametrize("seed", [0, 1])
def test_ti2v_text_to_video_equals_wan_pipeline(ti2v, seed):
    path, ref = ti2v
    pipe = VideoPipeline.from_pretrained(path)
    assert pipe.vae.config.latent_channels == pipe.dit.config.in_channels == 48
    assert pipe.config.first_frame == "clean_sigma0"
    start = noise(48, seed, (WIDE[0] // 16, WIDE[1] // 16))
    expected = as_video(ref(**ref_kw(start, size=WIDE, guidance_scale=5.0)).frames)
    video = pipe.generate(PROMPT, NEGATIVE, steps=6, guidance=5.0, noise=start.clone(), progress=False)
    close(video, expected, WIDE, f"TI2V text-to-video, seed {seed}")


@pytest.mark.parametrize("seeds", [(0, 1), pytest.param((2,), marks=pytest.mark.slow)])
def test_ti2v_image_to_video_equals_wan_image_to_video_pipeline(ti2v, wide_still, seeds):
    """The still's latent is the clean first frame at timestep 0, the rest noised (per-token timesteps)."""
    from diffusers import WanImageToVideoPipeline

    path, ref = ti2v
    i2v = WanImageToVideoPipeline(**{**ref.components, "image_encoder": None, "image_processor": None},
                                  expand_timesteps=True)  # fmt: skip
    i2v.set_progress_bar_config(disable=True)
    pipe = VideoPipeline.from_pretrained(path)
    for seed in seeds:
        start = noise(48, seed, (WIDE[0] // 16, WIDE[1] // 16))
        expected = as_video(
            i2v(image=Image.open(wide_still), **ref_kw(start, size=WIDE, guidance_scale=5.0)).frames
        )
        kw = dict(steps=6, guidance=5.0, noise=start.clone(), progress=False)
        video = pipe.animate(wide_still, PROMPT, FRAMES, NEGATIVE, **kw)
        close(video, expected, WIDE, f"TI2V text+image-to-video, seed {seed}")
        latents = pipe.animate(wide_still, PROMPT, FRAMES, NEGATIVE, output_type="latent", **kw)
        assert torch.equal(latents[:, :, :1], pipe.encode(pipe._image_input(wide_still, "image")[0]))
    # the clean frame's timestep 0 is what makes it match: told the step's level instead, the video moves
    other = pipe.animate(wide_still, PROMPT, FRAMES, NEGATIVE, first_frame="clean", **kw)
    assert (other - video).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------ A14B


@pytest.mark.parametrize("guidance_2", [2.0, pytest.param(None, marks=pytest.mark.slow)])
def test_two_experts_equal_wan_pipeline(a14b, guidance_2):
    path, ref = a14b
    pipe = VideoPipeline.from_pretrained(path)
    assert pipe.dit_2 is not None and pipe.config.boundary == BOUNDARY
    if (
        guidance_2 is None
    ):  # diffusers' guidance_scale_2=None is guidance_scale; the folder's default is Wan's 3
        pipe.config.guidance_2 = None
    start = noise(16, 3)
    expected = as_video(ref(**ref_kw(start, guidance_scale=5.0, guidance_scale_2=guidance_2)).frames)
    video = pipe.generate(PROMPT, NEGATIVE, steps=6, guidance=5.0, guidance_2=guidance_2, noise=start.clone(),
                          progress=False)  # fmt: skip
    close(video, expected, what=f"T2V-A14B two experts, guidance_2 {guidance_2}")
    if guidance_2 is not None:  # each expert and each guidance counts
        one = VideoPipeline(
            pipe.vae,
            pipe.dit,
            pipe.text_encoder,
            dataclasses.replace(pipe.config, boundary=None, guidance_2=None),
        )
        alone = one.generate(PROMPT, NEGATIVE, steps=6, guidance=5.0, noise=start.clone(), progress=False)
        assert (alone - video).abs().max() > 1e-2
        same = pipe.generate(PROMPT, NEGATIVE, steps=6, guidance=5.0, noise=start.clone(), progress=False)
        assert (same - video).abs().max() > 1e-3


def test_expert_switch_follows_diffusers_comparison(a14b):
    """The high-noise expert runs while the scheduler's timestep >= boundary * 1000, then the other, once."""
    path, _ = a14b
    pipe = VideoPipeline.from_pretrained(path)
    calls = []
    for tag, dit in (("high", pipe.dit), ("low", pipe.dit_2)):
        dit.register_forward_pre_hook(lambda m, args, kw, tag=tag: calls.append((tag, float(args[1][0]))),
                                      with_kwargs=True)  # fmt: skip
    pipe.generate(PROMPT, steps=6, guidance=1.0, noise=noise(16), progress=False)
    tags = [t for t, _ in calls]
    assert tags == sorted(tags, key=lambda t: t == "low") and "high" in tags and "low" in tags
    assert all((s >= BOUNDARY) == (t == "high") for t, s in calls)


def test_offloaded_experts_switch_once_and_give_the_same_video(a14b):
    path, _ = a14b
    pipe = VideoPipeline.from_pretrained(path)
    kw = dict(steps=4, guidance=5.0, guidance_2=3.0, noise=noise(16, 5), progress=False)
    plain = pipe.generate(PROMPT, NEGATIVE, **kw)
    pipe.offload_experts()
    moves = []
    placement = pipe.expert_placement
    for name in ("start", "switch"):
        method = getattr(placement, name)
        setattr(placement, name, lambda method=method, name=name: (moves.append(name), method())[1])
    for _ in range(2):
        assert torch.equal(pipe.generate(PROMPT, NEGATIVE, **kw), plain)
    assert moves == ["start", "switch"] * 2 and placement.moves == 2
    assert next(pipe.dit.parameters()).device.type == "cpu" and pipe.device.type == "cpu"


def test_image_to_video_two_experts_equal_diffusers(tmp_path, still):
    """Wan 2.2 I2V-A14B: condition latents (frame mask + image latents) and no CLIP, two experts."""
    ref = pipeline(
        "WanImageToVideoPipeline", latent_channels=16, image=True, experts=2, boundary_ratio=BOUNDARY
    )
    ref.save_pretrained(str(tmp_path / "i2v"))
    pipe = VideoPipeline.from_pretrained(tmp_path / "i2v")
    assert pipe.image_encoder is None and pipe.dit.config.condition_channels == 20
    start = noise(16, 7)
    expected = as_video(
        ref(image=Image.open(still), **ref_kw(start, guidance_scale=5.0, guidance_scale_2=3.0)).frames
    )
    video = pipe.animate(still, PROMPT, FRAMES, NEGATIVE, steps=6, guidance=5.0, guidance_2=3.0,
                         noise=start.clone(), progress=False)  # fmt: skip
    close(video, expected, what="I2V-A14B two experts")
    with pytest.raises(ValueError, match="image-conditioned"):
        pipe.generate(PROMPT, steps=1, noise=start)


@pytest.mark.slow
def test_converted_two_expert_folder_runs_the_same(a14b, tmp_path):
    path, _ = a14b
    out = tmp_path / "ours"
    assert main(["convert", str(path), "-o", str(out), "-q"]) == 0
    assert {"dit", "dit_2"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "pipeline.json").read_text())["boundary"] == BOUNDARY
    kw = dict(steps=4, guidance=5.0, guidance_2=2.0, noise=noise(16, 2), progress=False)
    direct = VideoPipeline.from_pretrained(path).generate(PROMPT, NEGATIVE, **kw)
    converted = VideoPipeline.from_pretrained(out).generate(PROMPT, NEGATIVE, **kw)
    torch.testing.assert_close(converted, direct, rtol=0, atol=1e-5)  # two loads: not bitwise on every CPU
    shutil.rmtree(out / "dit_2")
    with pytest.raises(FileNotFoundError, match=r"pipeline.json sets a boundary\) but lacks dit_2/"):
        VideoPipeline.from_pretrained(out)


# ------------------------------------------------------------------------------------------ call defaults


def test_wan22_folders_take_wan22_defaults(ti2v, a14b, tmp_path):
    """Wan-Video/Wan2.2's defaults per kind (wan/configs/wan_ti2v_5B.py, wan_t2v_A14B.py, wan_i2v_A14B.py);
    the folder's scheduler shift stays; a Wan 2.1 folder keeps WanPipeline's."""
    size = ("height", "width")
    ti2v_cfg = VideoPipeline.from_pretrained(ti2v[0]).config
    got = {k: getattr(ti2v_cfg, k) for k in ("steps", "guidance", "guidance_2", "frames", "fps", *size)}
    assert got == dict(steps=50, guidance=5.0, guidance_2=None, frames=121, fps=24.0, height=704, width=1280)
    a14b_cfg = VideoPipeline.from_pretrained(a14b[0]).config
    got = {k: getattr(a14b_cfg, k) for k in ("steps", "guidance", "guidance_2", "frames", "fps", *size)}
    assert got == dict(steps=40, guidance=4.0, guidance_2=3.0, frames=81, fps=16.0, height=720, width=1280)
    assert ti2v_cfg.shift == a14b_cfg.shift == 3.0  # the tiny folders' scheduler_config flow_shift
    # without a scheduler config, Wan 2.2's sample_shift; the kind is told by each sign alone
    index = json.loads((ti2v[0] / "model_index.json").read_text())
    cases = [
        ("WanPipeline", {"expand_timesteps": True}, None, dict(shift=5.0, steps=50, frames=121)),
        ("WanPipeline", {}, 48, dict(shift=5.0, steps=50, frames=121, fps=24.0)),
        ("WanPipeline", {"boundary_ratio": 0.875}, 16, dict(shift=12.0, guidance=4.0, guidance_2=3.0)),
        (
            "WanPipeline",
            {"transformer_2": ["diffusers", "WanTransformer3DModel"]},
            16,
            dict(shift=12.0, steps=40),
        ),
        (
            "WanImageToVideoPipeline",
            {"boundary_ratio": 0.9},
            16,
            dict(shift=5.0, guidance=3.5, guidance_2=3.5),
        ),
        (
            "WanPipeline",
            {"transformer_2": [None, None]},
            16,
            dict(shift=3.0, steps=50, frames=81, height=480),
        ),
        ("WanImageToVideoPipeline", {}, 16, dict(guidance=5.0, guidance_2=None, width=832, fps=16.0)),
    ]
    for i, (cls_name, marks, z_dim, expected) in enumerate(cases):
        folder = tmp_path / str(i)
        folder.mkdir()
        base = {
            k: v for k, v in index.items() if k not in ("expand_timesteps", "boundary_ratio", "transformer_2")
        }
        (folder / "model_index.json").write_text(json.dumps({**base, "_class_name": cls_name, **marks}))
        if z_dim is not None:
            (folder / "vae").mkdir()
            (folder / "vae" / "config.json").write_text(json.dumps({"z_dim": z_dim}))
        cfg = diffusers_pipeline_config(folder)
        assert {k: getattr(cfg, k) for k in expected} == expected, (cls_name, marks, z_dim)


# ------------------------------------------------------------------------------------------ bad input


def test_a_wan21_pipeline_given_wan22_latents_is_one_clear_error(a14b, ti2v):
    """A14B pipelines decode with the Wan 2.1 VAE; TI2V-5B's 48-channel latents are named as another VAE's."""
    pipe21, pipe22 = (VideoPipeline.from_pretrained(f[0]) for f in (a14b, ti2v))
    for pipe, channels, match in ((pipe21, 48, r"48 channels \(as a Wan 2\.2 VAE makes\).* takes 16 channels"),
                                  (pipe22, 16, r"16 channels \(as a Wan 2\.1 VAE makes\).*\(a Wan 2\.2 VAE\) takes 48")):  # fmt: skip
        with pytest.raises(ValueError, match=match) as err:
            pipe.decode(torch.zeros(1, channels, 2, 2, 2))
        assert "\n" not in str(err.value)


def test_a_48_channel_denoiser_with_a_16_channel_vae_is_one_clear_error(ti2v, tmp_path):
    path, _ = ti2v
    pipe = VideoPipeline.from_pretrained(path)
    vae16 = CausalVAE.from_pretrained(_saved(tiny_vae(16), tmp_path / "vae16"))
    with pytest.raises(
        ValueError, match=r"takes 48 and returns 48 latent channels, but the VAE makes 16.*Wan 2\.2"
    ) as err:
        VideoPipeline(vae16, pipe.dit, pipe.text_encoder, pipe.config)
    assert "\n" not in str(err.value)
    mixed = tmp_path / "mixed"
    shutil.copytree(path, mixed)
    shutil.rmtree(mixed / "vae")
    tiny_vae(16).save_pretrained(str(mixed / "vae"))
    with pytest.raises(ValueError, match="but the VAE makes 16"):
        VideoPipeline.from_pretrained(mixed)


def _saved(model, folder):
    model.save_pretrained(str(folder))
    return folder


def test_a_two_expert_folder_missing_an_expert_is_one_clear_error(a14b, tmp_path):
    path, _ = a14b
    for gone, message in (("transformer_2", r"boundary_ratio\) but lacks transformer_2/, the low-noise expert"),
                          ("transformer", r"holds transformer_2/ .* but no transformer/")):  # fmt: skip
        broken = tmp_path / gone
        shutil.copytree(path, broken)
        shutil.rmtree(broken / gone)
        with pytest.raises(FileNotFoundError, match=message) as err:
            VideoPipeline.from_pretrained(broken)
        assert "\n" not in str(err.value)
    pipe = VideoPipeline.from_pretrained(path)
    with pytest.raises(ValueError, match="two experts .* but no boundary"):
        VideoPipeline(pipe.vae, pipe.dit, pipe.text_encoder, pipe.config.__class__(), dit_2=pipe.dit_2)
    other = VideoDiT(pipe.dit.config.__class__(**{**pipe.dit.config.__dict__, "text_dim": 8}))
    with pytest.raises(ValueError, match=r"do not fit one pipeline: text_dim 32 vs 8"):
        VideoPipeline(pipe.vae, pipe.dit, pipe.text_encoder, pipe.config, dit_2=other)
