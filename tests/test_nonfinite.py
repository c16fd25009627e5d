"""Non-finite values never pass silently: option ranges, NaN/inf weights at load, and the sampling, encoding and
decoding checks that stop with an error naming the step and the likely cause (issue 21, point 1)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from vidlatent import VideoPipeline
from vidlatent.checks import NonFiniteError, all_finite, check_number, check_option, nonfinite_names
from vidlatent.cli import main
from vidlatent.diffusion.sampling import denoise, flow_edit, invert
from vidlatent.pipelines.encode import encode_clips, load_vae


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    return tiny_pipe


@pytest.fixture(scope="module")
def folder(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "tiny"
    pipe.save_pretrained(path)
    return path


def poison(file, key_part: str = "", value=float("nan")) -> str:
    """Put ``value`` into the first weight of a safetensors file whose name contains ``key_part``."""
    state = load_file(file)
    key = next(k for k in sorted(state) if key_part in k and state[k].is_floating_point())
    state[key].view(-1)[0] = value
    save_file(state, file)
    return key


def one_line(capsys, argv, match) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    return err


@pytest.mark.parametrize(
    "name, value, match",
    [
        ("guidance", math.nan, "finite"),
        ("guidance", math.inf, "finite"),
        ("guidance", -1.0, r"\[0.0, 100.0\]"),
        ("shift", 0.0, r"\(0.0, 1000.0\]"),
        ("strength", 1.5, r"\[0.0, 1.0\]"),
        ("fps", -math.inf, "finite"),
        ("steps", 2.5, "an integer"),
        ("steps", True, "an integer"),
    ],
)
def test_option_ranges(name, value, match):
    with pytest.raises(ValueError, match=match):
        check_option(name, value)


def test_numbers_in_range_pass():
    assert check_option("guidance", 5.0) == 5.0 and check_option("steps", 20) == 20
    assert check_option("fps", None) is None  # None: use the default
    assert check_number("x", torch.tensor(0.5), 0, 1) == 0.5


def test_finite_scans():
    x = torch.randn(4, 5)
    assert all_finite(x) and all_finite(torch.arange(3))
    x[1, 2] = math.inf
    assert not all_finite(x)
    big = torch.full((4096,), 60000.0, dtype=torch.float16)  # the fp16 sum overflows; every value is finite
    assert all_finite(big) and nonfinite_names([("big", big)]) == []
    assert nonfinite_names([("ok", torch.ones(3)), ("bad", x), ("n", torch.tensor([math.nan]))]) == [
        "bad",
        "n",
    ]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--guidance", "nan"], "argument --guidance: must be a finite number; got nan"),
        (["--guidance", "inf"], "must be a finite number; got inf"),
        (["--shift", "0"], "argument --shift: must be in (0.0, 1000.0]; got 0.0"),
        (["--fps", "inf"], "argument --fps: must be a finite number"),
        (["--steps", "0"], "argument --steps: must be in [1, 10000]; got 0"),
        (["guidance=nan"], "guidance must be a finite number; got nan"),
        (["shift=-inf"], "shift must be a finite number"),
        (["fps=0"], "fps must be in (0.0, 1000.0]"),
    ],
)
def test_cli_refuses_non_finite_and_out_of_range_options(tmp_path, capsys, argv, match):
    out = tmp_path / "x.mp4"
    one_line(capsys, ["generate", "a ball", "-o", out, "--model", "tiny", "-q", *argv], match)
    assert not out.exists()


def test_cli_refuses_non_finite_strength_and_source_guidance(tmp_path, capsys):
    for argv, match in [
        (["--strength", "nan"], "argument --strength: must be a finite number"),
        (["--source-prompt", "a", "--source-guidance", "inf"], "argument --source-guidance"),
    ]:
        one_line(capsys, ["edit", "in.png", "b", "-o", tmp_path / "x.png", "-q", *argv], match)


def test_library_jobs_check_their_options(pipe):
    for kwargs, match in [
        ({"guidance": math.nan}, "guidance must be a finite number"),
        ({"shift": math.inf}, "shift must be a finite number"),
        ({"steps": 0}, "steps must be in"),
    ]:
        with pytest.raises(ValueError, match=match):
            pipe.generate("a", frames=1, height=16, width=16, seed=0, progress=False, **kwargs)
    video = torch.zeros(1, 3, 1, 16, 16)
    with pytest.raises(ValueError, match="strength must be in"):
        pipe.edit(video, "a", strength=math.nan, progress=False)
    with pytest.raises(ValueError, match="source_guidance must be a finite"):
        pipe.edit(video, "a", source_prompt="b", source_guidance=math.nan, steps=2, progress=False)


class Exploding(torch.nn.Module):
    """A velocity model that returns inf once sigma drops below ``at``."""

    def __init__(self, at: float):
        super().__init__()
        self.at, self.w = at, torch.nn.Parameter(torch.ones(()))

    def forward(self, x, sigma, context, mask=None):
        return x * self.w + (math.inf if float(sigma[0]) < self.at else 0.0)


def test_sampling_stops_at_the_step_that_went_non_finite():
    context = torch.zeros(1, 2, 4)
    with pytest.raises(
        NonFiniteError, match=r"went NaN/inf at step 4 of 8 \(sigma 0\.\d+\): likely bad options"
    ):
        denoise(Exploding(0.7), (1, 2, 1, 2, 2), context, sampler="euler", steps=8, progress=False)
    with pytest.raises(NonFiniteError, match="at step 4 of 8"):
        flow_edit(Exploding(0.7), torch.zeros(1, 2, 1, 2, 2), context, None, context, steps=8, progress=False)
    with pytest.raises(NonFiniteError, match="at step 1 of 4"):
        invert(Exploding(2.0), torch.zeros(1, 2, 1, 2, 2), context, steps=4, progress=False)
    with pytest.raises(NonFiniteError, match="float16 overflow"):
        denoise(Exploding(0.7).half(), (1, 2, 1, 2, 2), context, sampler="euler", steps=8, progress=False)


def test_nan_weight_in_the_denoiser_names_the_tensor(pipe):
    broken = VideoPipeline(pipe.vae, pipe.dit, pipe.text_encoder, pipe.config)
    broken.dit = type(pipe.dit)(pipe.dit.config).eval()
    broken.dit.load_state_dict(pipe.dit.state_dict())
    name, weight = next(iter(broken.dit.named_parameters()))
    with torch.no_grad():
        weight.view(-1)[0] = math.nan
    with pytest.raises(NonFiniteError, match=rf"at step 1 of 3 .*denoiser has NaN/inf weights \({name}\)"):
        broken.generate("a", frames=1, height=16, width=16, steps=3, seed=0, progress=False)


def test_nan_in_the_vae_stops_encode_and_decode(pipe):
    vae = load_vae("tiny")[0]
    with torch.no_grad():
        next(p for n, p in vae.decoder.named_parameters() if n.endswith("bias")).view(-1)[0] = math.inf
    broken = VideoPipeline(vae, pipe.dit, pipe.text_encoder, pipe.config)
    z = broken.encode(torch.zeros(1, 3, 1, 16, 16))  # the encoder is whole
    with pytest.raises(
        NonFiniteError, match=r"VAE decoding went NaN/inf: the VAE has NaN/inf weights \(decoder\."
    ):
        broken.decode(z)
    with pytest.raises(NonFiniteError, match="the latents to decode went NaN/inf"):
        pipe.decode(torch.full_like(z, math.nan))
    with pytest.raises(NonFiniteError, match="the input video went NaN/inf"):
        pipe.encode(torch.full((1, 3, 1, 16, 16), math.nan))


def test_encode_clips_lists_a_clip_whose_latents_went_non_finite(tmp_path):
    from vidlatent.data.io import write_video

    write_video(tmp_path / "a.png", torch.zeros(3, 1, 16, 16))
    vae = load_vae("tiny")[0]
    with torch.no_grad():
        next(p for n, p in vae.encoder.named_parameters() if n.endswith("bias")).view(-1)[0] = math.nan
    report = encode_clips([tmp_path / "a.png"], tmp_path / "lat", vae, progress=False)
    assert (
        len(report.failed) == 1
        and "VAE encoding went NaN/inf: the VAE has NaN/inf weights" in report.failed[0][1]
    )
    assert not (tmp_path / "lat").exists() or not list((tmp_path / "lat").iterdir())


def test_model_folder_with_a_nan_weight_is_refused_at_load(folder, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    key = poison(broken / "dit" / "model.safetensors", "blocks")
    err = one_line(
        capsys, ["generate", "a", "-o", tmp_path / "x.mp4", "--model", broken, "-q"], "NaN/inf weights"
    )
    assert f"the denoiser of {broken} has NaN/inf weights ({key})" in err
    shutil.copytree(folder / "vae", tmp_path / "vae")
    poison(tmp_path / "vae" / "model.safetensors", "decoder.", math.inf)
    clip = tmp_path / "a.png"
    from vidlatent.data.io import write_video

    write_video(clip, torch.zeros(3, 1, 16, 16))
    one_line(capsys, ["encode", clip, "-o", tmp_path / "lat", "--model", tmp_path / "vae"], "the VAE at")
    assert not (tmp_path / "x.mp4").exists() and not (tmp_path / "lat").exists()
