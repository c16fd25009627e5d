"""Benchmark the host side of one denoiser training step: seconds per step and aten ops dispatched per step.

A small model on a GPU spends most of its step launching kernels, so the number of aten ops the trainer
dispatches per step (forward, backward, gradient clipping, optimizer, EMA) bounds its speed there; on a CPU
with a tiny model the step time is mostly that same host work. The data are random latents in a temporary
folder; the model starts from random weights.

    python scripts/bench_train_step.py                                  # tiny denoiser, CPU, fp32
    python scripts/bench_train_step.py --dit default --batch 128 --device cuda --precision bf16
    python scripts/bench_train_step.py --dit default --batch 128 --device cuda --precision bf16 compile=true
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

from vidlatent.data.latents import FORMAT, FORMAT_VERSION
from vidlatent.train.trainer import Trainer, load_train_config

CAPTIONS = ["a red circle moving right", "a blue square bouncing", "a green triangle moves up and left"]


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that reach the dispatcher (what a GPU would launch kernels for), by name."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket).removeprefix("aten.")] += 1
        return func(*args, **(kwargs or {}))


def write_latents(folder: Path, clips: int, shape: tuple[int, ...]) -> None:
    """``clips`` normalized latent files of random values, captioned, in the format ``encode_clips`` writes."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "normalized": "true"}
    lines = []
    for i in range(clips):
        name = f"clip-{i:04d}.safetensors"
        save_file({"latents": torch.randn(shape)}, str(folder / name), metadata=meta)
        lines.append(json.dumps({"path": name, "caption": CAPTIONS[i % len(CAPTIONS)]}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dit", default="tiny", help="denoiser preset (tiny, default, ...)")
    ap.add_argument(
        "--text-encoder", default="default", help="text encoder preset (trained with the denoiser)"
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--latent", type=int, nargs=3, default=(5, 8, 8), metavar=("T", "H", "W"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="no", choices=("no", "bf16"))
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after 3 warm-up steps)")
    ap.add_argument("overrides", nargs="*", help="more training options, e.g. ema_decay=0")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "latents"
        data.mkdir()
        write_latents(data, max(args.batch, 16), (16, *args.latent))
        options = [f"dit={args.dit}", f"text_encoder={args.text_encoder}", f"data={data}",
                   f"captions={data / 'metadata.jsonl'}", f"batch_size={args.batch}", f"device={args.device}",
                   f"mixed_precision={args.precision}", "data_in_memory=true", "progress=false",
                   f"output={Path(tmp) / 'run'}", "steps=1000000", "checkpoint_every=1000000",
                   "log_every=1000000", "first_frame_dropout=0.5", *args.overrides]  # fmt: skip
        trainer = Trainer(load_train_config("default-dit", overrides=options))
        sync = torch.cuda.synchronize if trainer.device.type == "cuda" else lambda: None
        for _ in range(3):
            trainer.train_step()
        times = []
        for _ in range(args.steps):
            sync()
            t0 = time.perf_counter()
            trainer.train_step()
            sync()
            times.append(time.perf_counter() - t0)
        counter = OpCounter()
        if not trainer.config.compile:  # compiled blocks would run eagerly under the counter: not counted
            with counter:
                trainer.train_step()
    ops = counter.ops
    counted = f"{sum(ops.values())} aten ops/step" if ops else "ops not counted (compile=true)"
    print(f"denoiser {args.dit}, batch {args.batch}, latents {tuple(args.latent)}, {trainer.device}, "
          f"precision {args.precision}: {statistics.median(times) * 1e3:.1f} ms/step (median of {args.steps}), "
          f"{counted}")  # fmt: skip
    if ops:
        print("most frequent: " + ", ".join(f"{name} {n}" for name, n in ops.most_common(12)))


if __name__ == "__main__":
    main()
