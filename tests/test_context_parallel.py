"""Context-parallel sampling (``runtime.parallel``): 2 and 4 gloo processes on the CPU, each generating one
video with the tokens of every denoiser call split across ranks (Ulysses all-to-all attention) and, with
``cfg``, guidance's two halves on two rank groups, against one process generating it whole.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from context_parallel_worker import JOB, PROMPT, control_video

from vidlatent.config import DiTConfig, load_config
from vidlatent.config.control import control_config_for
from vidlatent.data.io import read_image
from vidlatent.models.control import ControlBranch
from vidlatent.models.dit import VideoDiT
from vidlatent.pipelines import VideoPipeline
from vidlatent.runtime import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(script: str, *args, nproc: int) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), script,
           *args]  # fmt: skip
    run = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return run


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The tiny pipeline with a 4-head denoiser (4 ranks split 4 heads) and a control branch, saved once."""
    pipe = VideoPipeline.from_pretrained("tiny")
    c = pipe.vae.config.latent_channels
    cfg = load_config(DiTConfig, "dit", "tiny", overrides=[f"in_channels={c}", f"out_channels={c}",
                                                            f"text_dim={pipe.text_encoder.dim}", "num_heads=4"])  # fmt: skip
    torch.manual_seed(0)
    dit = VideoDiT(cfg).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.1 * torch.randn_like(p))  # a zero-init head would make every video the same
    out = tmp_path_factory.mktemp("cp") / "pipe"
    pipe = VideoPipeline(pipe.vae, dit, pipe.text_encoder, pipe.config)
    c, sf = pipe.vae.config.latent_channels, pipe.vae.spatial_factor
    branch = ControlBranch(control_config_for(cfg, in_channels=2 * c + sf * sf)).eval()
    with torch.no_grad():
        for p in branch.parameters():
            p.add_(0.1 * torch.randn_like(p))  # zero-init hint projections would add nothing
    pipe.load_control(branch)
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def single(folder) -> dict[str, torch.Tensor]:
    pipe = VideoPipeline.from_pretrained(folder)
    return {"": pipe.generate(PROMPT, **JOB), "control-": pipe.control(PROMPT, control_video(), **JOB)}


@pytest.mark.parametrize("nproc", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_ranks_give_the_single_process_video(folder, single, tmp_path, nproc):
    torchrun(os.path.join(ROOT, "tests", "context_parallel_worker.py"), folder, tmp_path, nproc=nproc)
    names = [f"{job}{split}-{nproc}.pt" for job in single for split in ("cfg", "sequence")]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    assert single[""].abs().max() > 0.05  # a video that differs from place to place, not a flat one
    assert (single["control-"] - single[""]).abs().max() > 0.05  # the control steers it
    for job, expected in single.items():
        for split in ("sequence", "cfg"):
            video = torch.load(tmp_path / f"{job}{split}-{nproc}.pt")
            assert video.shape == expected.shape
            err = (video - expected).abs().max().item()
            assert err < 1e-5, (job, split, nproc, err)


def test_one_process_is_refused():
    pipe_dit = VideoDiT(load_config(DiTConfig, "dit", "tiny"))
    with pytest.raises(ValueError, match="2 or more ranks"):
        parallel.context_parallel(pipe_dit)


@pytest.mark.slow
def test_cli_generate_under_torchrun_rank_zero_writes(folder, tmp_path):
    """``torchrun vidlatent generate`` without a seed: rank 0's fresh seed is every rank's, the 9 tokens of a
    48 x 48 image are padded to split across 2 ranks, and rank 0 alone writes the image and its line."""
    out = tmp_path / "still.png"
    run = torchrun("-m", "vidlatent.cli", "generate", PROMPT, "-o", out, "--model", folder, "--frames", 1, "--height", 48,
                   "--width", 48, "-q", "--device", "cpu", nproc=2)  # fmt: skip
    wrote = [line for line in run.stdout.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 1, run.stdout
    seed = int(re.search(r"seed (\d+)\)", wrote[0])[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["still.png"]
    expected = VideoPipeline.from_pretrained(folder).generate(
        PROMPT, frames=1, height=48, width=48, seed=seed, progress=False
    )
    got = read_image(out)[:, 0]  # (3, h, w) in [-1, 1], 8 bits
    assert got.shape == expected[0, :, 0].shape
    assert (got - expected[0, :, 0]).abs().max() <= 1 / 127.5 + 1e-6


def test_heads_or_ranks_that_do_not_divide_are_refused(monkeypatch):
    monkeypatch.setattr(parallel, "_world", lambda: (0, 4))
    with pytest.raises(ValueError, match="2 heads do not divide"):
        parallel.ContextParallel(num_heads=2)
    monkeypatch.setattr(parallel, "_world", lambda: (0, 3))
    with pytest.raises(ValueError, match="world size 3 is odd"):
        parallel.ContextParallel(num_heads=6, cfg=True)
