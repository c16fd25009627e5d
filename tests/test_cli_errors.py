"""No tracebacks for user errors (issue 21, point 2): every job run on a damaged model folder of each kind
ends with one line naming the file and exit status 2; the output location is checked before any work;
``--debug`` / ``VIDLATENT_DEBUG=1`` show the traceback."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vidlatent import VideoPipeline
from vidlatent.cli import main
from vidlatent.data.io import write_video
from vidlatent.pipelines.encode import encode_clips

PARTS = ("vae", "dit", "text_encoder")
USES = {  # the parts of a pipeline folder each job loads (the VAE jobs take the folder's vae/)
    "generate": {*PARTS, "pipeline.json"},
    "edit": {*PARTS, "pipeline.json"},
    "inpaint": {*PARTS, "pipeline.json"},
    "animate": {*PARTS, "pipeline.json"},
    "morph": {*PARTS, "pipeline.json"},
    "convert": {*PARTS, "pipeline.json"},
    "encode": {"vae"},
    "decode": {"vae"},
    "reconstruct": {"vae"},
    "train": {"dit", "text_encoder"},
}


def truncate(folder):
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage_config(folder):
    (folder / "config.json").write_bytes(bytes(range(256)) * 3)


def bad_field(folder):
    raw = json.loads((folder / "config.json").read_text())
    raw[next(k for k, v in raw.items() if isinstance(v, int) and not isinstance(v, bool))] = "many"
    (folder / "config.json").write_text(json.dumps(raw))


def wrong_shapes(folder):
    state = load_file(folder / "model.safetensors")
    key = next(k for k in sorted(state) if state[k].ndim >= 2)
    state[key] = state[key][:-1].clone()
    save_file(state, folder / "model.safetensors")


def missing_weights(folder):
    (folder / "model.safetensors").unlink()


def missing_folder(folder):
    shutil.rmtree(folder)


DAMAGE = {  # kind: what it does to one part's folder
    "truncated weights": truncate,
    "garbage config": garbage_config,
    "config field of the wrong type": bad_field,
    "wrong shapes": wrong_shapes,
    "missing weights": missing_weights,
    "missing part": missing_folder,
}
SETTINGS = {  # kind: what pipeline.json holds
    "garbage settings": bytes(range(200, 256)) * 4,
    "settings that are not json": b'{"steps": [1, 2',
    "unknown setting": b'{"stepz": 3}',
    "setting out of range": b'{"guidance": NaN}',
}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_pipe):
    root = tmp_path_factory.mktemp("damaged")
    pipe = tiny_pipe
    pipe.save_pretrained(root / "good")
    write_video(root / "a.png", torch.zeros(3, 1, 16, 16))
    report = encode_clips([root / "a.png"], root / "lat", pipe.vae, progress=False)
    assert not report.failed
    return root


def jobs(world, model, out):
    """argv of every job, run with ``model``, writing under ``out``."""
    img, model = str(world / "a.png"), str(model)
    common = ["--model", model, "-q"]
    return {
        "generate": ["generate", "a", "-o", f"{out}/g.mp4", *common],
        "edit": ["edit", img, "a", "-o", f"{out}/e.png", *common],
        "inpaint": ["inpaint", img, "a", "--mask", img, "-o", f"{out}/i.png", *common],
        "animate": ["animate", img, "a", "-o", f"{out}/an.gif", *common],
        "morph": ["morph", img, img, "-o", f"{out}/m.gif", *common],
        "convert": ["convert", model, "-o", f"{out}/c", "-q"],
        "encode": ["encode", img, "-o", f"{out}/lat", "--model", model],
        "decode": ["decode", str(world / "lat"), "-o", f"{out}/dec", "--model", model],
        "reconstruct": ["reconstruct", img, "-o", f"{out}/r.png", "--model", model],
        "train": ["train", "tiny", f"data={world / 'lat'}", f"dit={model}/dit", f"text_encoder={model}/text_encoder",
                  f"output={out}/run", "steps=1", "progress=false"],
    }  # fmt: skip


def check_one_line(capsys, argv, names: str) -> str:
    argv = [str(a) for a in argv]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, err)
    assert len(err.splitlines()) == 1 and err.startswith(f"vidlatent {argv[0]}: error: "), err
    assert "Traceback" not in err and names in err, err
    return err


@pytest.mark.parametrize("kind", DAMAGE)
def test_every_job_on_a_damaged_part_ends_with_one_line(world, tmp_path, capsys, kind):
    for part in PARTS:
        model = tmp_path / part
        shutil.copytree(world / "good", model)
        DAMAGE[kind](model / part)
        for job, argv in jobs(world, model, tmp_path / "out").items():
            if part in USES[job] and not (
                job == "convert" and kind == "missing part"
            ):  # converts what is there
                check_one_line(capsys, argv, str(model))
    assert not (tmp_path / "out").exists()  # nothing written, not even a folder


@pytest.mark.parametrize("kind", SETTINGS)
def test_every_job_on_damaged_pipeline_settings_ends_with_one_line(world, tmp_path, capsys, kind):
    model = tmp_path / "model"
    shutil.copytree(world / "good", model)
    (model / "pipeline.json").write_bytes(SETTINGS[kind])
    for job, argv in jobs(world, model, tmp_path / "out").items():
        if "pipeline.json" in USES[job]:
            check_one_line(capsys, argv, str(model / "pipeline.json"))


def test_output_location_is_checked_before_any_work(world, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    (tmp_path / "dir.mp4").mkdir()
    loaded = []
    monkeypatch.setattr(VideoPipeline, "from_pretrained", lambda *a, **k: loaded.append(a))
    for job, argv in jobs(world, "tiny", blocker / "sub").items():
        if job not in ("train", "convert"):
            check_one_line(capsys, argv, f"{blocker}/sub")
    check_one_line(capsys, ["generate", "a", "-o", tmp_path / "dir.mp4", "--model", "tiny"], "is a folder")
    check_one_line(capsys, ["encode", world / "a.png", "-o", blocker, "--model", "tiny"], "not a folder")
    check_one_line(capsys, ["train", "tiny", f"data={world / 'lat'}", f"output={blocker}"], "not a folder")
    check_one_line(capsys, ["convert", "tiny", "-o", blocker], "nothing to convert at tiny")
    assert not loaded


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a read-only file system")
def test_a_read_only_output_folder_is_found_before_the_job(world, tmp_path, capsys):
    import subprocess

    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        check_one_line(
            capsys, ["generate", "a", "-o", ro / "g.mp4", "--model", "tiny"], "(Read-only file system)"
        )
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_debug_shows_the_traceback(world, tmp_path, capsys, monkeypatch):
    argv = ["generate", "a", "-o", str(tmp_path / "g.mp4"), "--model", str(tmp_path / "none"), "-q"]
    assert main(argv) == 2
    with pytest.raises(FileNotFoundError, match="no pipeline at"):
        main([*argv, "--debug"])
    monkeypatch.setenv("VIDLATENT_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(argv)


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    def boom(args):
        raise KeyError("a bug")

    monkeypatch.setattr("vidlatent.cli.cmd_info", boom)
    with pytest.raises(KeyError):
        main(["info"])


def test_python_dash_m_vidlatent_is_the_command():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "vidlatent", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("usage: vidlatent")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
def test_a_device_this_torch_cannot_use_is_named():
    with pytest.raises(ValueError, match="device 'cuda': this torch cannot use CUDA"):
        VideoPipeline.from_pretrained("tiny", device="cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu'; accepted: cpu, cuda"):
        VideoPipeline.from_pretrained("tiny", device="gpu")
