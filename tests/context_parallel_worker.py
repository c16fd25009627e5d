"""One rank of the context-parallel checks in test_context_parallel.py, started by torchrun:

    python -m torch.distributed.run --nproc_per_node N tests/context_parallel_worker.py FOLDER OUT

For each way of splitting (``sequence``: every call's tokens across all ranks; ``cfg``: guidance's halves on
two rank groups, tokens across the ranks of each), every rank generates the same video from the pipeline in
FOLDER; rank 0 writes ``OUT/<split>-<N>.pt``, and every rank checks it holds the video rank 0 holds.
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


def main(folder: str, out: str) -> None:
    info, _ = setup("cpu")
    pipe = VideoPipeline.from_pretrained(folder)
    for split in ("sequence", "cfg"):
        parallel.context_parallel(pipe, cfg=split == "cfg")
        video = pipe.generate(PROMPT, **JOB)
        parallel.disable(pipe)
        first = video.clone()
        dist.broadcast(first, src=0)
        assert torch.equal(first, video), f"rank {info.rank} holds another video than rank 0 ({split})"
        if parallel.is_main():
            torch.save(video, Path(out) / f"{split}-{info.world_size}.pt")
    leave_and_exit(info.rank)


if __name__ == "__main__":
    main(*sys.argv[1:3])
