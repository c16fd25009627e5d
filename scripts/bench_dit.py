"""Benchmark VideoDiT against diffusers' WanTransformer3DModel: same weights, same inputs, one process.

Runs alternate (ours, diffusers, ours, ...) so both see the same machine state; prints the median forward
time of each, the speed ratio (diffusers time / ours) and TFLOP/s from FLOPs counted by
torch.utils.flop_counter (matmuls and attention).

    python scripts/bench_dit.py                                    # CPU, fp32, reduced 2-layer 1.3B-width model
    python scripts/bench_dit.py --device cuda --dtype bf16 --full  # Wan 2.1 1.3B, 21x60x104 latents, 512 text
    python scripts/bench_dit.py --device cuda --dtype bf16 --full --train --latent 5 30 52
    python scripts/bench_dit.py --trace --full --latent 21 60 104          # peak tensor memory, meta device
    python scripts/bench_dit.py --trace --full --model wan2.2-ti2v-5b --latent 31 44 80 --per-token

``--trace`` sizes one forward of ours and diffusers' (bf16, inference) on the ``meta`` device with
``vidlatent.runtime.memory.PeakMemory`` (attention held as a flash kernel holds it): seconds on a CPU for a
model of any size; weights and inputs are not counted. ``--per-token`` gives one noise level per video token
(Wan 2.2 TI2V's timesteps: (b, tokens) modulation tables instead of (b, 1)).
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from vidlatent.checkpoint import load_into
from vidlatent.config import DiTConfig, load_config
from vidlatent.models.dit import VideoDiT, _cast, from_diffusers_state_dict, to_diffusers_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The CPU attention kernel is not in flop_counter's registry; count it with the same formulas as on GPU.
_CPU_SDPA = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _CPU_SDPA[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = (
        lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v)
    )
    _CPU_SDPA[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
        lambda grad, q, k, v, *args, out_shape=None, **kw: sdpa_backward_flop_count(grad, q, k, v)
    )


# --trace sizes (the released models' transformer configs; Wan 2.2 TI2V 5B reads Wan 2.2's 48-channel latents)
MODELS = {
    "wan2.1-t2v-1.3b": {},
    "wan2.1-t2v-14b": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "wan2.2-ti2v-5b": dict(
        dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_channels=48, out_channels=48
    ),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default fp32 on cpu, bf16 on cuda")
    p.add_argument("--full", action="store_true", help="the whole 1.3B (30 layers) instead of --layers")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--latent", type=int, nargs=3, default=None, metavar=("T", "H", "W"))
    p.add_argument("--text-len", type=int, default=None)
    p.add_argument("--batch", type=int, nargs="+", default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--train", action="store_true", help="time forward + backward instead of forward")
    p.add_argument("--compile", action="store_true", help="torch.compile both models first")
    p.add_argument("--no-diffusers", action="store_true", help="time ours alone")
    p.add_argument(
        "--attention", default="sdpa", help="our attention kernel: sdpa (torch picks), cudnn, flash, ..."
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument(
        "--trace", action="store_true", help="peak tensor memory of one forward on the meta device"
    )
    p.add_argument("--model", default="wan2.1-t2v-1.3b", choices=sorted(MODELS), help="--trace: which sizes")
    p.add_argument(
        "--per-token", action="store_true", help="--trace: one noise level per token (Wan 2.2 TI2V)"
    )
    p.add_argument("--top", type=int, default=6, help="--trace: how many of ours' largest held tensors")
    return p.parse_args()


def fp32_as_loaded(ref):
    """diffusers' model with the modules ``from_pretrained(torch_dtype=...)`` keeps in fp32 (its time embedder,
    norms and modulation table) back in fp32 after a ``.to(dtype)``, as a user's loaded model has them."""
    for name, module in ref.named_modules():
        if any(keep in name.split(".") for keep in ref._keep_in_fp32_modules):
            module.float()
    return ref


def build(cfg: DiTConfig, device, dtype, with_diffusers: bool):
    """Our model and (optionally) diffusers' (its fp32 modules as loaded: ``fp32_as_loaded``), sharing one set
    of seeded random weights."""
    torch.manual_seed(0)
    ref = None
    if with_diffusers:
        try:
            from diffusers import WanTransformer3DModel
        except ImportError:
            print("diffusers is not installed: timing ours alone")
            with_diffusers = False
    if with_diffusers:
        with torch.device(device):  # initialize where it will run (the 1.3B takes long on a CPU)
            ref = WanTransformer3DModel(**to_diffusers_config(cfg)).to(dtype)
        fp32_as_loaded(ref)
        with torch.no_grad():  # unit-gain random weights, so every part of the network carries signal
            for name, p in ref.named_parameters():
                if "norm" in name:
                    p.normal_(1.0, 0.2)
                elif p.ndim >= 2 and "scale_shift" not in name:
                    p.normal_(0, 1 / math.sqrt(p[0].numel()))
                else:
                    p.normal_(0, 0.5)
        with torch.device("meta"):
            ours = VideoDiT(cfg)
        _cast(ours, dtype)
        load_into(
            ours, {k: v.detach().clone() for k, v in from_diffusers_state_dict(ref.state_dict()).items()}
        )
        ours.to(device)
    else:
        ours = _cast(VideoDiT(cfg), dtype).to(device)
    return ours, ref


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_one(fn, device, target=None) -> float:
    """Seconds for one forward (or, given a target, one forward + backward of an MSE loss)."""
    sync(device)
    start = time.perf_counter()
    if target is not None:
        torch.nn.functional.mse_loss(fn().float(), target.float()).backward()
    else:
        with torch.inference_mode():
            fn()
    sync(device)
    return time.perf_counter() - start


def trace(args) -> None:
    """Peak tensor memory of one bf16 forward of ours and diffusers' on the meta device, and what ours holds."""
    from diffusers import WanTransformer3DModel

    from vidlatent.config import merge_config
    from vidlatent.runtime.memory import PeakMemory

    cfg = merge_config(load_config(DiTConfig, "dit", "wan2.1-t2v-1.3b"), MODELS[args.model])
    if not args.full:
        cfg.num_layers = args.layers
    dtype, mib = torch.bfloat16, 2**20
    with torch.device("meta"):
        ours = _cast(VideoDiT(cfg), dtype)
        ref = fp32_as_loaded(WanTransformer3DModel(**to_diffusers_config(cfg)).to(dtype))
    if args.per_token:  # torch.unique has no meta kernel: embed two levels (TI2V's clean frame and the rest)
        embed_levels = ours._time

        def per_token_time(sigma):
            where = torch.zeros(sigma.shape, dtype=torch.long, device=sigma.device)
            time_emb, time_mod = embed_levels(sigma.new_empty(2))
            return time_emb[where], time_mod[where]

        ours._time = per_token_time
    t, h, w = args.latent or [21, 60, 104]
    text_len = args.text_len or 512
    tokens = t * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    print(f"peak tensor memory (meta device: sizes only), {args.model}, {cfg.num_layers} layers, bf16, latents "
          f"{t}x{h}x{w} ({tokens} tokens), {text_len} text tokens, noise level per "
          f"{'token' if args.per_token else 'video'}; weights and inputs not counted")  # fmt: skip
    for batch in args.batch or [1]:
        x = torch.empty(batch, cfg.in_channels, t, h, w, device="meta", dtype=dtype)
        ctx = torch.empty(batch, text_len, cfg.text_dim, device="meta", dtype=dtype)
        sigma = torch.empty(batch, *([tokens] if args.per_token else []), device="meta")
        runs = {"ours": functools.partial(ours, x, sigma, ctx),
                "diffusers": functools.partial(ref, x, 1000 * sigma, ctx, return_dict=False)}  # fmt: skip
        peaks = {}
        for name, fn in runs.items():
            with torch.inference_mode(), PeakMemory() as memory:
                fn()
            peaks[name] = memory
        print(f"batch {batch}: ours {peaks['ours'].peak / mib:.0f} MiB, diffusers {peaks['diffusers'].peak / mib:.0f} "
              f"MiB, ratio {peaks['ours'].peak / peaks['diffusers'].peak:.2f}x")  # fmt: skip
        for name, memory in peaks.items():
            print(f"  {name} holds at its peak:")
            for held in memory.at_peak[: args.top]:
                print(f"    {held.bytes / mib:9.1f} MiB  {held.op:<40} {held.shape}")


def main():
    args = parse_args()
    if args.trace:
        return trace(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.device(args.device).type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    cfg = load_config(DiTConfig, "dit", "wan2.1-t2v-1.3b")
    if not args.full:
        cfg.num_layers = args.layers
    latent = args.latent or ([21, 60, 104] if cuda else [5, 16, 24])
    text_len = args.text_len or (512 if cuda else 256)
    batches = args.batch or ([1, 2] if cuda and not args.train else [1])
    repeats = args.repeats or (5 if cuda else 4)
    ours, ref = build(cfg, args.device, dtype, not args.no_diffusers)
    ours.set_attention(args.attention)
    print(
        f"device {args.device} ({torch.cuda.get_device_name() if cuda else f'{torch.get_num_threads()} threads'})"
        f", {dtype}, torch {torch.__version__}; {cfg.num_layers} layers x dim {cfg.dim}, latents {latent}, "
        f"{text_len} text tokens, {'forward+backward' if args.train else 'forward'}, our attention {args.attention}"
    )
    if args.compile:
        ours = torch.compile(ours)
        ref = torch.compile(ref) if ref is not None else None

    for batch in batches:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(batch, cfg.in_channels, *latent, generator=g).to(args.device, dtype)
        sigma = torch.rand(batch, generator=g).to(args.device)
        ctx = torch.randn(batch, text_len, cfg.text_dim, generator=g).to(args.device, dtype)
        target = torch.randn_like(x)

        run_ours = functools.partial(ours, x, sigma, ctx)
        run_ref = functools.partial(lambda *a: ref(*a, return_dict=False)[0], x, 1000 * sigma, ctx)
        timed = functools.partial(time_one, device=args.device, target=target if args.train else None)

        runners = {"ours": run_ours} | ({"diffusers": run_ref} if ref is not None else {})
        with torch.inference_mode():
            if ref is not None:
                a, b = run_ours().float(), run_ref().float()
                print(
                    f"batch {batch}: max |ours - diffusers| = {(a - b).abs().max():.3g} (output std {b.std():.3g})"
                )
        flops = {}
        for name, fn in runners.items():
            with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
                timed(fn)  # also the warm-up
            flops[name] = counter.get_total_flops()
            timed(fn)
        times = {name: [] for name in runners}
        for _ in range(repeats):
            for name, fn in runners.items():
                times[name].append(timed(fn))
                if args.train:
                    for model in (ours, ref):
                        if model is not None:
                            model.zero_grad(set_to_none=True)
        for name in runners:
            t = statistics.median(times[name])
            print(
                f"  {name:9s} {t * 1e3:9.1f} ms  {flops[name] / 1e12:8.4g} TFLOP  {flops[name] / t / 1e12:8.4g} TFLOP/s"
            )
        if ref is not None:
            ratio = statistics.median(times["diffusers"]) / statistics.median(times["ours"])
            print(f"  speed ratio ours vs diffusers: {ratio:.3f}x (>1 means ours is faster)")


if __name__ == "__main__":
    main()
