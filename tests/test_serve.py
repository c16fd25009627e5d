"""``vidlatent serve``'s glue without a browser: the runner runs the CLI's commands and turns their errors into
one line, Cancel stops a sampling loop at its next step, a drawn mask becomes a mask image, the page builds."""

import threading

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image

from vidlatent.diffusion.sampling import denoise
from vidlatent.serve import (
    Cancelled,
    JobRunner,
    _mask_from_drawing,
    _morph_mode_argv,
    _sampling_argv,
    _stop_tqdm_on,
)


def test_runner_runs_the_cli_command_and_reports_the_seed(tmp_path):
    runner = JobRunner("tiny", "cpu", str(tmp_path))
    out = runner.folder() / "out.mp4"
    printed = runner.run(["generate", "a ball", "-o", str(out), "--frames", "5", "--height", "32",
                          "--width", "32", *_sampling_argv(2, None, 3, "euler", None, None, None, 1)])  # fmt: skip
    assert out.exists()
    assert "5 frames, 32x32, seed 3" in printed, printed


def test_jobs_that_load_alike_reuse_the_pipeline_and_start_from_its_config(tmp_path, monkeypatch):
    """The second job reads no weights, and gives what a fresh load gives: the first job's override (steps=1)
    does not stay behind. A job that loads otherwise (fp8) reads the model again."""
    from vidlatent.pipelines import VideoPipeline

    reads = []
    read = VideoPipeline.from_pretrained.__func__
    monkeypatch.setattr(VideoPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: reads.append(a) or read(cls, *a, **k)))  # fmt: skip
    size = ["--frames", "5", "--height", "32", "--width", "32", "--seed", "3", "--sampler", "euler"]

    def frames(runner, name, *extra, overrides=()):
        out = runner.folder() / name
        runner.run(["generate", "a ball", *overrides, "-o", str(out), *size, *extra])
        return np.stack(imageio.mimread(out))

    runner = JobRunner("tiny", "cpu", str(tmp_path))
    frames(runner, "a.gif", overrides=["steps=1"])
    again = frames(runner, "b.gif")
    assert len(reads) == 1
    fresh = frames(JobRunner("tiny", "cpu", str(tmp_path)), "c.gif")
    assert len(reads) == 2 and np.array_equal(again, fresh)
    frames(runner, "d.gif", "--weights-dtype", "fp8")
    assert len(reads) == 3 and runner.reuse.key[3] == "fp8"


def test_a_model_folder_changed_on_disk_is_read_again(tmp_path, monkeypatch):
    """A kept pipeline serves the folder as it was read: a job after its weights were replaced on disk (another
    training export written over it) loads them and gives their frames; an unchanged folder is not read."""
    from vidlatent.pipelines import VideoPipeline

    reads = []
    read = VideoPipeline.from_pretrained.__func__
    monkeypatch.setattr(VideoPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: reads.append(a) or read(cls, *a, **k)))  # fmt: skip
    folder = tmp_path / "model"
    pipe = VideoPipeline.from_pretrained("tiny")
    pipe.save_pretrained(folder)
    size = [
        "--frames",
        "5",
        "--height",
        "32",
        "--width",
        "32",
        "--seed",
        "3",
        "--sampler",
        "euler",
        "--steps",
        "2",
    ]

    def frames(runner, name):
        out = runner.folder() / name
        runner.run(["generate", "a ball", "-o", str(out), *size])
        return np.stack(imageio.mimread(out))

    runner = JobRunner(str(folder), "cpu", str(tmp_path))
    before = frames(runner, "a.gif")
    assert len(reads) == 2 and np.array_equal(frames(runner, "b.gif"), before) and len(reads) == 2
    with torch.no_grad():
        for p in pipe.dit.parameters():
            p.mul_(1.5)
    pipe.dit.save_pretrained(folder / "dit")
    after = frames(runner, "c.gif")
    assert len(reads) == 3 and not np.array_equal(after, before)
    assert np.array_equal(after, frames(JobRunner(str(folder), "cpu", str(tmp_path)), "d.gif"))


def test_the_serve_runtime_flags_reach_every_pipeline_job(tmp_path, capsys):
    """``vidlatent serve --weights-dtype fp8 ...``: every pipeline job loads so (a job's own flag still wins),
    a VAE job (which has no such flags) runs as before, and a bad value is one line before anything starts."""
    from vidlatent.cli import build_parser, main
    from vidlatent.cli.jobs import runtime_argv

    args = build_parser().parse_args(
        ["serve", "--weights-dtype", "fp8", "--split-guidance", "--offload", "model"]
    )
    assert runtime_argv(args) == ["--offload", "model", "--weights-dtype", "fp8", "--split-guidance"]
    assert runtime_argv(build_parser().parse_args(["serve"])) == []
    runner = JobRunner(
        "tiny", "cpu", str(tmp_path), runtime=["--weights-dtype", "fp8", "--attention", "math"]
    )
    size = ["--frames", "5", "--height", "32", "--width", "32", "--steps", "1", "--seed", "3"]
    runner.run(["generate", "a ball", "-o", str(runner.folder() / "a.gif"), *size])
    assert runner.reuse.key[3:6] == (
        "fp8",
        False,
        "math",
    )  # LOAD_OPTIONS: offload, weights_dtype, compile, ...
    runner.run(["generate", "a ball", "-o", str(runner.folder() / "b.gif"), *size, "--attention", "sdpa"])
    assert runner.reuse.key[3:6] == ("fp8", False, "sdpa")
    clip = runner.folder() / "clip.mp4"
    imageio.mimwrite(clip, np.zeros((5, 32, 32, 3), np.uint8), fps=8)
    assert "PSNR" in runner.run(["reconstruct", str(clip), "-o", str(runner.folder() / "r.mp4")])
    capsys.readouterr()  # the jobs' progress bars
    assert main(["serve", "--offload", "bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown offload 'bogus'" in err, err
    assert main(["serve", "--attention", "fastest"]) == 2
    assert "unknown attention 'fastest'; accepted: sdpa," in capsys.readouterr().err


def test_a_bad_upload_is_one_line(tmp_path):
    fake = tmp_path / "clip.mp4"
    fake.write_text("not a video\n")
    runner = JobRunner("tiny", "cpu", str(tmp_path))
    with pytest.raises(ValueError) as err:
        runner.run(["reconstruct", str(fake), "-o", str(tmp_path / "out.mp4")])
    message = str(err.value)
    assert message.startswith("vidlatent reconstruct: ") and "clip.mp4" in message
    assert "\n" not in message


def test_a_bad_option_is_one_line(tmp_path):
    runner = JobRunner("tiny", "cpu", str(tmp_path))
    with pytest.raises(ValueError, match="steps") as err:
        runner.run(["generate", "a ball", "-o", str(tmp_path / "o.mp4"), "--steps", "-2"])
    assert "\n" not in str(err.value)


def test_cancel_stops_the_sampling_loop_at_its_next_step():
    from tqdm import tqdm

    original = tqdm.__iter__
    stop, calls = threading.Event(), []

    def model(x, sigma, context, context_mask=None):
        calls.append(float(sigma[0]))
        return torch.zeros_like(x)

    def hook(step, sigma, x):
        if step == 1:
            stop.set()  # as the page's Cancel button does, from another thread
        return x

    context = torch.zeros(1, 2, 4)
    with pytest.raises(Cancelled), _stop_tqdm_on(stop):
        denoise(model, (1, 4, 1, 2, 2), context, sampler="euler", steps=10, hook=hook, progress=True)
    assert len(calls) == 2  # set during step 1: steps 0 and 1 ran, the loop stopped before step 2 (of 10)
    assert tqdm.__iter__ is original  # the page leaves tqdm as it found it
    assert denoise(model, (1, 4, 1, 2, 2), context, sampler="euler", steps=3, progress=False).shape[0] == 1


def test_a_drawn_mask_becomes_a_white_on_black_image(tmp_path):
    layer = np.zeros((8, 12, 4), np.uint8)
    layer[2:5, 3:7] = (255, 0, 0, 255)
    path = _mask_from_drawing({"background": None, "layers": [layer], "composite": None}, tmp_path)
    mask = np.asarray(Image.open(path))
    assert mask.shape == (8, 12) and mask[2:5, 3:7].min() == 255 and mask.sum() == 255 * 12
    assert _mask_from_drawing({"layers": [np.zeros((8, 12, 4), np.uint8)]}, tmp_path) is None


def test_morph_tab_passes_noise_options_only_in_noise_mode():
    assert _morph_mode_argv("latent", "linear", "a", "b", 0.3) == ["--mode", "latent", "--easing", "linear"]
    assert _morph_mode_argv("noise", "cosine", "", None, None) == ["--mode", "noise", "--easing", "cosine"]
    assert _morph_mode_argv("noise", "linear", "a red ball", "a blue box", 0.25) == [
        "--mode", "noise", "--easing", "linear", "--prompt-a", "a red ball", "--prompt-b", "a blue box",
        "--strength", "0.25",
    ]  # fmt: skip
    assert _morph_mode_argv("latent", "linear", "", "", None, 0.4) == [
        "--mode", "latent", "--easing", "linear", "--stagger", "0.4",
    ]  # fmt: skip


@pytest.mark.slow  # importing gradio: ~8 s on 2 busy cores
def test_the_page_builds_with_a_tab_per_job(tmp_path):
    pytest.importorskip("gradio")
    from vidlatent.serve import build_app

    app = build_app(JobRunner("tiny", "cpu", str(tmp_path)))
    ids = {getattr(block, "elem_id", None) for block in app.blocks.values()}
    for job in ("generate", "edit", "inpaint", "animate", "morph", "control", "reconstruct", "encode"):
        assert f"tab-{job}" in ids and f"{job}-run" in ids, job


def test_serve_is_a_subcommand():
    from vidlatent.cli import build_parser

    args = build_parser().parse_args(["serve", "--port", "7999"])
    assert (args.port, args.host, args.share, args.model) == (7999, "127.0.0.1", False, "default")


def test_empty_fields_leave_the_model_defaults():
    assert _sampling_argv("", None, -1, "model default", " ", "", None, 1) == []
    assert _sampling_argv("4", "0", 5.0, "unipc", "3", "blur", "l.safetensors", 0.5) == [
        "--steps", "4", "--guidance", "0", "--shift", "3", "--seed", "5", "--sampler", "unipc",
        "--negative-prompt", "blur", "--lora", "l.safetensors:0.5",
    ]  # fmt: skip


@pytest.mark.slow  # importing gradio: ~8 s on 2 busy cores
def test_loopback_by_default_public_only_with_a_warning(monkeypatch):
    gr = pytest.importorskip("gradio")
    import warnings

    from vidlatent.serve import serve

    launches = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launches.append(kw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on loopback
        serve("tiny", 7999, device="cpu")
    assert launches[-1]["server_name"] == "127.0.0.1" and launches[-1]["share"] is False
    for kw in ({"host": "0.0.0.0"}, {"share": True}):
        with pytest.warns(UserWarning, match="anyone who reaches it can run jobs"):
            serve("tiny", 7999, device="cpu", **kw)
