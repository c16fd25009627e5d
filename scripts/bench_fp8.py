"""fp8 weight storage, measured: parameter bytes, relative output error, and the default model's oracle score.

1. Bytes of the Wan 2.1 1.3B and 14B denoisers' weights in bf16 and with fp8 block linears (built on the meta
   device: no memory, no time).
2. Relative output error ``||v_fp8 - v|| / ||v||`` against the same model unquantized, per output channel and
   per tensor, computing in fp32 and in bf16: a Wan-config denoiser (2 layers at 1.3B widths, random weights
   with every table and the head non-zero) on small latents, and the shipped default model.
3. ``--oracle N``: the default model's held-out score (``eval.shapes.score_split``, N prompts of the held-out
   split x ``--seeds``) in fp32 and with fp8 weights.

    python scripts/bench_fp8.py                  # 1 and 2 (about a minute on 2 CPU cores)
    python scripts/bench_fp8.py --oracle 48      # and 3
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from vidlatent import VideoPipeline
from vidlatent.config import DiTConfig, load_config
from vidlatent.models.dit import VideoDiT, _cast
from vidlatent.runtime import parameter_bytes, quantize


def sizes() -> None:
    for preset in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b"):
        with torch.device("meta"):
            model = _cast(VideoDiT(load_config(DiTConfig, "dit", preset)), torch.bfloat16)
        bf16 = parameter_bytes(model)
        quantize(model)
        fp8 = parameter_bytes(model)
        print(
            f"{preset}: bf16 {bf16 / 2**30:.2f} GiB, fp8 blocks {fp8 / 2**30:.2f} GiB ({fp8 / bf16:.3f} of bf16)"
        )


def rel_error(model: VideoDiT, inputs: tuple, per: str, dtype: torch.dtype) -> float:
    ref = _cast(copy.deepcopy(model), dtype)
    q = copy.deepcopy(ref)
    quantize(q, per)
    with torch.no_grad():
        a, b = ref(*inputs).float(), q(*inputs).float()
    return ((a - b).norm() / a.norm()).item()


def errors(name: str, model: VideoDiT, inputs: tuple) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        cells = [f"per {per} {rel_error(model, inputs, per, dtype):.4f}" for per in ("channel", "tensor")]
        print(f"{name}, computing in {str(dtype).removeprefix('torch.')}: relative error " + ", ".join(cells))


def wan_config_model() -> tuple[VideoDiT, tuple]:
    cfg = load_config(DiTConfig, "dit", "wan2.1-t2v-1.3b", overrides=["num_layers=2"])
    torch.manual_seed(0)
    model = VideoDiT(cfg).eval()
    with torch.no_grad():  # a fresh model has zero gates and head: give every table and the head some size
        for block in model.blocks:
            block.modulation.normal_(0, 0.1)
        model.time_modulation.weight.normal_(0, 0.02)
        model.head.proj.weight.normal_(0, 0.02)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, 3, 16, 16, generator=g)
    context = torch.randn(2, 32, cfg.text_dim, generator=g)
    return model, (x, torch.tensor([0.3, 0.8]), context)


def oracle(count: int, seeds: list[int]) -> None:
    from vidlatent.eval.shapes import pool, score_split

    for weights in (None, "fp8"):
        pipe = VideoPipeline.from_pretrained("default", weights_dtype=weights)
        t0 = time.perf_counter()
        runs = [score_split(pipe, "heldout", count, batch=24, seed=s) for s in seeds]
        r = pool(runs, seeds)
        rates = " ".join(f"{k} {r[k]:.1%}" for k in ("colour", "shape", "motion", "all"))
        print(f"default model, weights {weights or 'fp32'}: held-out {count} prompts x {len(seeds)} seeds: "
              f"{rates} ({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--oracle", type=int, default=0, help="held-out prompts to score (0: skip)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    sizes()
    errors("Wan 2.1 1.3B config, 2 layers, random weights, 2x16x3x16x16 latents", *wan_config_model())
    pipe = VideoPipeline.from_pretrained("default")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, pipe.dit.config.in_channels, 5, 8, 8, generator=g)
    context, mask = pipe.text_encoder.encode(["a red circle moving right", "a blue square moving up"])
    errors("default model, 2x5x8x8 latents", pipe.dit, (x, torch.tensor([0.5, 0.9]), context, mask))
    if args.oracle:
        oracle(args.oracle, args.seeds)


if __name__ == "__main__":
    main()
