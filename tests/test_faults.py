"""Faults (issue 21, point 5): ``kill -9`` at seeded random points during ``encode``, ``decode`` (a job with
many outputs) and ``train``; each rerun ends with outputs equal to an uninterrupted run (byte for byte;
safetensors files tensor for tensor, bitwise, and metadata) and no temporary files. A full disk while writing leaves no half-written file and a one-line error.

A kill is SIGKILL to the job's process group once a seeded number of outputs exist, after a seeded extra
delay (the job's ffmpeg children die with it, as with ``kill -9 -PGID``). The default suite kills ``encode``
at one point; ``-m slow`` kills each of the three jobs at five.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from vidlatent.cli import main
from vidlatent.data.io import write_video
from vidlatent.pipelines.encode import load_latents

ROOT = Path(__file__).resolve().parent.parent
CLIPS = 12


def pattern(frames: int, h: int, w: int, phase: float) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return 0.8 * torch.stack(
        [torch.stack([torch.sin(3 * x + 0.3 * i + phase), torch.cos(2 * y), x * y]) for i in range(frames)], 1
    )


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Twelve small clips of two shapes (gifs of 5 frames 32x32, one-frame pngs 32x16), captions beside some."""
    d = tmp_path_factory.mktemp("fault_clips")
    for i in range(CLIPS):
        if i % 3 == 2:
            write_video(d / f"c{i:02d}.png", pattern(1, 16, 32, i))
        else:
            write_video(d / f"c{i:02d}.gif", pattern(5, 32, 32, i), fps=8)
        (d / f"c{i:02d}.txt").write_text(f"a red circle moving {'left' if i % 2 else 'right'}\n")
    return d


def command(*args) -> list[str]:
    return [sys.executable, "-m", "vidlatent.cli", *map(str, args)]


def environment() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("WORLD_SIZE", None), env.pop("RANK", None)
    return env


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(),
                            start_new_session=True)  # fmt: skip


def finish(proc: subprocess.Popen, ok=(0,)) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode in ok, f"exit {proc.returncode}: {out[-2000:]}{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    return out


def kill_when(cmd: list[str], ready: Callable[[], bool], extra: float) -> int:
    """Run ``cmd``; once ``ready()`` holds (polled every 5 ms), wait ``extra`` seconds and SIGKILL its process
    group. Returns the exit status: -9 when killed, else the job ended before the kill came."""
    proc = start(cmd)
    deadline = time.monotonic() + 600
    while proc.poll() is None and not ready():
        assert time.monotonic() < deadline, "the job never got ready"
        time.sleep(0.005)
    time.sleep(extra)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    return proc.returncode


def content(path: Path):
    """A file's bytes; for safetensors its metadata and each tensor's bytes (safetensors writes the metadata
    in the order of a hash map, which changes from process to process)."""
    if path.suffix != ".safetensors":
        return path.read_bytes()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: (str(f.get_tensor(k).dtype), f.get_tensor(k).numpy().tobytes()) for k in f.keys()}
        return f.metadata(), tensors


def files(folder: Path, skip: Callable[[Path], bool] = lambda p: False) -> dict:
    return {str(p.relative_to(folder)): content(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and not skip(p.relative_to(folder))}  # fmt: skip


def describe(got: dict, want: dict, differ: list[str]) -> str:
    """Which files differ between a resumed run and the reference, and for safetensors which tensors (a
    short message: the whole contents would bury it)."""
    lines = []
    for name in differ:
        a, b = got.get(name), want.get(name)
        if a is None or b is None:
            lines.append(f"{name}: only in the {'reference' if a is None else 'resumed run'}")
        elif isinstance(a, tuple):
            tensors = sorted(k for k in a[1].keys() | b[1].keys() if a[1].get(k) != b[1].get(k))
            meta = "metadata differs; " if a[0] != b[0] else ""
            lines.append(f"{name}: {meta}{len(tensors)} tensors differ: {tensors[:8]}")
        else:
            lines.append(f"{name}: {len(a)} vs {len(b)} bytes")
    return "; ".join(lines)


def temporaries(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob(".*") if re.search(r"\.(tmp|old)", p.name)]


def count(folder: Path, glob: str) -> int:
    return len([p for p in folder.glob(glob) if not p.name.startswith(".")]) if folder.is_dir() else 0


def kill_and_resume(cmd_for: Callable[[Path], list[str]], reference: Path | subprocess.Popen, tmp_path: Path,
                    points: list[int], progress: Callable[[Path], int], total: int, skip=lambda p: False) -> list[int]:  # fmt: skip
    """For each seeded point: kill a fresh run once ``progress`` reaches a seeded count below ``total``, rerun
    to the end, and compare with the ``reference`` folder (or the reference run still going, which writes to
    ``tmp_path / "reference"``). Returns the exit statuses of the killed runs."""
    statuses = []
    for seed in points:
        rng = np.random.default_rng(seed)
        at, extra = int(rng.integers(0, total)), float(rng.uniform(0.0, 0.3))
        out = tmp_path / f"run{seed}"
        statuses.append(kill_when(cmd_for(out), lambda o=out, a=at: progress(o) >= a, extra))
        finish(start(cmd_for(out)))
        if isinstance(reference, subprocess.Popen):
            finish(reference)
            reference = tmp_path / "reference"
        got, want = files(out, skip), files(reference, skip)
        differ = sorted(k for k in got.keys() | want.keys() if got.get(k) != want.get(k))
        assert not differ, f"point {seed} ({at} outputs + {extra:.2f} s): {describe(got, want, differ)}"
        assert not temporaries(out), temporaries(out)
    return statuses


def encode_cmd(clips: Path) -> Callable[[Path], list[str]]:
    return lambda out: command("encode", clips, "-o", out, "--model", "tiny", "--batch-size", 3)


@pytest.mark.slow  # measured over ~4 s on 2 idle cores; run by .ci/run in its slow step
def test_encode_killed_once_resumes_to_the_same_bits(clips, tmp_path):
    reference = start(encode_cmd(clips)(tmp_path / "reference"))  # runs beside the killed one
    statuses = kill_and_resume(
        encode_cmd(clips), reference, tmp_path, [0], lambda o: count(o, "*.safetensors"), CLIPS
    )
    assert statuses == [-signal.SIGKILL]


@pytest.mark.slow
@pytest.mark.parametrize("job", ["encode", "decode", "train"])
def test_kill_at_five_seeded_points_then_resume(job, clips, tmp_path):
    encode = encode_cmd(clips)
    finish(start(encode(tmp_path / "latents")))
    if job == "encode":
        cmd_for, progress, total, skip = (
            encode,
            (lambda o: count(o, "*.safetensors")),
            CLIPS,
            (lambda p: False),
        )
        reference = tmp_path / "latents"
    elif job == "decode":

        def cmd_for(out):
            return command("decode", tmp_path / "latents", "-o", out, "--model", "tiny", "--format", "gif")

        progress, total, skip = (lambda o: count(o, "*.gif")), CLIPS, (lambda p: False)
        reference = tmp_path / "videos"
        finish(start(cmd_for(reference)))
    else:

        def cmd_for(out):
            return command("train", "tiny", f"data={tmp_path / 'latents'}", f"output={out}", "steps=12",
                           "checkpoint_every=2", "progress=false", "resume=auto")  # fmt: skip

        def progress(out):
            return count(out / "checkpoints", "step-*")

        # the time a run took (state.pt), its log (metrics.jsonl) and its output folder (config.yaml) differ;
        # the weights (checkpoints and the export) may not
        total, skip = 6, lambda p: p.name in ("state.pt", "metrics.jsonl", "config.yaml")
        reference = tmp_path / "reference"
        finish(start(cmd_for(reference)))
    statuses = kill_and_resume(cmd_for, reference, tmp_path, [1, 2, 3, 4, 5], progress, total, skip)
    assert statuses.count(-signal.SIGKILL) >= 4, statuses  # (a kill may come after a short job ended)


def test_a_writer_killed_mid_write_leaves_nothing_the_next_write_keeps(tmp_path):
    """safetensors (0.5+) writes through a ``.tmpXXXXXX`` file of its own beside the path it is given; a run
    killed then used to leave that file among the outputs for good (the slow train kill test caught one in
    ``final/dit/``). A writer that does the same and is killed leaves only atomic_write's own temporary
    folder, which the next write of the same file removes."""
    target = tmp_path / "out" / "model.safetensors"
    killed = subprocess.run([sys.executable, "-c", f"""
import os, signal
from pathlib import Path
from vidlatent.checkpoint import atomic_write

def write(p):
    Path(p).with_name(".tmpAbC123").write_bytes(b"half")  # the writer's own temporary, beside its file
    os.kill(os.getpid(), signal.SIGKILL)

atomic_write({str(target)!r}, write)
"""], env=environment(), capture_output=True, text=True)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not target.exists() and [p.name for p in target.parent.iterdir()] == temporaries_names(
        target.parent
    )
    from safetensors.torch import save_file

    from vidlatent.checkpoint import atomic_write

    atomic_write(target, lambda p: save_file({"w": torch.ones(3)}, p))
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_a_temporary_with_an_impossible_process_id_counts_as_stale(tmp_path):
    """A pid no process can have (too large for the OS) is a dead writer's, not an error."""
    from vidlatent.checkpoint import process_alive, remove_stale_temporaries

    target = tmp_path / "model.safetensors"
    odd = tmp_path / f".{target.name}.{10**20}-abc.tmp.safetensors"
    odd.write_bytes(b"half")
    assert process_alive(os.getpid()) and not process_alive(10**20)
    assert remove_stale_temporaries(target) == [odd] and not odd.exists()


def temporaries_names(folder: Path) -> list[str]:
    return [Path(p).name for p in temporaries(folder) if Path(p).parent == folder]


# ------------------------------------------------------------------------------------------- a full disk


def check_full_disk_outcome(capsys, code: int, out: Path) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [
        line for line in err.splitlines() if not line.startswith(("encode:", "decode:"))
    ]  # progress bars
    assert len(lines) == 1 and "no space left on device (nothing was written)" in lines[0], err
    assert not temporaries(out)
    for f in out.glob("*.safetensors"):  # whatever was written is whole
        load_latents(f)


@pytest.mark.slow  # measured over ~4 s on 2 idle cores; run by .ci/run in its slow step
def test_full_disk_while_encoding_a_patched_writer(clips, tmp_path, capsys, monkeypatch):
    """safetensors' writer fails the way it does on a full disk after two files, half-way through a file."""
    import vidlatent.data.latents as encode

    real, written = encode.save_file, []

    def full_disk(tensors, path, metadata=None):
        if len(written) == 2:
            Path(path).write_bytes(b"\0" * 100)  # half a file, then the disk is full
            raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
        real(tensors, path, metadata=metadata)
        written.append(path)

    monkeypatch.setattr(encode, "save_file", full_disk)
    out = tmp_path / "latents"
    code = main(["encode", str(clips), "-o", str(out), "--model", "tiny", "--batch-size", "3"])
    check_full_disk_outcome(capsys, code, out)
    assert count(out, "*.safetensors") == 2
    monkeypatch.setattr(encode, "save_file", real)
    assert main(["encode", str(clips), "-o", str(out), "--model", "tiny", "--batch-size", "3"]) == 0
    assert count(out, "*.safetensors") == CLIPS and not temporaries(out)


@pytest.fixture
def small_disk(tmp_path):
    """A 12 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(disk)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


@pytest.mark.slow  # measured over ~4 s on 2 idle cores; run by .ci/run in its slow step
def test_full_disk_while_encoding_and_decoding_a_real_tmpfs(clips, small_disk, capsys):
    out = small_disk / "latents"
    code = main(["encode", str(clips), "-o", str(out), "--model", "tiny"])
    check_full_disk_outcome(capsys, code, out)
    assert 0 < count(out, "*.safetensors") < CLIPS
    videos = small_disk / "videos"  # the latents that fitted, decoded onto the full disk
    code = main(["decode", str(out), "-o", str(videos), "--model", "tiny", "--format", "gif"])
    check_full_disk_outcome(capsys, code, videos)
    assert not list(videos.glob("*.gif"))
