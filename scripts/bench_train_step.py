"""Benchmark a denoiser training step.

Default mode: the host side of the trainer's step: seconds per step and aten ops dispatched per step.

A small model on a GPU spends most of its step launching kernels, so the number of aten ops the trainer
dispatches per step (forward, backward, gradient clipping, optimizer, EMA) bounds its speed there; on a CPU
with a tiny model the step time is mostly that same host work. The data are random latents in a temporary
folder; the model starts from random weights.

    python scripts/bench_train_step.py                                  # tiny denoiser, CPU, fp32
    python scripts/bench_train_step.py --dit default-arch --batch 128 --device cuda --precision bf16
    python scripts/bench_train_step.py --dit default-arch --batch 128 --device cuda --precision bf16 compile=true

``--vs-diffusers``: one LoRA training step (rank 16 on the attention and feed-forward linears, flow-matching
MSE, backward, fused AdamW on the adapters) of the Wan 2.1 T2V 1.3B config at 81x480x832 (21x60x104 latents,
32,760 tokens, 512 text tokens), random weights, batch 1: ours (``VideoDiT`` + ``train.lora.add_lora``)
against diffusers' ``WanTransformer3DModel`` + peft's ``add_adapter`` holding the same weights, in the same
process, one after the other. Prints median seconds per step, model TFLOP/s (3 x the forward's FLOPs) and
CUDA peak memory of each, and the two models' first losses (equal weights give equal losses: a check that
the same step is timed). ``--tiny`` runs it with the tiny config and latents on a CPU (to know it works).

    python scripts/bench_train_step.py --vs-diffusers --device cuda --precision bf16   # the 1.3B figure
    python scripts/bench_train_step.py --vs-diffusers --tiny                          # CPU smoke run
    python scripts/bench_train_step.py --vs-diffusers --device cuda --precision bf16 --checkpointing
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

from vidlatent.config import DiTConfig, load_config
from vidlatent.data.latents import FORMAT, FORMAT_VERSION
from vidlatent.models.dit import VideoDiT, to_diffusers_config, to_diffusers_state_dict
from vidlatent.train.tasks.denoiser import dit_flops
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


# diffusers' names of the linears train.lora.add_lora adapts (attention: q, k, v, out of both; ffn: fc1, fc2)
DIFFUSERS_TARGETS = [f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")]
DIFFUSERS_TARGETS += ["ffn.net.0.proj", "ffn.net.2"]


def lora_step(forward, params, inputs, target, precision, device) -> float:
    """One training step: forward under autocast, MSE to ``target``, backward, the optimizer step. Its loss."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        pred = forward(*inputs)
    loss = torch.nn.functional.mse_loss(pred.float(), target)
    loss.backward()
    params["optimizer"].step()
    params["optimizer"].zero_grad(set_to_none=True)
    return loss.item()


def timed(name, build, inputs, target, args, device) -> dict:
    """Build one model (``build() -> (forward, trainable params)``), then warm-up and timed steps."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    forward, trainable = build()
    fused = device.type in ("cuda", "cpu")
    state = {"optimizer": torch.optim.AdamW(trainable, lr=1e-4, fused=fused)}
    first = lora_step(forward, state, inputs, target, args.precision, device)
    for _ in range(args.warmup - 1):
        lora_step(forward, state, inputs, target, args.precision, device)
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        lora_step(forward, state, inputs, target, args.precision, device)
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"name": name, "seconds": statistics.median(times), "peak_gib": peak, "first_loss": first,
            "trainable": sum(p.numel() for p in trainable)}  # fmt: skip


def compare_with_diffusers(args) -> None:
    """``--vs-diffusers``: the same LoRA step on ours and on diffusers + peft (see the module docstring)."""
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig

    from vidlatent.train.lora import add_lora

    device = torch.device(args.device)
    cfg = load_config(DiTConfig, "dit", args.dit or ("tiny" if args.tiny else "wan2.1-t2v-1.3b"))
    t, h, w = args.latent or ((2, 8, 8) if args.tiny else (21, 60, 104))
    n_text = args.text_tokens or (8 if args.tiny else 512)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, t, h, w, generator=g).to(device)
    sigma = torch.rand(1, generator=g).to(device)
    context = torch.randn(1, n_text, cfg.text_dim, generator=g).to(device)
    target = torch.randn(x.shape, generator=g).to(device)
    torch.manual_seed(0)
    with device:  # every model is initialised where it runs (the 1.3B's random init takes long on a CPU)
        # the random init, copied to the CPU (on a CPU, .cpu() would alias the init model's tensors)
        weights = {k: v.to("cpu", copy=True) for k, v in VideoDiT(cfg).state_dict().items()}

    def ours():
        with device:
            dit = VideoDiT(cfg)
        dit.load_state_dict(weights)
        dit.gradient_checkpointing = args.checkpointing
        add_lora(dit.to(device), args.rank)
        return (lambda *a: dit(*a)), [p for p in dit.parameters() if p.requires_grad]

    def theirs():
        with device:
            model = WanTransformer3DModel(**to_diffusers_config(cfg))
        model.load_state_dict(to_diffusers_state_dict(weights))
        if args.checkpointing:
            model.enable_gradient_checkpointing()
        model.to(device).requires_grad_(False)
        model.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=DIFFUSERS_TARGETS))

        def forward(x, sigma, context):
            return model(x, timestep=1000 * sigma, encoder_hidden_states=context, return_dict=False)[0]

        return forward, [p for p in model.parameters() if p.requires_grad]

    pt, ph, pw = cfg.patch_size
    tokens = (t // pt) * (h // ph) * (w // pw)
    flops = 3 * dit_flops(cfg, tokens, n_text)
    rows = []
    for name, build in (("vidlatent", ours), ("diffusers+peft", theirs)):
        rows.append(timed(name, build, (x, sigma, context), target, args, device))
        print(f"  {name}: {rows[-1]['seconds'] * 1e3:.1f} ms/step", flush=True)
        gc.collect()
    print(f"LoRA rank {args.rank} step, {cfg.num_layers} layers x dim {cfg.dim}, latents {(t, h, w)} "
          f"({tokens} tokens), {n_text} text tokens, {device}, precision {args.precision}, "
          f"checkpointing {args.checkpointing}, median of {args.steps} steps after {args.warmup}:")  # fmt: skip
    for r in rows:
        peak = f"{r['peak_gib']:.2f} GiB peak" if r["peak_gib"] is not None else "peak: CUDA only"
        print(f"  {r['name']:<15} {r['seconds'] * 1e3:9.1f} ms/step  {flops / r['seconds'] / 1e12:8.3f} TFLOP/s  "
              f"{peak}  first loss {r['first_loss']:.6f}  {r['trainable']} trainable")  # fmt: skip
    ratio = rows[1]["seconds"] / rows[0]["seconds"]
    print(f"  speed-up (diffusers time / ours): {ratio:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--dit", default=None, help="denoiser preset (default: tiny; --vs-diffusers: wan2.1-t2v-1.3b)"
    )
    ap.add_argument(
        "--text-encoder", default="default-arch", help="text encoder preset (trained with the denoiser)"
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--latent", type=int, nargs=3, default=None, metavar=("T", "H", "W"),
                    help="latent size (default 5 8 8; --vs-diffusers: 21 60 104, i.e. 81x480x832)")  # fmt: skip
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="no", choices=("no", "bf16"))
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; --vs-diffusers: 5)")
    ap.add_argument("--vs-diffusers", action="store_true", help="ours vs diffusers + peft, one LoRA step")
    ap.add_argument("--tiny", action="store_true", help="--vs-diffusers at the tiny size (a CPU smoke run)")
    ap.add_argument("--rank", type=int, default=16, help="--vs-diffusers: LoRA rank")
    ap.add_argument("--text-tokens", type=int, default=None, help="--vs-diffusers: text tokens (512)")
    ap.add_argument("--warmup", type=int, default=2, help="--vs-diffusers: untimed steps first")
    ap.add_argument("--checkpointing", action="store_true", help="--vs-diffusers: gradient checkpointing")
    ap.add_argument("overrides", nargs="*", help="more training options, e.g. ema_decay=0")
    args = ap.parse_args()
    if args.vs_diffusers:
        args.steps = args.steps or (2 if args.tiny else 5)
        compare_with_diffusers(args)
        return
    args.dit, args.latent, args.steps = args.dit or "tiny", args.latent or (5, 8, 8), args.steps or 10
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
