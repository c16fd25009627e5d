"""Benchmark the whole text-to-video pipeline against diffusers' WanPipeline: same folder, noise, prompt, one process.

A diffusers Wan 2.1 T2V folder with random weights is written once (the 1.3B transformer and the Wan 2.1 VAE at
their real sizes; the text encoder a 2-layer UMT5 at UMT5-XXL's width with a local word-level tokenizer, since
no hub is reachable and both pipelines run the encoder identically, once per prompt). Then ``WanPipeline`` and
``VideoPipeline.from_pretrained`` of that folder generate the same video from the same start noise, alternating,
and the script prints seconds end to end, seconds per step (from a run with ``--steps`` and one with 2 steps),
peak accelerator memory, the speed ratio and the largest difference between the two videos.

    python scripts/bench_pipeline.py --tiny                              # CPU smoke run, tiny widths
    python scripts/bench_pipeline.py --device cuda                       # 1.3B, 81x480x832, 50 steps, bf16
    python scripts/bench_pipeline.py --device cuda --frames 17 --steps 10   # a shorter check
    python scripts/bench_pipeline.py --device cuda --mode blocks --preset wan2.1-t2v-14b   # 14B, blocks offload

``--mode`` runs both pipelines the same way: ``model`` (ours ``offload="model"``, diffusers'
``enable_model_cpu_offload``), ``blocks`` (ours ``offload="blocks"``, diffusers' ``enable_group_offload`` at block
level on a side stream, the VAE too), ``fp8`` (ours ``weights_dtype="fp8"``, diffusers'
``enable_layerwise_casting`` to float8 e4m3 storage). Without an accelerator, offload runs plainly (ours says so
in a line; diffusers' offload needs one, so its side is skipped).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vidlatent import VideoPipeline
from vidlatent.config import DiTConfig, VAEConfig, load_config
from vidlatent.models.dit import to_diffusers_config
from vidlatent.models.vae import vae_config_to_diffusers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("none", "model", "blocks", "fp8")
WORDS = "a red blue green circle square cat dog moving left right up down slowly in the park , .".split()


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--tiny", action="store_true", help="tiny widths (a CPU smoke run of the script)")
    p.add_argument("--frames", type=int, default=None, help="default 81 (tiny: 9)")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="default 480 832")
    p.add_argument("--steps", type=int, default=None, help="default 50 (tiny: 6)")
    p.add_argument("--repeats", type=int, default=1, help="end-to-end runs of each pipeline")
    p.add_argument("--folder", default=None, help="write the random folder here (default: a temp folder)")
    p.add_argument(
        "--mode", default="none", choices=MODES, help="offload or fp8 weights, both pipelines alike"
    )
    p.add_argument("--preset", default="wan2.1-t2v-1.3b", help="the denoiser's config (e.g. wan2.1-t2v-14b)")
    p.add_argument("--split-guidance", action="store_true",
                   help="ours runs guidance's halves as two calls, as diffusers does (not one batch)")  # fmt: skip
    return p.parse_args()


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def write_folder(folder: Path, tiny: bool, dtype: torch.dtype, preset: str = "wan2.1-t2v-1.3b") -> None:
    """A diffusers Wan T2V folder with random weights (initialized on the accelerator when there is one)."""
    import transformers as tf
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    dit_cfg = load_config(DiTConfig, "dit", "tiny" if tiny else preset)
    vae_cfg = load_config(VAEConfig, "vae", "tiny" if tiny else "wan2.1")
    dit_cfg.in_channels = dit_cfg.out_channels = vae_cfg.latent_channels
    tok = tokenizer()
    width = dit_cfg.text_dim
    text_cfg = tf.UMT5Config(
        vocab_size=len(tok), d_model=width, d_kv=width // (4 if tiny else 64), d_ff=2 * width if tiny else 10240,
        num_layers=2, num_heads=4 if tiny else 64, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        parts = dict(
            vae=AutoencoderKLWan(**vae_config_to_diffusers(vae_cfg)),
            transformer=WanTransformer3DModel(**to_diffusers_config(dit_cfg)).to(dtype),
            text_encoder=tf.UMT5EncoderModel(text_cfg).to(dtype),
        )
    with torch.no_grad():  # diffusers' init leaves the output projection at zero: give the velocity some size
        parts["transformer"].proj_out.weight.normal_(0, 0.02)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    WanPipeline(tokenizer=tok, scheduler=scheduler, **parts).save_pretrained(str(folder))


def reference(folder: Path, dtype: torch.dtype, device: str, mode: str):
    """diffusers' WanPipeline of ``folder`` set up for ``mode``; None where that needs an accelerator and
    ``device`` is none."""
    from diffusers import WanPipeline

    accelerated = torch.device(device).type not in ("cpu", "mps")
    if mode in ("model", "blocks") and not accelerated:
        return None
    ref = WanPipeline.from_pretrained(str(folder), dtype=dtype)
    ref.vae.to(torch.float32)  # both pipelines decode in fp32 (ours keeps the VAE as stored: fp32)
    ref.set_progress_bar_config(disable=True)
    if mode == "model":
        ref.enable_model_cpu_offload(device=device)
        return ref
    if mode == "blocks":
        for part in (ref.transformer, ref.vae):
            part.enable_group_offload(onload_device=torch.device(device), offload_device=torch.device("cpu"),
                                      offload_type="block_level", num_blocks_per_group=1, use_stream=True,
                                      record_stream=True)  # fmt: skip
        ref.text_encoder.to(device)
        return ref
    if mode == "fp8":
        ref.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    return ref.to(device)


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[float, float, torch.Tensor]:
    """(seconds, peak accelerator GiB or 0, result) of one call."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.device(device).type == "cuda" else 0.0
    return seconds, peak, out


def main():
    args = parse_args()
    cuda = torch.device(args.device).type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    frames = args.frames or (9 if args.tiny else 81)
    height, width = args.size or ((64, 64) if args.tiny else (480, 832))
    steps = args.steps or (6 if args.tiny else 50)
    tmp = None if args.folder else tempfile.TemporaryDirectory()
    folder = Path(args.folder or tmp.name) / f"wan-t2v-random-{'tiny' if args.tiny else args.preset}"
    if not (folder / "model_index.json").is_file():
        start = time.perf_counter()
        write_folder(folder, args.tiny, dtype, args.preset)
        print(f"wrote a random Wan T2V folder in {time.perf_counter() - start:.1f} s: {folder}")

    ref = reference(folder, dtype, args.device, args.mode)
    offload = args.mode if args.mode in ("model", "blocks") else "none"
    weights = "fp8" if args.mode == "fp8" else None  # each part in its stored dtype
    ours = VideoPipeline.from_pretrained(folder, device=args.device, offload=offload, weights_dtype=weights)
    ours.progress, ours.split_guidance = False, args.split_guidance
    print(
        f"device {torch.cuda.get_device_name() if cuda else f'cpu, {torch.get_num_threads()} threads'}, "
        f"{dtype}, torch {torch.__version__}; {frames}x{height}x{width}, {steps} steps, guidance 5 (ours: "
        f"{'two calls a step' if args.split_guidance else 'one batch of both halves'}), "
        f"mode {args.mode}"
    )
    tf, sf = ours.vae.temporal_factor, ours.vae.spatial_factor
    shape = (1, ours.vae.config.latent_channels, 1 + (frames - 1) // tf, height // sf, width // sf)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    prompt, negative = "a red circle moving left", "blue square"

    def run_ref(n):
        video = ref(prompt=prompt, negative_prompt=negative, height=height, width=width, num_frames=frames,
                    num_inference_steps=n, guidance_scale=5.0, latents=noise.to(args.device),
                    output_type="pt").frames  # fmt: skip
        return (video * 2 - 1).permute(0, 2, 1, 3, 4).float()

    def run_ours(n):
        return ours.generate(prompt, negative, steps=n, guidance=5.0, noise=noise).float()

    runners = {"ours": run_ours, **({"diffusers": run_ref} if ref is not None else {})}
    for fn in runners.values():  # warm-up (kernels, allocator) and the 2-step baseline
        fn(2)
    results = {name: {"total": [], "short": [], "peak": 0.0} for name in runners}
    outputs = {}
    for _ in range(args.repeats):
        for name, fn in runners.items():
            seconds, peak, outputs[name] = timed(lambda fn=fn: fn(steps), args.device)
            results[name]["total"].append(seconds)
            results[name]["peak"] = max(results[name]["peak"], peak)
            results[name]["short"].append(timed(lambda fn=fn: fn(2), args.device)[0])
    for name, r in results.items():
        total, short = statistics.median(r["total"]), statistics.median(r["short"])
        per_step = (total - short) / (steps - 2) if steps > 2 else float("nan")
        print(f"  {name:9s} end to end {total:8.2f} s   {per_step:7.3f} s/step   peak {r['peak']:6.2f} GiB")
    if ref is None:
        print("  diffusers: skipped (its offload needs an accelerator)")
        return
    diff = (outputs["ours"].clamp(-1, 1) - outputs["diffusers"].clamp(-1, 1)).abs().max().item()
    ratio = statistics.median(results["diffusers"]["total"]) / statistics.median(results["ours"]["total"])
    print(f"  speed ratio ours vs diffusers, end to end: {ratio:.3f}x (>1 means ours is faster)")
    print(f"  max |ours - diffusers| on the [-1, 1] video: {diff:.3g}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
