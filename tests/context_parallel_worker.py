"""One rank of the context-parallel checks in test_context_parallel.py, started by torchrun:

    python -m torch.distributed.run --nproc_per_node N tests/context_parallel_worker.py FOLDER OUT

For each way of splitting (``sequence``: every call's tokens across all ranks; ``cfg``: guidance's halves on
two rank groups, tokens across the ranks of each), every rank generates the same video from the pipeline in
FOLDER, and the same controlled video through its control branch; rank 0 writes ``OUT/<split>-<N>.pt`` and
``OUT/control-<split>-<N>.pt``, and every rank checks it holds the videos rank 0 holds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from worker_exit import leave_and_exit

from vidlatent.pipelines import VideoPipeline
from vidlatent.runtime import parallel
from vidlatent.train.distributed import setup

JOB = dict(frames=5, height=48, width=48, seed=0, progress=False)  # 2 x 3 x 3 = 18 tokens
PROMPT = "a red ball bouncing"


def control_video() -> torch.Tensor:
    """The control job's input: a smooth ramp over the frames and the picture (1, 3, 5, 48, 48) in [-1, 1]."""
    t, y, x = torch.meshgrid(*(torch.linspace(-1, 1, n) for n in (5, 48, 48)), indexing="ij")
    return torch.stack([x, y, t * x]).unsqueeze(0)


def main(folder: str, out: str) -> None:
    info, _ = setup("cpu")
    pipe = VideoPipeline.from_pretrained(folder)
    for split in ("sequence", "cfg"):
        parallel.context_parallel(pipe, cfg=split == "cfg")
        videos = {"": pipe.generate(PROMPT, **JOB), "control-": pipe.control(PROMPT, control_video(), **JOB)}
        parallel.disable(pipe)
        for job, video in videos.items():
            first = video.clone()
            dist.broadcast(first, src=0)
            assert torch.equal(first, video), (
                f"rank {info.rank} holds another video than rank 0 ({job}{split})"
            )
            if parallel.is_main():
                torch.save(video, Path(out) / f"{job}{split}-{info.world_size}.pt")
    leave_and_exit(info.rank)


if __name__ == "__main__":
    main(*sys.argv[1:3])
