"""What the non-finite guards cost: the NaN/inf scan of weights at load (``check_finite``) against the load
itself, and the per-step latent check of the sampling loops against a denoiser step.

    python scripts/bench_checks.py                 # the default model, and a Wan 2.1-size VAE folder
    python scripts/bench_checks.py --device cuda   # the same on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vidlatent import CausalVAE, VideoPipeline
from vidlatent.checks import all_finite, check_weights_finite


def best(fn, repeat: int) -> float:
    """Median wall time of ``fn()`` in seconds (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def load_cost(device: str, repeat: int) -> None:
    # safetensors maps files lazily: a load touches the weights when they are copied (to a device or dtype);
    # the scan is timed on weights already in memory, so it is its own cost, not the page-in of the load
    def load():
        return VideoPipeline.from_pretrained("default", device=device)

    pipe = load()
    t_load = best(load, repeat)
    t_touch = best(lambda: [p.clone() for p in load().dit.parameters()], repeat) - t_load

    def scan():
        for model in (pipe.vae, pipe.dit, pipe.text_encoder):
            check_weights_finite(model, "model")

    t_scan = best(scan, repeat)
    print(
        f"default model load {t_load * 1e3:.1f} ms (+{t_touch * 1e3:.1f} ms to copy the denoiser's weights once), "
        f"NaN/inf scan {t_scan * 1e3:.2f} ms ({100 * t_scan / t_load:.1f}% of the load)"
    )

    with tempfile.TemporaryDirectory() as tmp:  # Wan 2.1's VAE: 126.9M parameters, 508 MB in fp32
        CausalVAE.from_pretrained("wan2.1").save_pretrained(Path(tmp) / "vae")
        folder = Path(tmp) / "vae"
        t_lazy = best(lambda: CausalVAE.from_pretrained(folder, device=device), max(1, repeat // 2))
        t_load = best(
            lambda: CausalVAE.from_pretrained(folder, device=device, dtype=torch.bfloat16), repeat // 2
        )
        vae = CausalVAE.from_pretrained(folder, device=device, dtype=torch.bfloat16)
        t_scan = best(lambda: check_weights_finite(vae, "vae"), repeat)
        print(
            f"wan2.1 VAE (508 MB fp32) load {t_lazy * 1e3:.0f} ms mapped lazily, {t_load * 1e3:.0f} ms into bf16; "
            f"scan of the loaded bf16 weights {t_scan * 1e3:.1f} ms ({100 * t_scan / t_load:.1f}% of the bf16 load)"
        )


def step_cost(device: str, repeat: int) -> None:
    pipe = VideoPipeline.from_pretrained("default", device=device)
    cfg = pipe.config
    shape = pipe._latent_shape(1, cfg.frames, cfg.height, cfg.width)
    x = torch.randn(shape, device=device)
    context, mask = pipe.text_encoder.encode(["a red circle moving right", ""])
    sigma = torch.full((2,), 0.5, device=device)
    with torch.no_grad():
        t_step = best(lambda: pipe.dit(torch.cat([x, x]), sigma, context, mask), repeat)
    t_check = best(lambda: all_finite(x), repeat * 10)
    print(
        f"default model step (CFG batch 2, latents {tuple(shape)}) {t_step * 1e3:.2f} ms, "
        f"finite check {t_check * 1e6:.0f} us ({100 * t_check / t_step:.2f}%)"
    )
    big = torch.randn(1, 16, 21, 60, 104, device=device)  # Wan 2.1, 81 x 480 x 832
    t_big = best(lambda: all_finite(big), repeat * 10)
    print(f"finite check of Wan 2.1 480p latents (1, 16, 21, 60, 104): {t_big * 1e6:.0f} us per step")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_cost(args.device, args.repeat)
    step_cost(args.device, args.repeat)


if __name__ == "__main__":
    main()
