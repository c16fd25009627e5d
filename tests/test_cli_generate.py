"""The `vidlatent generate / edit / inpaint / animate / morph` commands on the tiny pipeline: subprocess runs on
ffmpeg-made inputs, reproducible seeds, examples in --help, and one-line errors on bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import imageio_ffmpeg
import pytest
import torch

from vidlatent.cli import main
from vidlatent.data.io import read_video, write_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = ("generate", "edit", "inpaint", "animate", "morph")


def cli(*args) -> subprocess.Popen:
    """Start ``python -m vidlatent.cli ARGS`` (runs alongside the tests; ``finish`` collects it)."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "vidlatent.cli", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def pattern(frames: int, h: int, w: int, phase: float = 0.0) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return 0.8 * torch.stack(
        [torch.stack([torch.sin(3 * x + 0.3 * i + phase), torch.cos(2 * y), x * y]) for i in range(frames)], 1
    )


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    # 7 frames of ffmpeg's test pattern, 56x40 (not multiples of 16: the CLI centre-crops to 48x32)
    subprocess.run(
        [ffmpeg, "-v", "error", "-f", "lavfi", "-i", "testsrc=size=56x40:rate=8", "-frames:v", "7",
         "-pix_fmt", "yuv420p", str(d / "clip.mp4")],
        check=True,
    )  # fmt: skip
    write_video(d / "a.png", pattern(1, 32, 32))
    write_video(d / "b.png", pattern(1, 32, 32, phase=2.0))
    write_video(d / "big.png", pattern(1, 48, 48))
    mask = -torch.ones(3, 1, 40, 56)
    mask[:, :, 8:24, 8:24] = 1
    write_video(d / "mask.png", mask)
    write_video(d / "small_mask.png", -torch.ones(3, 1, 32, 32))
    (d / "corrupt.mp4").write_bytes((d / "clip.mp4").read_bytes()[:400])
    return d


@pytest.fixture(scope="module")
def runs(media, tmp_path_factory):
    """Three jobs as subprocesses, started together (they run while other tests do); the other jobs run
    in-process through ``main`` (the same parser and handlers) to keep the file fast."""
    out = tmp_path_factory.mktemp("out")
    tiny = ["--model", "tiny", "-q"]
    procs = {
        "generate": cli("generate", "a red ball", "-o", out / "gen.mp4", "--seed", 3, "--frames", 5, *tiny),
        "inpaint": cli("inpaint", media / "clip.mp4", "a green square", "--mask", media / "mask.png",
                       "-o", out / "inpaint.gif", "--seed", 1, *tiny),
        "morph": cli("morph", media / "a.png", media / "b.png", "--frames", 6, "-o", out / "morph.mp4", *tiny),
    }  # fmt: skip
    return out, procs


def frames_of(path):
    video, info = read_video(path, temporal_factor=1)
    return video, info


@pytest.mark.slow  # measured over ~4 s on 2 idle cores; run by .ci/run in its slow step
@pytest.mark.parametrize(
    "job, name, shape",
    [
        ("generate", "gen.mp4", (3, 5, 32, 32)),
        ("inpaint", "inpaint.gif", (3, 5, 32, 48)),  # 7 frames trimmed to 5; 56x40 centre-cropped to 48x32
        ("morph", "morph.mp4", (3, 6, 32, 32)),
    ],
)
def test_jobs_in_a_subprocess_write_their_videos(runs, job, name, shape):
    out, procs = runs
    done = finish(procs[job])
    assert f"wrote {out / name}" in done.stdout
    assert tuple(frames_of(out / name)[0].shape) == shape
    # no temporary file of this job left behind (the other jobs may still be writing theirs beside it)
    assert not any(p.name.startswith(f".{name}.") for p in out.iterdir())
    if job == "inpaint":  # the input's crop is reported, once
        assert done.stderr.count("read at 56x40, was centre-cropped to 48x32") == 1
        assert done.stderr.count("7 frames selected, the last 2 dropped to make 1+4k") == 1


@pytest.mark.parametrize(
    "argv, name, shape",
    [
        (["edit", "{media}/clip.mp4", "a blue box", "--strength", "0.5", "--seed", "1", "steps=3"], "edit.mp4",
         (3, 5, 32, 48)),
        (["animate", "{media}/a.png", "moves right", "--frames", "9", "--sampler", "euler"], "animate.mp4",
         (3, 9, 32, 32)),
        (["morph", "{media}/a.png", "{media}/b.png", "--frames", "3", "--mode", "noise", "--prompt-a", "red",
          "--prompt-b", "blue", "--steps", "4"], "noise.webm", (3, 3, 32, 32)),
        (["morph", "{media}/a.png", "{media}/b.png", "--frames", "4", "--mode", "noise", "--strength", "1",
          "--steps", "2", "--stagger", "0.5"], "deep.gif", (3, 4, 32, 32)),
        (["edit", "{media}/a.png", "a blue box", "--height", "16", "--width", "16"], "edit.png", (3, 1, 16, 16)),
        (["edit", "{media}/clip.mp4", "a blue box", "--source-prompt", "a red box", "--source-guidance", "2",
          "--strength", "0.5", "steps=3"], "flow.mp4", (3, 5, 32, 48)),
    ],
)  # fmt: skip
def test_jobs_in_process_write_their_videos(media, tmp_path, capsys, argv, name, shape):
    argv = [a.format(media=media) for a in argv] + ["-o", str(tmp_path / name), "--model", "tiny", "-q"]
    assert main(argv) == 0
    assert f"wrote {tmp_path / name}" in capsys.readouterr().out
    assert tuple(frames_of(tmp_path / name)[0].shape) == shape


def test_a_seed_reproduces_the_subprocess_run_in_process(runs, tmp_path, capsys):
    out, procs = runs
    done = finish(procs["generate"])
    assert "seed 3" in done.stdout
    assert main(["generate", "a red ball", "-o", str(tmp_path / "again.mp4"), "--seed", "3", "--frames", "5",
                 "--model", "tiny", "-q"]) == 0  # fmt: skip
    first, again = frames_of(out / "gen.mp4")[0], frames_of(tmp_path / "again.mp4")[0]
    assert torch.equal(first, again)
    assert main(["generate", "a red ball", "-o", str(tmp_path / "other.mp4"), "--seed", "4", "--frames", "5",
                 "--model", "tiny", "-q"]) == 0  # fmt: skip
    assert not torch.equal(first, frames_of(tmp_path / "other.mp4")[0])


def test_options_come_from_flags_overrides_and_config_files(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text("steps: 2\nfps: 4\n")
    argv = ["generate", "a ball", "-o", str(tmp_path / "img.png"), "--frames", "1", "--height", "16",
            "--width", "48", "--model", "tiny", "-q", "--config", str(config), "guidance=1", "--seed", "0"]  # fmt: skip
    assert main(argv) == 0
    image, _ = frames_of(tmp_path / "img.png")
    assert tuple(image.shape) == (3, 1, 16, 48)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("job", JOBS)
def test_help_shows_an_example(job, capsys):
    with pytest.raises(SystemExit) as done:
        main([job, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "example" in text and f"vidlatent {job} " in text


def one_line_error(capsys, argv, match: str) -> None:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"vidlatent {argv[0]}: error:"), err
    assert match in err, err


def test_bad_inputs_exit_with_one_line(media, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("vidlatent.checkpoint.WEIGHTS_DIR", tmp_path / "missing")
    out, tiny = tmp_path / "out.mp4", ["--model", "tiny", "-q"]
    cases = [
        (["edit", tmp_path / "missing.mp4", "a ball", "-o", out, *tiny], "no such file"),
        (["edit", media / "corrupt.mp4", "a ball", "-o", out, *tiny], "corrupt.mp4"),
        (["inpaint", media / "clip.mp4", "a ball", "--mask", media / "small_mask.png", "-o", out, *tiny],
         "is 32x32 but the input is 56x40"),
        (["generate", "a ball", "--frames", "6", "-o", out, *tiny], "frames must be 1 + 4k"),
        (["animate", media / "a.png", "a ball", "--frames", "8", "-o", out, *tiny], "frames must be 1 + 4k"),
        (["edit", media / "clip.mp4", "a ball", "--frame-policy", "none", "-o", out, *tiny],
         "7 frames selected, but frame_policy='none' needs 1 + 4k"),
        (["generate", "a ball", "--sampler", "ddim", "-o", out, *tiny], "unknown sampler 'ddim'"),
        (["edit", media / "clip.mp4", "a ball", "--source-guidance", "2", "-o", out, *tiny], "give --source-prompt"),
        (["edit", media / "clip.mp4", "a ball", "--source-prompt", "a box", "--sampler", "dpm", "-o", out, *tiny],
         "runs on the euler grid"),
        (["generate", "a ball", "-o", out, *tiny, "stepz=3"], "Key 'stepz' not in 'PipelineConfig'"),
        (["generate", "a ball", "-o", tmp_path / "out.avi", *tiny], "cannot write"),
        (["generate", "a ball", "-o", tmp_path / "out.png", *tiny], "holds one image but the output has 5"),
        (["morph", media / "a.png", media / "big.png", "-o", out, *tiny], "give --height and --width"),
        (["morph", media / "a.png", media / "b.png", "--strength", "0.5", "-o", out, *tiny],
         "strength applies to mode='noise' only"),
        (["morph", media / "a.png", media / "b.png", "--mode", "noise", "--strength", "0", "-o", out, *tiny],
         "strength must be in (0, 1]; got 0.0"),
        (["morph", media / "a.png", media / "b.png", "--stagger", "1", "-o", out, *tiny],
         "must be in [0.0, 1.0); got 1.0"),
        (["generate", "a ball", "-o", out, "-q"], "default model is not installed"),
    ]  # fmt: skip
    for argv, match in cases:
        one_line_error(capsys, argv, match)
    assert not out.exists()


def test_bad_input_in_a_subprocess_exits_2_with_one_line(media, tmp_path):
    proc = cli("inpaint", media / "clip.mp4", "x", "--mask", media / "small_mask.png", "-o", tmp_path / "o.mp4",
               "--model", "tiny")  # fmt: skip
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert stderr.strip().splitlines() == [
        f"vidlatent inpaint: error: mask {media / 'small_mask.png'} is 32x32 but the input is 56x40"
    ]
