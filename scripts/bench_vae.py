"""Benchmark: vidlatent's CausalVAE against diffusers' AutoencoderKLWan, same weights, same input, one process.

Runs alternate (ours, reference, ours, ...) so machine noise hits both; prints frames/s, the ratio and peak
memory. A second mode prints peak memory against clip length for streaming (chunked) vs whole-clip runs,
each measured in a fresh subprocess.

    python scripts/bench_vae.py                                   # CPU, fp32, Wan 2.1 config, 17x128x128
    python scripts/bench_vae.py --device cuda --dtype bf16 --frames 17 81 --size 480 832
    python scripts/bench_vae.py --device cuda --dtype bf16 --cudnn-benchmark
    python scripts/bench_vae.py --memory-table --frames 17 81 321 --size 64 64
    python scripts/bench_vae.py --preset wan2.2 --size 128 128             # the Wan 2.2 VAE (4x16x16)
    python scripts/bench_vae.py --wan22-720p                              # issue 23's GPU row (below)
    python scripts/bench_vae.py --trace --dtype bf16 --frames 81 --size 480 832   # peak tensor memory, meta

``--trace`` sizes ours and diffusers' encode and decode on the ``meta`` device (no data, no compute: seconds on
a CPU at any size) with ``vidlatent.runtime.memory.PeakMemory`` and lists what ours holds at its peak. A GPU's
allocator peak is higher by kernels' own scratch space (cuDNN workspaces), for both.

``--wan22-720p`` is the Wan 2.2 VAE decode of 121x704x1280 (5 s at 720p) on CUDA in bf16, ours against
diffusers: time and peak memory, and whether it meets the target (>= 1.5x faster at <= 0.7x diffusers' peak).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(preset: str, device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKLWan

    from vidlatent import CausalVAE
    from vidlatent.models.vae import diffusers_key_map, export_state_dict, vae_config_to_diffusers

    torch.manual_seed(0)
    ours = CausalVAE.from_pretrained(preset)
    with torch.no_grad():  # random weights scaled so activations stay O(1), as trained weights do
        for p in ours.parameters():
            if p.dim() > 1:
                p.normal_(0, p[0].numel() ** -0.5)
    ref = AutoencoderKLWan(**vae_config_to_diffusers(ours.config))
    ref.load_state_dict(export_state_dict(ours, diffusers_key_map(ours), like=ref.state_dict()))
    return ours.to(device, dtype).eval(), ref.to(device, dtype).eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str):
    """Run fn once; return (seconds, peak bytes above the start on CUDA or None on CPU)."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start_mem = torch.cuda.memory_allocated()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - start_mem if device == "cuda" else None
    return dt, peak


def speed(args) -> None:
    dtype = DTYPES[args.dtype]
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    ours, ref = build(args.preset, args.device, dtype)
    h, w = args.size
    gib = 2**30
    print(f"device={args.device} dtype={args.dtype} preset={args.preset} threads={torch.get_num_threads()} "
          f"cudnn.benchmark={args.cudnn_benchmark} chunk_size={args.chunk_size}")  # fmt: skip
    if args.device == "cuda":
        print(f"gpu: {torch.cuda.get_device_name(0)}")
    for t in args.frames:
        x = (torch.rand(1, 3, t, h, w, generator=torch.Generator().manual_seed(t)) * 2 - 1).to(
            args.device, dtype
        )
        with torch.no_grad():
            if "encode" in args.ops:
                z = ours.encode(x).mean
            else:  # decode only: latents of the clip's shape (no encode of a long clip first)
                tf, sf = ours.temporal_factor, ours.spatial_factor
                shape = (1, ours.config.latent_channels, 1 + (t - 1) // tf, h // sf, w // sf)
                z = torch.randn(shape, generator=torch.Generator().manual_seed(t)).to(args.device, dtype)
            jobs = {
                ("encode", "ours"): lambda x=x: ours.encode(x, chunk_size=args.chunk_size, tile=False).mean,
                ("encode", "diffusers"): lambda x=x: ref.encode(x).latent_dist.mean,
                ("decode", "ours"): lambda z=z: ours.decode(z, chunk_size=args.chunk_size, tile=False),
                ("decode", "diffusers"): lambda z=z: ref.decode(z).sample,
            }
            jobs = {k: fn for k, fn in jobs.items() if k[0] in args.ops}
            for fn in jobs.values():  # warm-up (cudnn autotuning, allocator)
                fn()
            times = {k: [] for k in jobs}
            peaks = {k: 0 for k in jobs}
            for _ in range(args.repeats):
                for key, fn in jobs.items():
                    dt, peak = timed(fn, args.device)
                    times[key].append(dt)
                    peaks[key] = max(peaks[key], peak or 0)
        for op in args.ops:
            ours_t, ref_t = min(times[(op, "ours")]), min(times[(op, "diffusers")])
            mem = ""
            if args.device == "cuda":
                mem = f"  peak ours {peaks[(op, 'ours')] / gib:.2f} GiB vs diffusers {peaks[(op, 'diffusers')] / gib:.2f} GiB"
            print(
                f"{op} {t}x{h}x{w}: ours {t / ours_t:7.2f} frames/s ({ours_t:.3f} s)  diffusers {t / ref_t:7.2f} "
                f"frames/s ({ref_t:.3f} s)  ratio {ref_t / ours_t:.2f}x{mem}"
            )
            if args.target:
                speedup, mem_ratio = ref_t / ours_t, peaks[(op, "ours")] / max(peaks[(op, "diffusers")], 1)
                verdict = "meets" if speedup >= 1.5 and mem_ratio <= 0.7 else "misses"
                print(f"target (>= 1.5x faster at <= 0.7x diffusers' peak): {speedup:.2f}x at {mem_ratio:.2f}x "
                      f"peak -> {verdict}")  # fmt: skip


def trace(args) -> None:
    """Peak tensor memory of ours and diffusers on the meta device, and what ours holds at its peak."""
    from vidlatent.runtime.memory import PeakMemory

    dtype = DTYPES[args.dtype]
    ours, ref = build(args.preset, "cpu", torch.float32)
    ours, ref = ours.to("meta", dtype), ref.to("meta", dtype)
    h, w = args.size
    mib = 2**20
    print(f"peak tensor memory (meta device: sizes only), preset={args.preset} dtype={args.dtype} "
          f"chunk_size={args.chunk_size}, inputs and weights not counted")  # fmt: skip
    for t in args.frames:
        sf, tf = ours.spatial_factor, ours.temporal_factor
        x = torch.zeros(1, 3, t, h, w, device="meta", dtype=dtype)
        z = torch.zeros(
            1, ours.config.latent_channels, 1 + (t - 1) // tf, h // sf, w // sf, device="meta", dtype=dtype
        )
        jobs = {
            "encode": (lambda x=x: ours.encode(x, chunk_size=args.chunk_size, tile=False).mean,
                       lambda x=x: ref.encode(x).latent_dist.mean),
            "decode": (lambda z=z: ours.decode(z, chunk_size=args.chunk_size, tile=False),
                       lambda z=z: ref.decode(z).sample),
        }  # fmt: skip
        for op in args.ops:
            peaks = []
            for fn in jobs[op]:
                with torch.no_grad(), PeakMemory() as memory:
                    fn()
                peaks.append(memory)
            ours_m, ref_m = peaks
            print(f"{op} {t}x{h}x{w}: ours {ours_m.peak / mib:.0f} MiB, diffusers {ref_m.peak / mib:.0f} MiB, "
                  f"ratio {ours_m.peak / ref_m.peak:.2f}x")  # fmt: skip
            for held in ours_m.at_peak[: args.top]:
                print(f"    {held.bytes / mib:9.1f} MiB  {held.op:<32} {held.shape}")


def memory_child(args) -> None:
    """One measurement in a fresh process: peak memory of one encode or decode (CUDA: allocator; CPU: RSS)."""
    dtype = DTYPES[args.dtype]
    from vidlatent import CausalVAE

    vae = CausalVAE.from_pretrained(args.preset).to(args.device, dtype).eval()
    h, w = args.size
    t = args.frames[0]
    with torch.no_grad():
        if args.op == "encode":
            x = torch.rand(1, 3, t, h, w, device=args.device, dtype=dtype) * 2 - 1
            fn = lambda: vae.encode(x, chunk_size=args.chunk_size, tile=False).mean  # noqa: E731
        else:
            tf, sf = vae.temporal_factor, vae.spatial_factor
            shape = (1, vae.config.latent_channels, 1 + (t - 1) // tf, h // sf, w // sf)
            x = torch.randn(shape, device=args.device, dtype=dtype)
            fn = lambda: vae.decode(x, chunk_size=args.chunk_size, tile=False)  # noqa: E731
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        dt, peak = timed(fn, args.device)
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({"peak": peak, "seconds": dt}))


def memory_table(args) -> None:
    h, w = args.size
    print(f"peak memory above the loaded model, {args.preset} {h}x{w} {args.dtype} on {args.device} "
          "(CPU: growth of max RSS, so each cell runs in a fresh process)")  # fmt: skip
    print(f"{'op':<7}{'mode':<20}" + "".join(f"{t:>12} fr" for t in args.frames))
    for op in ("encode", "decode"):
        for label, chunk in (("streaming (chunk 1)", 1), ("whole clip", 0)):
            cells = []
            for t in args.frames:
                cmd = [sys.executable, __file__, "--child", "--op", op, "--frames", str(t), "--chunk-size", str(chunk),
                       "--size", str(h), str(w), "--device", args.device, "--dtype", args.dtype, "--preset", args.preset]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    cells.append("failed")
                    print(out.stderr[-2000:], file=sys.stderr)
                    continue
                res = json.loads(out.stdout.strip().splitlines()[-1])
                cells.append(f"{res['peak'] / 2**20:.0f} MiB")
            print(f"{op:<7}{label:<20}" + "".join(f"{c:>15}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--preset", default="wan2.1")
    parser.add_argument("--frames", type=int, nargs="+", default=[17])
    parser.add_argument("--size", type=int, nargs=2, default=[128, 128], metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="latent frames per chunk (0 = whole clip)"
    )
    parser.add_argument("--ops", nargs="+", default=["encode", "decode"], choices=["encode", "decode"])
    parser.add_argument("--cudnn-benchmark", action="store_true")
    parser.add_argument(
        "--wan22-720p",
        action="store_true",
        help="Wan 2.2 VAE decode of 121x704x1280 on CUDA, bf16, ours vs diffusers, against the issue's target",
    )
    parser.add_argument("--memory-table", action="store_true")
    parser.add_argument("--trace", action="store_true", help="peak tensor memory on the meta device")
    parser.add_argument("--top", type=int, default=6, help="--trace: how many of ours' largest held tensors")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--op", default="encode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.target = args.wan22_720p
    if args.wan22_720p:
        args.preset, args.device, args.dtype, args.ops = "wan2.2", "cuda", "bf16", ["decode"]
        args.frames, args.size, args.repeats = [121], [704, 1280], min(args.repeats, 2)
    if args.child:
        memory_child(args)
    elif args.memory_table:
        memory_table(args)
    elif args.trace:
        trace(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
