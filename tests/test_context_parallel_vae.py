"""The VAE decode split across ranks (``runtime.parallel.split_tiled_decode``) and rank 0's seed under context
parallel: 2 and 4 gloo processes on the CPU (tests/context_parallel_vae_worker.py) against one process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from context_parallel_vae_worker import JOB, PROMPT, TILING, latents, tiled_vae

from vidlatent.config import DiTConfig, load_config
from vidlatent.models.dit import VideoDiT
from vidlatent.pipelines import VideoPipeline
from vidlatent.runtime import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "context_parallel_vae_worker.py")


def torchrun(*args, nproc: int) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    run = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The tiny pipeline with a perturbed denoiser (a zero-init head would make every video the same)."""
    pipe = VideoPipeline.from_pretrained("tiny")
    c = pipe.vae.config.latent_channels
    cfg = load_config(DiTConfig, "dit", "tiny", overrides=[f"in_channels={c}", f"out_channels={c}",
                                                            f"text_dim={pipe.text_encoder.dim}"])  # fmt: skip
    torch.manual_seed(0)
    dit = VideoDiT(cfg).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("cpvae") / "pipe"
    VideoPipeline(pipe.vae, dit, pipe.text_encoder, pipe.config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def two_ranks(folder, tmp_path_factory) -> Path:
    """What the worker wrote on 2 ranks (both tests read it)."""
    out = tmp_path_factory.mktemp("ranks2")
    torchrun(WORKER, folder, out, nproc=2)
    return out


@pytest.mark.parametrize("nproc", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_ranks_share_the_tiles_of_the_single_process_tiled_decode(folder, two_ranks, tmp_path, nproc):
    if nproc == 2:
        tmp_path = two_ranks
    else:
        torchrun(WORKER, folder, tmp_path, nproc=nproc)
    with torch.no_grad():
        single = tiled_vae().decode(latents(), tile=True)
        whole = tiled_vae().decode(latents(), tile=False)
    assert (single - whole).abs().max() > 1e-3  # the tiles show: this is the tiled decode, not the plain one
    video = torch.load(tmp_path / f"vae-{nproc}.pt")
    assert video.shape == single.shape == (1, 3, 9, 64, 64)
    err = (video - single).abs().max().item()
    print(f"split tiled decode, {nproc} ranks: max abs difference {err:.3g}")
    assert err < 1e-5, (nproc, err)
    tiles = [int((tmp_path / f"tiles-{nproc}-{r}.txt").read_text()) for r in range(nproc)]
    assert tiles == [len(range(r, 9, nproc)) for r in range(nproc)]  # 5+4 on 2 ranks, 3+2+2+2 on 4


def test_pipeline_decodes_split_and_takes_rank_zeros_seed(folder, two_ranks):
    """Under context parallel the pipeline's tiled decode is shared (the video equals one process's), and a job
    without a seed samples the same video on both ranks."""
    tmp_path = two_ranks
    assert [int((tmp_path / f"pipeline-tiles-2-{r}.txt").read_text()) for r in (0, 1)] == [2, 2]  # of 4
    pipe = VideoPipeline.from_pretrained(folder)
    for key, value in TILING.items():
        setattr(pipe.vae.config, key, value)
    single = pipe.generate(PROMPT, seed=0, **JOB)
    video = torch.load(tmp_path / "pipeline-2.pt")
    assert video.shape == single.shape
    err = (video - single).abs().max().item()
    print(f"pipeline under context parallel, tiled decode, 2 ranks: max abs difference {err:.3g}")
    assert err < 1e-5, err
    (first, noise), (second, noise_1) = (torch.load(tmp_path / f"unseeded-2-{r}.pt") for r in (0, 1))
    assert torch.equal(noise, noise_1)  # rank 0's fresh seed on both ranks
    assert first.std() > 0.05 and not torch.equal(first, video)  # a fresh seed's video, not seed 0's
    assert torch.equal(first, second)
    # the video one process makes from that noise (ranks that each drew their own would mix their noises)
    assert (first - pipe.generate(PROMPT, noise=noise, **JOB)).abs().max().item() < 1e-5


def test_one_process_decodes_as_the_vae():
    vae = tiled_vae()
    with torch.no_grad():
        assert torch.equal(parallel.split_tiled_decode(vae, latents()), vae.decode(latents(), tile=True))
