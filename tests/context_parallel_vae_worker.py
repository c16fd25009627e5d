"""One rank of the checks in test_context_parallel_vae.py, started by torchrun:

    python -m torch.distributed.run --nproc_per_node N tests/context_parallel_vae_worker.py FOLDER OUT

* ``vae``: every rank decodes the same random latents with ``parallel.split_tiled_decode`` (9 tiles of the tiny
  VAE under ``TILING``); rank 0 writes ``OUT/vae-<N>.pt`` and every rank ``OUT/tiles-<N>-<rank>.txt`` (how
  many tiles it decoded).
* ``pipeline`` (2 ranks): under ``context_parallel`` the pipeline in FOLDER, tiling as ``TILING`` says,
  generates ``JOB`` with seed 0 (rank 0 writes ``OUT/pipeline-<N>.pt``; every rank how many of the 4 tiles it
  decoded, ``OUT/pipeline-tiles-<N>-<rank>.txt``) and ``JOB`` with no seed (every rank writes its video and
  start noise to ``OUT/unseeded-<N>-<rank>.pt``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from worker_exit import leave_and_exit

from vidlatent.models.vae import CausalVAE
from vidlatent.pipelines import VideoPipeline
from vidlatent.runtime import parallel
from vidlatent.train.distributed import setup

TILING = dict(tile_size=32, tile_overlap=16, auto_tile_above=32)  # tiles of 4 latent pixels, stride 2
LATENTS = (1, 4, 3, 8, 8)  # 3 x 3 = 9 tiles: divides neither 2 nor 4 ranks
JOB = dict(frames=5, height=48, width=48, progress=False)
PROMPT = "a red ball bouncing"


def tiled_vae() -> CausalVAE:
    """The tiny VAE with seeded random weights and ``TILING``."""
    torch.manual_seed(0)
    vae = CausalVAE.from_pretrained("tiny").eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for key, value in TILING.items():
        setattr(vae.config, key, value)
    return vae


def latents() -> torch.Tensor:
    return torch.randn(LATENTS, generator=torch.Generator().manual_seed(1))


def main(folder: str, out: str) -> None:
    info, _ = setup("cpu")
    out = Path(out)
    vae = tiled_vae()
    calls = []
    decode_pixels = vae._decode_pixels
    vae._decode_pixels = lambda z, *a, **k: calls.append(1) or decode_pixels(z, *a, **k)
    with torch.no_grad():
        video = parallel.split_tiled_decode(vae, latents())
    (out / f"tiles-{info.world_size}-{info.rank}.txt").write_text(str(len(calls)))
    if parallel.is_main():
        torch.save(video, out / f"vae-{info.world_size}.pt")
    if info.world_size == 2:
        pipe = VideoPipeline.from_pretrained(folder)
        for key, value in TILING.items():
            setattr(pipe.vae.config, key, value)
        parallel.context_parallel(pipe)
        calls.clear()
        decode_pixels = pipe.vae._decode_pixels
        pipe.vae._decode_pixels = lambda z, *a, **k: calls.append(1) or decode_pixels(z, *a, **k)
        video = pipe.generate(PROMPT, seed=0, **JOB)
        (out / f"pipeline-tiles-{info.world_size}-{info.rank}.txt").write_text(str(len(calls)))
        if parallel.is_main():
            torch.save(video, out / f"pipeline-{info.world_size}.pt")
        drawn, draw = [], pipe._noise
        pipe._noise = lambda *args: drawn.append(draw(*args)) or drawn[-1]
        video = pipe.generate(PROMPT, seed=None, **JOB)
        torch.save((video, drawn[0][0]), out / f"unseeded-{info.world_size}-{info.rank}.pt")
    leave_and_exit(info.rank)


if __name__ == "__main__":
    main(*sys.argv[1:3])
