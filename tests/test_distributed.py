"""Data-parallel training: ``torchrun --nproc_per_node=2 vidlatent train`` on gloo (CPU) against one process
with the same global batch. Each rank takes half of every global batch and the draws (sigma, noise, caption
dropout) for the whole global batch come from the shared generator, so losses and weights match one process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from media import pattern
from safetensors.torch import load_file

from vidlatent.cli import run as run_command
from vidlatent.data.io import write_video
from vidlatent.pipelines.encode import encode_clips
from vidlatent.train import Trainer, load_train_config
from vidlatent.train.distributed import share

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# two 9-frame clips (one bucket: a full global batch of 2) and a 5-frame clip (a global batch of 1, so rank
# 1's share is empty and it joins with a weight-0 clip); caption dropout, grad_accum and clipping on
RUN = [
    "steps=4",
    "grad_accum=2",
    "caption_dropout=0.5",
    "checkpoint_every=2",
    "ema_decay=0.9",
    "lr=1e-3",
    "progress=false",
    "device=cpu",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_vae) -> Path:
    d = tmp_path_factory.mktemp("ddp")
    clips = [d / "a.mp4", d / "b.mp4", d / "c.mp4"]
    for f, n, phase in zip(clips, (9, 9, 5), (0.0, 1.0, 2.0)):
        write_video(f, pattern(n, phase=phase), fps=8)
        f.with_suffix(".txt").write_text(f"clip {f.stem}\n")
    vae = tiny_vae
    done = encode_clips(clips, d / "latents", vae, progress=False, num_workers=0)
    assert len(done.done) == 3
    return d / "latents"


def torchrun(*args, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "vidlatent.cli", "train", "tiny", *args]  # fmt: skip
    run = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return run


def losses(out: Path) -> list[float]:
    return [json.loads(r)["loss"] for r in (out / "metrics.jsonl").read_text().splitlines()]


def max_weight_diff(a: Path, b: Path, name: str = "model.safetensors") -> float:
    wa, wb = (
        load_file(a / "checkpoints" / "step-0000004" / name),
        load_file(b / "checkpoints" / "step-0000004" / name),
    )
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def test_share_splits_like_tensor_split():
    for n in range(7):
        for world in (1, 2, 3):
            parts = [list(share(n, r, world)) for r in range(world)]
            assert parts == [t.tolist() for t in torch.arange(n).tensor_split(world)]


@pytest.mark.parametrize("fails", [False, True])
def test_a_command_leaves_the_process_group_it_joined(tmp_path, fails):
    """A rank's process group is left by the CLI once the command that joined it is over, whether it finished
    or failed (a group left for the interpreter's exit to tear down can abort the process); a group joined
    before the command is left alone. One rank: no barrier."""

    def command(args) -> int:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        if fails:
            raise ValueError("no such thing")
        return 0

    try:
        assert run_command(argparse.Namespace(command="test", func=command, debug=False)) == (
            2 if fails else 0
        )
        assert not dist.is_initialized()
        # a group the caller had joined before the command is the caller's: kept
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=0, world_size=1)
        assert run_command(argparse.Namespace(command="test", func=lambda args: 0, debug=False)) == 0
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ddp_two_ranks_match_one_process(data, tmp_path):
    single = Trainer(
        load_train_config(
            "tiny", overrides=[f"data={data}", f"output={tmp_path / 'one'}", "batch_size=2", *RUN]
        )
    )
    expected = single.train()
    torchrun(f"data={data}", f"output={tmp_path / 'ddp'}", "batch_size=1", *RUN)
    got = losses(tmp_path / "ddp")
    assert len(got) == 4
    assert got == pytest.approx(expected, abs=1e-5), (got, expected)
    diff = max_weight_diff(tmp_path / "one", tmp_path / "ddp")
    assert diff < 1e-5, diff  # measured: losses equal bitwise, weights within 6e-8 (CPU, gloo)
    assert max_weight_diff(tmp_path / "one", tmp_path / "ddp", "ema.safetensors") < 1e-5
    # rank 0 alone wrote: one metrics file, checkpoints, the export
    assert (tmp_path / "ddp" / "final" / "dit" / "config.json").is_file()


@pytest.mark.slow
def test_ddp_resume_and_fsdp_match_one_process(data, tmp_path):
    single = Trainer(
        load_train_config(
            "tiny", overrides=[f"data={data}", f"output={tmp_path / 'one'}", "batch_size=2", *RUN]
        )
    )
    expected = single.train()
    # DDP, interrupted at step 2 and resumed by both ranks from the same checkpoint
    torchrun(f"data={data}", f"output={tmp_path / 'split'}", "batch_size=1", *RUN, "steps=2")
    torchrun(f"data={data}", f"output={tmp_path / 'split'}", "batch_size=1", *RUN, "resume=auto")
    assert losses(tmp_path / "split") == pytest.approx(expected, abs=1e-5)
    assert max_weight_diff(tmp_path / "one", tmp_path / "split") < 1e-5
    # FSDP2 (fully_shard per block, then the root) on gloo
    torchrun(f"data={data}", f"output={tmp_path / 'fsdp'}", "batch_size=1", *RUN, "parallel=fsdp")
    assert losses(tmp_path / "fsdp") == pytest.approx(expected, abs=1e-5)
    assert max_weight_diff(tmp_path / "one", tmp_path / "fsdp") < 1e-5
    assert (tmp_path / "fsdp" / "final" / "dit" / "config.json").is_file()
