"""The control job: ``VideoPipeline.control`` on a tiny diffusers VACE folder equals ``WanVACEPipeline`` end to
end, LoRAs and sampling options apply, a fresh branch at any scale (and any branch at scale 0) is ``generate``
exactly; loading and saving a branch (``control/``, ``load_control``); ``vidlatent control`` and its errors."""

from dataclasses import replace

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file
from test_control_pipeline import (
    NEGATIVE,
    PROMPT,
    SCALES,
    H,
    T,
    W,
    _prompt_clean_without_ftfy,  # noqa: F401  (an autouse fixture)
    frames_and_masks,
    reference_run,
)
from test_lora_inference import block_modules, factors, kohya_keys
from vace_folders import VACE_LAYERS, wan_vace_root

from vidlatent.cli import main
from vidlatent.config import control_config_for
from vidlatent.data.io import read_video, write_video
from vidlatent.models.control import ControlBranch
from vidlatent.pipelines import VideoPipeline


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("vace") / "Wan-VACE-tiny-Diffusers"
    ref = wan_vace_root(path)
    return path, ref


@pytest.fixture(scope="module")
def pipe(root):
    return VideoPipeline.from_pretrained(root[0])


def fresh_branch(pipe, seed=0) -> ControlBranch:
    c, sf = pipe.vae.config.latent_channels, pipe.vae.spatial_factor
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ControlBranch(control_config_for(pipe.dit.config, in_channels=2 * c + sf * sf)).eval()


def job(pipe, noise, **kw):
    _, ours = frames_and_masks()
    kw = {"mask": ours["mask"], "reference": ours["reference"], "scale": SCALES, "negative_prompt": NEGATIVE,
          "guidance": 5.0, "steps": 4, "noise": noise.clone(), "progress": False, **kw}  # fmt: skip
    return pipe.control(PROMPT, ours["video"], **kw)


def test_a_vace_folder_loads_with_its_branch(pipe, root):
    assert pipe.control_branch is not None and pipe.control_branch.config.layers == VACE_LAYERS
    assert type(pipe.dit).__name__ == "VideoDiT"  # the denoiser alone: LoRAs and every other job as before
    assert pipe.config.sampler == "unipc" and pipe.config.timesteps == "scheduler"


@pytest.mark.slow  # 12-40 CPU-s (diffusers' run too); the fast set has test_control_pipeline's parity
def test_the_job_equals_wan_vace_pipeline(pipe, root):
    _, ref = root
    noise = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = reference_run(ref, noise, 3, "pt").permute(0, 2, 1, 3, 4) * 2 - 1
    video = job(pipe, noise, steps=3)
    diff = (video - expected).abs().max().item()
    print(f"control job vs WanVACEPipeline: max abs {diff:.2e}")
    assert video.shape == (1, 3, T, H, W) and diff <= 1e-3 and expected.std() > 0.2
    latents = job(pipe, noise, output_type="latent")
    assert latents.shape == (1, 4, 3, 8, 8)  # the reference frame dropped


def test_a_lora_changes_the_output(pipe, tmp_path):
    noise = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    base = job(pipe, noise, steps=2, output_type="latent")
    path = tmp_path / "style.safetensors"
    save_file(kohya_keys(factors(pipe.dit, block_modules(pipe.dit.config), seed=3)), str(path))
    pipe.load_lora(path)
    try:
        assert (job(pipe, noise, steps=2, output_type="latent") - base).abs().max() > 1e-2
    finally:
        pipe.unload_lora()
    assert torch.equal(job(pipe, noise, steps=2, output_type="latent"), base)


def test_scale_zero_and_a_fresh_branch_are_generate():
    pipe = VideoPipeline.from_pretrained("tiny")
    pipe.load_control(fresh_branch(pipe))
    control = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    kw = dict(steps=2, seed=3, guidance=3.0, output_type="latent", progress=False)
    plain = pipe.generate("a red ball", frames=5, height=32, width=32, **kw)
    assert torch.equal(pipe.control("a red ball", control, **kw), plain)  # zero hint projections
    with torch.no_grad():
        for p in pipe.control_branch.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert not torch.equal(pipe.control("a red ball", control, **kw), plain)
    assert torch.equal(pipe.control("a red ball", control, scale=0.0, **kw), plain)
    with pytest.raises(ValueError, match="control_scale must be a finite number"):
        pipe.control("a red ball", control, scale=float("nan"), **kw)
    with pytest.raises(ValueError, match=r"control_scale must be in \[0.0, 100.0\]; got -0.5"):
        pipe.control("a red ball", control, scale=[1.0, -0.5], **kw)  # per hint: each checked
    with pytest.raises(ValueError, match="one number, one per hint"):
        pipe.control("a red ball", control, scale="strong", **kw)


def test_the_pipeline_config_gives_the_control_job_s_scale_and_guidance(tmp_path):
    """``control_scale`` / ``control_guidance`` of a folder's pipeline.json are the control job's defaults: a call
    without scale or guidance runs with them, a call that gives them runs with its own, and other jobs keep
    ``guidance``."""
    from vidlatent.config import PipelineConfig

    pipe = VideoPipeline.from_pretrained("tiny")
    pipe.load_control(fresh_branch(pipe))
    with torch.no_grad():
        for p in pipe.control_branch.parameters():
            p.add_(0.1 * torch.randn_like(p))
    control = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    kw = dict(steps=2, seed=3, output_type="latent", progress=False)
    explicit = pipe.control("a red ball", control, scale=0.5, guidance=1.0, **kw)
    assert pipe.config.control_scale == 1.0 and pipe.config.control_guidance is None
    assert (pipe.control("a red ball", control, **kw) - explicit).abs().max() > 1e-3
    pipe.save_pretrained(tmp_path / "p")
    settings = tmp_path / "p" / "pipeline.json"
    settings.write_text(settings.read_text().replace('"control_scale": 1.0', '"control_scale": 0.5')
                        .replace('"control_guidance": null', '"control_guidance": 1.0'))  # fmt: skip
    loaded = VideoPipeline.from_pretrained(tmp_path / "p")
    assert (loaded.config.control_scale, loaded.config.control_guidance) == (0.5, 1.0)
    # not bitwise: loaded weights sit at other memory alignments, and CPU kernels then round differently
    close = dict(rtol=0, atol=1e-5)
    torch.testing.assert_close(loaded.control("a red ball", control, **kw), explicit, **close)
    given = loaded.control("a red ball", control, scale=1.0, guidance=3.0, **kw)
    torch.testing.assert_close(
        given, pipe.control("a red ball", control, scale=1.0, guidance=3.0, **kw), **close
    )
    plain = dict(frames=5, height=32, width=32, **kw)
    torch.testing.assert_close(
        loaded.generate("a red ball", **plain), pipe.generate("a red ball", **plain), **close
    )
    with pytest.raises(ValueError, match="control_scale"):
        from vidlatent.config.pipeline import check_pipeline_config

        check_pipeline_config(PipelineConfig(control_scale=-1.0))


def test_control_folder_round_trip(pipe, tmp_path):
    noise = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    pipe.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "control" / "model.safetensors").is_file()
    loaded = VideoPipeline.from_pretrained(tmp_path / "ours")
    a, b = job(pipe, noise, steps=2, output_type="latent"), job(loaded, noise, steps=2, output_type="latent")
    assert torch.equal(a, b)
    branch = ControlBranch.from_pretrained(tmp_path / "ours" / "control")
    assert branch.config == pipe.control_branch.config


def test_load_control_errors_name_both_shapes(pipe, tmp_path):
    tiny = VideoPipeline.from_pretrained("tiny")
    assert tiny.control_branch is None
    with pytest.raises(ValueError, match="no control branch.*load_control"):
        tiny.control("a ball", torch.zeros(1, 3, 5, 32, 32), steps=1)
    wide = replace(tiny.dit.config, dim=128, ffn_dim=256)
    ControlBranch(
        control_config_for(wide, in_channels=pipe.control_branch.config.in_channels)
    ).save_pretrained(tmp_path / "wide")
    with pytest.raises(
        ValueError, match=r"for a denoiser of .* = \(128, 2, 256, .*this denoiser has \(64, 2, 128"
    ):
        tiny.load_control(tmp_path / "wide")
    assert tiny.control_branch is None
    c = tiny.vae.config.latent_channels
    wrong = ControlBranch(control_config_for(tiny.dit.config, in_channels=2 * c))
    with pytest.raises(ValueError, match=rf"latents of {2 * c} channels; this VAE makes {2 * c + 64}"):
        tiny.load_control(wrong)
    with pytest.raises(ValueError, match="not a control branch folder"):
        tiny.load_control(tmp_path)


def test_bad_inputs(pipe):
    _, ours = frames_and_masks()
    kw = dict(steps=1, progress=False)
    with pytest.raises(ValueError, match=r"9 frames of 64x64 .* asked for is 5 frames of 64x64"):
        pipe.control(PROMPT, ours["video"], frames=5, **kw)
    with pytest.raises(
        ValueError, match=r"one channel, \(b, 1, t, h, w\) = \(1, 1, 9, 64, 64\).*got \(1, 3, 9"
    ):
        pipe.control(PROMPT, ours["video"], mask=ours["video"], **kw)
    with pytest.raises(ValueError, match=r"mask is 32x32 but the control video is 64x64"):
        pipe.control(PROMPT, ours["video"], mask=torch.ones(32, 32), **kw)


# ------------------------------------------------------------------------------------------------ CLI


def write_inputs(folder):
    (_, _, pil_ref), ours = frames_and_masks()
    write_video(folder / "control.gif", ours["video"][0], fps=8)
    mask = np.zeros((H, W), np.uint8)
    mask[8:40, 16:48] = 255
    PIL.Image.fromarray(mask).save(folder / "mask.png")
    PIL.Image.fromarray(np.dstack([mask, mask * 0, mask])).save(folder / "colour.png")
    PIL.Image.fromarray(mask[:32]).save(folder / "short.png")
    pil_ref.save(folder / "ref.png")


def test_cli_control(root, tmp_path, capsys):
    write_inputs(tmp_path)
    args = ["control", str(tmp_path / "control.gif"), PROMPT, "--model", str(root[0]), "--seed", "1",
            "--steps", "2", "-q", "--mask", str(tmp_path / "mask.png"), "--reference", str(tmp_path / "ref.png")]  # fmt: skip
    assert main([*args, "-o", str(tmp_path / "out.gif"), "--scale", "0.5,1"]) == 0
    video, _ = read_video(tmp_path / "out.gif")
    assert video.shape == (3, T, H, W)
    assert "seed 1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mask", "colour.png"], "the mask must be one channel"),
        (["--mask", "short.png"], "mask .*short.png is 64x32 but the input is 64x64"),
        (["--scale", "1,2,3"], r"control_scale must be one float, 2 floats"),
    ],
)
def test_cli_errors_are_one_line(root, tmp_path, capsys, extra, message):
    write_inputs(tmp_path)
    extra = [str(tmp_path / x) if x.endswith(".png") else x for x in extra]
    args = ["control", str(tmp_path / "control.gif"), PROMPT, "--model", str(root[0]), "--steps", "1", "-q"]
    assert main([*args, "-o", str(tmp_path / "out.gif"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vidlatent control: error:"), err
    assert __import__("re").search(message, err), err


def test_cli_without_a_branch_says_how_to_get_one(tmp_path, capsys):
    write_inputs(tmp_path)
    args = [
        "control",
        str(tmp_path / "control.gif"),
        "a ball",
        "--model",
        "tiny",
        "-o",
        str(tmp_path / "o.gif"),
    ]
    assert main([*args, "--steps", "1", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no control branch" in err and "--control-branch" in err


def test_control_branch_loads_with_overrides(tmp_path):
    # every loader takes from_pretrained(src, device=, dtype=, overrides=): the branch's overrides are ControlConfig fields
    from vidlatent.config import DiTConfig, control_config_for, load_config
    from vidlatent.models.control import ControlBranch

    branch = ControlBranch(control_config_for(load_config(DiTConfig, "dit", "tiny"), [0], 16))
    branch.save_pretrained(tmp_path / "control")
    again = ControlBranch.from_pretrained(tmp_path / "control", overrides=["gradient_checkpointing=true"])
    assert again.config.gradient_checkpointing and not branch.config.gradient_checkpointing
    for a, b in zip(branch.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="no_such_field"):
        ControlBranch.from_pretrained(tmp_path / "control", overrides={"no_such_field": 1})
