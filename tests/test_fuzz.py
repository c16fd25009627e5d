"""Fuzzed media (issue 21, point 4): seeded mutations (truncations, flipped bytes, zeroed headers, zeroed
blocks) of small mp4, webm, gif, png and jpg files go through ``read_video`` / ``probe`` and through
``vidlatent encode`` of a folder: no traceback, no hang (a time limit per file), every bad file listed with a
one-line reason, every good file encoded.

The reads run in a worker process that reports each file as it finishes, so a decoder that hangs (or crashes)
is caught per file; the worker is restarted after it. The default suite runs 500 mutants (50 of them, with
the 5 seed files, through ``encode``, which runs meanwhile); ``-m slow`` runs 2500, all through ``encode``.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vidlatent.data.io import write_video
from vidlatent.pipelines.encode import latent_name

ROOT = Path(__file__).resolve().parent.parent
SEED_MEDIA = (("mp4", 5), ("webm", 5), ("gif", 5), ("png", 1), ("jpg", 1))  # (suffix, frames)
MUTATIONS = ("truncate", "flip", "zero_header", "zero_block")
LIMIT = 30.0  # seconds a single file may take (generous: a loaded 2-core machine; most take ~0.05 s)
ALLOWED = ("VideoReadError", "ValueError")  # what a bad file may raise: ValueErrors, listed by batch jobs

WORKER = r"""
import json, sys, math
from vidlatent.data.io import probe, read_video
start = int(sys.argv[2])
for line in open(sys.argv[1]):
    job = json.loads(line)
    if job["i"] < start:
        continue
    out = {"i": job["i"]}
    for name, fn in (("read", lambda p: read_video(p, multiple=8)), ("probe", probe)):
        if name == "probe" and not job["probe"]:
            continue
        try:
            result = fn(job["path"])
            if name == "read":
                video = result[0]
                ok = video.ndim == 4 and video.shape[0] == 3 and video.shape[-1] % 8 == 0 and video.shape[-2] % 8 == 0
                ok = ok and bool(video.isfinite().all()) and float(video.abs().max()) <= 1
                out[name] = "ok" if ok else f"bad tensor {tuple(video.shape)}"
            else:
                out[name] = "ok"
        except Exception as err:
            out[name] = type(err).__name__ + ": " + (str(err).splitlines() or [""])[0]
    print(json.dumps(out), flush=True)
"""


def pattern(frames: int, h: int, w: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return 0.8 * torch.stack(
        [torch.stack([torch.sin(3 * x + 0.3 * i), torch.cos(2 * y), x * y]) for i in range(frames)], 1
    )


def mutate(data: bytes, kind: str, rng: np.random.Generator) -> bytes:
    data = bytearray(data)
    if kind == "truncate":
        return bytes(data[: int(rng.integers(0, len(data)))])
    if kind == "flip":
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(0, len(data)))
            data[i] ^= int(rng.integers(1, 256))
    elif kind == "zero_header":
        n = min(len(data), int(rng.integers(1, 65)))
        data[:n] = bytes(n)
    else:
        a = int(rng.integers(0, len(data)))
        b = min(len(data), a + int(rng.integers(1, 257)))
        data[a:b] = bytes(b - a)
    return bytes(data)


def make_corpus(folder: Path, count: int, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """The seed files (32x32, 5 frames or one image) and ``count`` mutants of them, named by kind."""
    folder.mkdir(parents=True, exist_ok=True)
    seeds = []
    for suffix, frames in SEED_MEDIA:
        path = folder / f"seed.{suffix}"
        write_video(path, pattern(frames, 32, 32), fps=8)
        seeds.append(path)
    rng = np.random.default_rng(seed)
    mutants = []
    for i in range(count):
        source = seeds[i % len(seeds)]
        kind = MUTATIONS[(i // len(seeds)) % len(MUTATIONS)]
        path = folder / f"m{i:04d}-{kind}{source.suffix}"
        path.write_bytes(mutate(source.read_bytes(), kind, rng))
        mutants.append(path)
    return seeds, mutants


def read_all(files: list[Path], probe_every: int = 1) -> dict[Path, dict]:
    """Each file through ``read_video`` (and every ``probe_every``-th through ``probe``) in a worker process,
    with ``LIMIT`` seconds per file; a file that takes longer (or kills the worker) is reported as such."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    jobs = files[0].parent / ".jobs.jsonl"  # a file, not stdin: a pipe both ways would deadlock
    jobs.write_text("".join(json.dumps({"i": i, "path": str(f), "probe": i % probe_every == 0}) + "\n"
                            for i, f in enumerate(files)))  # fmt: skip
    results: dict[Path, dict] = {}
    start = 0
    while start < len(files):
        proc = subprocess.Popen([sys.executable, "-c", WORKER, str(jobs), str(start)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, env=env)  # fmt: skip
        selector = selectors.DefaultSelector()
        selector.register(proc.stdout, selectors.EVENT_READ)
        limit = LIMIT + 30  # the first file also waits for the worker's imports
        while start < len(files):
            t0 = time.monotonic()
            if not selector.select(timeout=limit):
                results[files[start]] = {"read": f"hang: no result in {limit:.0f} s"}
                start += 1
                break
            line = proc.stdout.readline()
            if not line:
                results[files[start]] = {"read": f"worker died (exit status {proc.wait()})"}
                start += 1
                break
            out = json.loads(line)
            out["seconds"] = time.monotonic() - t0
            results[files[out["i"]]] = out
            start, limit = out["i"] + 1, LIMIT
        proc.kill()
        proc.wait()
    return results


def check_reads(results: dict[Path, dict]) -> list[Path]:
    """Assert every outcome is a tensor or an allowed error; return the files that read."""
    bad = {f: r for f, r in results.items() for k in ("read", "probe") if k in r
           and r[k] != "ok" and not r[k].startswith(tuple(a + ":" for a in ALLOWED))}  # fmt: skip
    assert not bad, "\n".join(f"{f.name}: {r}" for f, r in list(bad.items())[:20])
    return [f for f, r in results.items() if r["read"] == "ok"]


def start_encode(folder: Path, out: Path) -> subprocess.Popen:
    """``vidlatent encode FOLDER`` in a subprocess (it runs while this process reads the same files); its
    output goes to files beside ``out`` (pipes nobody reads yet would fill up and stop it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("WORLD_SIZE", None), env.pop("RANK", None)
    cmd = [sys.executable, "-m", "vidlatent.cli", "encode", str(folder), "-o", str(out), "--model", "tiny"]
    with open(f"{out}.stdout", "w") as stdout, open(f"{out}.stderr", "w") as stderr:
        return subprocess.Popen(cmd, stdout=stdout, stderr=stderr, text=True, env=env)


def check_encode(proc: subprocess.Popen, folder: Path, good: set[Path], out: Path) -> None:
    """The encode run listed every bad file with a one-line reason and encoded every good one, no traceback."""
    files = sorted(folder.iterdir())
    try:
        proc.wait(timeout=60 + LIMIT * len(files) / 10)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    stdout, stderr = Path(f"{out}.stdout").read_text(), Path(f"{out}.stderr").read_text()
    assert "Traceback" not in stderr and "Traceback" not in stdout, stderr[-3000:]
    assert proc.returncode == (1 if len(good) < len(files) else 0), stdout[-2000:] + stderr[-2000:]
    summary = re.search(r"encode: (\d+) done, (\d+) skipped \(already done\), (\d+) failed", stdout)
    assert summary, stdout
    failed = dict(re.findall(r"^  failed: (.*?): (\w+: .*)$", stdout, flags=re.M))
    made = {p.name for p in out.glob("*.safetensors")}
    for f in files:
        if f in good:
            assert latent_name(f) in made, (
                f"{f.name} read in-process but was not encoded: {failed.get(str(f))}"
            )
        else:
            assert str(f) in failed, f"{f.name} is bad but not listed"
            assert failed[str(f)].split(":")[0] in ALLOWED, failed[str(f)]
    assert int(summary.group(1)) == len(good) and int(summary.group(3)) == len(files) - len(good)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries


def run_fuzz(tmp_path: Path, count: int, encoded: int, probe_every: int) -> None:
    seeds, mutants = make_corpus(tmp_path / "media", count)
    chosen = tmp_path / "encode"  # the seeds and a seeded sample of mutants, encoded as one folder
    chosen.mkdir()
    picked = np.random.default_rng(1).choice(len(mutants), size=min(encoded, len(mutants)), replace=False)
    for f in seeds + [mutants[i] for i in sorted(picked)]:
        os.link(f, chosen / f.name)
    encoding = start_encode(chosen, tmp_path / "latents")
    try:
        results = read_all(seeds + mutants, probe_every)
    except BaseException:
        encoding.kill()
        raise
    good = set(check_reads(results))
    assert set(seeds) <= good  # the unmutated files read
    assert len(good - set(seeds)) > 0 and len(set(mutants) - good) > count // 4  # the mutations do something
    slowest = max(r.get("seconds", 0) for r in results.values())
    assert slowest < LIMIT, slowest
    check_encode(
        encoding, chosen, {chosen / f.name for f in good if (chosen / f.name).exists()}, tmp_path / "latents"
    )


def test_fuzzed_media_never_raise_tracebacks_or_hang(tmp_path):
    run_fuzz(tmp_path, count=500, encoded=50, probe_every=5)


@pytest.mark.slow
def test_fuzzed_media_many(tmp_path):
    run_fuzz(tmp_path, count=2500, encoded=2500, probe_every=1)


def test_a_header_declaring_billions_of_frames_is_not_believed(tmp_path):
    """Found by the fuzzer: one flipped byte made an mp4 declare 3,405,774,853 frames. Listing them ran out of
    memory, and decord, which trusts the count, aborts the whole process (std::bad_alloc)."""
    import struct

    from vidlatent.data.io import VideoReadError, probe, read_video

    path = tmp_path / "clip.mp4"
    write_video(path, pattern(5, 32, 32), fps=8)
    data = bytearray(path.read_bytes())
    at = data.find(b"stts") + 12  # version and flags, entry count, then the first entry's sample count
    data[at : at + 4] = struct.pack(">I", 3405774853)
    path.write_bytes(bytes(data))
    assert probe(path)["frames"] == 5  # the packets, counted
    video, info = read_video(path)
    assert video.shape[1] == 5 and "implausible frame count" in info["fallback_reason"]
    with pytest.raises(VideoReadError, match="implausible frame count"):
        read_video(path, backend="decord")
