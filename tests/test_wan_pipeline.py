"""A diffusers Wan 2.1 T2V folder run through our pipeline gives what diffusers' ``WanPipeline`` gives, end to
end with the same start noise (not only part by part): text padding and masking, the timesteps the model
sees and the folder's scheduler settings are read from the folder. Also: its defaults, ``noise=``, the CLI
on a diffusers root, and ``vidlatent convert`` of the root into a pipeline folder that runs the same."""

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
import torch
from wan_folders import wan_t2v_root

from vidlatent import VideoPipeline
from vidlatent.cli import main
from vidlatent.diffusion.sampling import make_scheduler
from vidlatent.models.text import wan_clean

PROMPT, NEGATIVE = "a red circle moving left", "blue square"
SIZE = dict(height=64, width=64, num_frames=9)
LATENT_SHAPE = (1, 4, 3, 8, 8)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("wan") / "Wan-T2V-tiny-Diffusers"
    return path, wan_t2v_root(path)


def start_noise(seed=0):
    return torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(seed))


def reference(ref, noise, steps=8, guidance=5.0, scheduler=None):
    """diffusers' WanPipeline: (video in [-1, 1] as (b, c, t, h, w), normalized latents)."""
    if scheduler is not None:
        ref = type(ref)(**{**ref.components, "scheduler": scheduler})
        ref.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=guidance)
    kw.update(SIZE)
    video = ref(**kw, latents=noise.clone(), output_type="pt").frames * 2 - 1  # (b, t, c, h, w) in [-1, 1]
    latents = ref(**kw, latents=noise.clone(), output_type="latent").frames
    return video.permute(0, 2, 1, 3, 4), latents


def ours(pipe, noise, steps=8, guidance=5.0, **kw):
    common = dict(steps=steps, guidance=guidance, noise=noise.clone(), progress=False, **kw)
    video = pipe.generate(PROMPT, NEGATIVE, **common)
    return video, pipe.generate(PROMPT, NEGATIVE, output_type="latent", **common)


@pytest.mark.parametrize("sampler", ["unipc", pytest.param("euler", marks=pytest.mark.slow)])
def test_t2v_equals_wan_pipeline(root, sampler):
    from diffusers import FlowMatchEulerDiscreteScheduler

    path, ref = root
    pipe = VideoPipeline.from_pretrained(path)
    noise = start_noise()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0) if sampler == "euler" else None
    ref_video, ref_latents = reference(ref, noise, scheduler=scheduler)
    video, latents = ours(pipe, noise, sampler=None if sampler == "unipc" else sampler)
    assert video.shape == ref_video.shape == (1, 3, 9, 64, 64)
    assert (video.clamp(-1, 1) - ref_video).abs().max() <= 1e-3
    assert (latents - ref_latents).abs().max() <= 1e-4 * ref_latents.abs().max()
    assert ref_video.std() > 0.2  # a real video, not a blank one that would match anything


@pytest.mark.slow
def test_each_wan_convention_matters(root):
    """Our own conventions (masked text, continuous timesteps) would give another video: the test above can fail."""
    path, ref = root
    pipe = VideoPipeline.from_pretrained(path)
    noise = start_noise(1)
    ref_video, _ = reference(ref, noise, steps=6)
    wan = dataclasses.replace(pipe.config)
    for change in ({"text_attention": "masked"}, {"timesteps": "continuous"}):
        pipe.config = dataclasses.replace(wan, **change)
        video, _ = ours(pipe, noise, steps=6)
        assert (video.clamp(-1, 1) - ref_video).abs().max() > 1e-2, change


def test_the_folders_scheduler_settings_are_used():
    config = {"_class_name": "UniPCMultistepScheduler", "solver_order": 1, "flow_shift": 7.0, "use_flow_sigmas": True,
              "prediction_type": "flow_prediction"}  # fmt: skip
    scheduler = make_scheduler("unipc", 3.0, config)
    assert (scheduler.config.solver_order, scheduler.config.flow_shift) == (1, 3.0)  # the shift given wins
    # a config for another sampler is not used
    assert make_scheduler("euler", 3.0, config).config.shift == 3.0


def test_folder_defaults_and_shift(root, tmp_path):
    path, _ = root
    cfg = VideoPipeline.from_pretrained(path).config
    assert (cfg.steps, cfg.guidance, cfg.frames, cfg.height, cfg.width) == (50, 5.0, 81, 480, 832)
    assert (cfg.fps, cfg.negative_prompt) == (16.0, "")
    assert (cfg.sampler, cfg.shift, cfg.text_attention, cfg.timesteps) == ("unipc", 3.0, "all", "scheduler")
    assert cfg.scheduler_config["solver_order"] == 2
    # a 720p folder's flow_shift=5 is the sampler's shift, not our default
    copy = tmp_path / "wan720"
    shutil.copytree(path, copy)
    sched = copy / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "flow_shift": 5.0}))
    assert VideoPipeline.from_pretrained(copy).config.shift == 5.0


def test_noise_sets_the_size_and_is_checked(root):
    pipe = VideoPipeline.from_pretrained(root[0])
    video = pipe.generate(PROMPT, steps=2, guidance=1.0, noise=start_noise(), progress=False)
    assert video.shape == (1, 3, 9, 64, 64)
    with pytest.raises(ValueError, match=r"noise must be float latents of shape \(1, 4, 3, 8, 8\)"):
        pipe.generate(PROMPT, frames=9, height=64, width=64, steps=2, noise=torch.randn(1, 4, 2, 8, 8))


def test_wan_prompt_clean_up():
    assert wan_clean("  a red &amp;amp; blue\n\tcircle  ") == "a red & blue circle"


@pytest.mark.slow
def test_convert_root_runs_the_same(root, tmp_path, capsys):
    path, ref = root
    out = tmp_path / "converted"
    assert main(["convert", str(path), "-o", str(out), "-q"]) == 0
    assert "wrote pipeline" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"vae", "dit", "text_encoder", "pipeline.json"}
    saved = json.loads((out / "pipeline.json").read_text())
    assert (saved["text_attention"], saved["timesteps"], saved["steps"]) == ("all", "scheduler", 50)
    noise = start_noise(2)
    direct, _ = ours(VideoPipeline.from_pretrained(path), noise, steps=5)
    converted, _ = ours(VideoPipeline.from_pretrained(out), noise, steps=5)
    assert torch.equal(direct, converted)
    ref_video, _ = reference(ref, noise, steps=5)
    assert (converted.clamp(-1, 1) - ref_video).abs().max() <= 1e-3
    # the output is written whole or not at all, and never over an existing folder
    assert main(["convert", str(path), "-o", str(out)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_mixed_layouts_are_refused(root, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(root[0], mixed)
    (mixed / "pipeline.json").write_text("{}")
    with pytest.raises(ValueError, match="mixes layouts"):
        VideoPipeline.from_pretrained(mixed)


@pytest.mark.slow
def test_cli_generate_on_a_diffusers_root_quietly(root, tmp_path):
    out = tmp_path / "clip.gif"
    cmd = [sys.executable, "-m", "vidlatent.cli", "generate", PROMPT, "-o", str(out), "--model", str(root[0]),
           "--frames", "5", "--height", "32", "--width", "32", "--steps", "2", "--seed", "0", "-q"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert out.is_file()
    # no progress bar, transformers' loading bar included
    assert "it/s" not in run.stderr and "%|" not in run.stderr, run.stderr
