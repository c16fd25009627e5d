"""Score a shapes-world pipeline (the shipped default model by default) with the world's oracle.

    python scripts/eval_default.py [--model FOLDER] [--count 216] [--seeds 0 1 2] [--json results.json]

Prints and writes (``--json``):
* text-to-video on held-out prompts (colour/shape/motion combinations no training clip shows) and on prompts
  seen in training: how often the largest object the oracle finds has the asked colour, shape and motion;
* text-to-image (split ``image``: the held-out prompts generated as one frame): colour and shape, as above
  (one frame shows no motion, so "all" means colour and shape);
* image-to-video (split ``animate``): the first frames of held-out clips of the world animated with their
  captions, scored as above, and the PSNR of the first output frame against the still (``first_psnr``);
* video-to-video (splits ``edit-shape`` and ``edit-colour``, ``--edit-strength`` 0.5): the same held-out clips
  edited with a caption that asks for the next shape (circle -> square -> triangle) or another colour and the
  clip's own motion; scored as above against what the caption asks;
* VAE reconstruction PSNR on held-out clips of the world (17 frames, 64x64), and how often the oracle still reads
  their object's colour, shape and motion right through the VAE (roughly a ceiling for the denoiser's scores);
* wall time of ``vidlatent generate "a red circle moving right" -o out.mp4`` in a fresh process (best and
  worst of ``--cli-runs``), model loading and imports included.

With several ``--seeds`` every split runs once per sampling seed on the same prompts / clips and reports the
rates pooled over all of them (``per_seed`` holds each seed's): 216 prompts score a rate to within about +-2.8
points (one standard error at 80%), three seeds narrow the sampling part of that.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vidlatent import VideoPipeline
from vidlatent.checkpoint import atomic_write
from vidlatent.data.shapes import COLOURS, SHAPES, ShapeObject, ShapesWorld, caption, eval_prompts, oracle
from vidlatent.pipelines.encode import psnr
from vidlatent.pipelines.video import SOURCE_GUIDANCE

ANIMATE_SEED = 2024  # the held-out clips whose first frames the animate split starts from


def edit_target(obj: ShapeObject, split: str) -> tuple[str, str, str]:
    """What an edit split asks of a clip's object: the next shape, or the colour three along, same motion."""
    shape, colour = obj.shape, obj.colour
    if split == "edit-shape":
        shape = SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]
    else:
        names = list(COLOURS)
        colour = names[(names.index(colour) + 3) % len(names)]
    return colour, shape, obj.motion


def score_prompts(
    pipe,
    split: str,
    count: int,
    batch: int,
    seed: int,
    strength: float = 0.5,
    source: dict | None = None,
    **job,
) -> dict:
    """Generate ``count`` items of ``split`` and score them with the oracle.

    ``heldout``/``train``: text to video from the split's prompts; ``image``: the held-out prompts as one frame
    (colour and shape); ``animate``: image to video from the first frame of held-out clips of the world with their
    captions (also the PSNR of the first output frame against the still, ``first_psnr``); ``edit-shape`` /
    ``edit-colour``: those clips edited at ``strength`` towards a caption with another shape / colour (with
    ``source``, by FlowEdit from the clip's own caption; ``source`` holds its other options, if any).
    """
    keys = ("colour", "shape") if split == "image" else ("colour", "shape", "motion")
    misses, first = [], []  # first: animate's first-frame PSNRs
    if split == "animate":
        world = ShapesWorld(64, 64, 17, split="heldout", seed=ANIMATE_SEED)
        scenes = [world.scene(i) for i in range(count)]
        prompts = [
            (sc.caption, (sc.objects[0].colour, sc.objects[0].shape, sc.objects[0].motion)) for sc in scenes
        ]
        stills = torch.stack([world.clip(i)[0][:, :1] for i in range(count)])

        def make(s: int, chunk: list) -> torch.Tensor:
            videos = pipe.animate(stills[s : s + len(chunk)], [p for p, _ in chunk], seed=seed + s, progress=False,
                                  **job)  # fmt: skip
            first.extend(psnr(v[:, :1].cpu(), still, data_range=2.0) for v, still in zip(videos, stills[s:]))
            return videos
    elif split.startswith("edit-"):
        world = ShapesWorld(64, 64, 17, split="heldout", seed=ANIMATE_SEED)
        rng = np.random.default_rng([seed, 0xED17])
        asked = [edit_target(world.scene(i).objects[0], split) for i in range(count)]
        prompts = [(caption([ShapeObject(*a, 1.0, 0.0, 0.0, 0.0)], rng), a) for a in asked]
        clips = torch.stack([world.clip(i)[0] for i in range(count)])
        captions = [world.scene(i).caption for i in range(count)]

        def make(s: int, chunk: list) -> torch.Tensor:
            flow = {"source_prompt": captions[s : s + len(chunk)], **source} if source else {}
            return pipe.edit(clips[s : s + len(chunk)], [p for p, _ in chunk], strength, seed=seed + s,
                             progress=False, **flow, **job)  # fmt: skip
    else:
        job = {**job, "frames": 1} if split == "image" else job
        prompts = eval_prompts("heldout" if split == "image" else split, count=count)

        def make(s: int, chunk: list) -> torch.Tensor:
            return pipe.generate([p for p, _ in chunk], seed=seed + s, progress=False, **job)

    hits = {**dict.fromkeys(keys, 0), "all": 0, "nothing": 0}
    for s in range(0, len(prompts), batch):
        chunk = prompts[s : s + batch]
        for (prompt, (colour, shape, motion)), video in zip(chunk, make(s, chunk)):
            found = oracle(video)
            if not found:
                hits["nothing"] += 1
                misses.append((prompt, None))
                continue
            top, asked = found[0], {"colour": colour, "shape": shape, "motion": motion}
            ok = [top[key] == asked[key] for key in keys]
            for key, good in zip(keys, ok):
                hits[key] += good
            hits["all"] += all(ok)
            if not all(ok):
                misses.append((prompt, tuple(top[key] for key in keys)))
        print(f"  {split}: {min(s + batch, len(prompts))}/{len(prompts)}", file=sys.stderr)
    n = len(prompts)
    extra = {"first_psnr": sum(first) / n} if first else {}
    return {"prompts": n, **{k: v / n for k, v in hits.items()}, **extra, "examples_missed": misses[:10]}


RATES = ("colour", "shape", "motion", "all", "nothing")


def pool(runs: list[dict], seeds: list[int]) -> dict:
    """One split's results over several sampling seeds (same prompts, same count): the rates pooled over every
    item, and each seed's rates under ``per_seed``. One seed is returned as it is."""
    if len(runs) == 1:
        return runs[0]
    keys = [k for k in (*RATES, "first_psnr") if k in runs[0]]
    pooled = {k: sum(r[k] for r in runs) / len(runs) for k in keys}
    per_seed = [{"seed": seed, **{k: r[k] for k in keys}} for seed, r in zip(seeds, runs)]
    return {"prompts": runs[0]["prompts"], "seeds": list(seeds), **pooled,
            "examples_missed": runs[0]["examples_missed"], "per_seed": per_seed}  # fmt: skip


@torch.no_grad()
def vae_psnr(vae, clips: int, seed: int = 12345) -> dict:
    """PSNR of the VAE's reconstructions of held-out clips, and how often the oracle still reads the clip's
    object right through them (the most the denoiser can reach through this VAE)."""
    world = ShapesWorld(64, 64, 17, split="heldout", seed=seed)
    scores, kept = [], {"colour": 0, "shape": 0, "motion": 0}
    for i in range(clips):
        video = world.clip(i)[0][None]
        recon = vae.decode(vae.encode(video.to(vae.device)).mode()).cpu()
        scores.append(psnr(recon, video, data_range=2.0))
        truth, found = world.scene(i).objects[0], oracle(recon[0])  # held-out clips show one object
        for key in kept:
            kept[key] += bool(found) and found[0][key] == getattr(truth, key)
    return {"clips": clips, "psnr_mean": sum(scores) / clips, "psnr_min": min(scores),
            **{f"oracle_{key}": n / clips for key, n in kept.items()}}  # fmt: skip


def cli_time(model: str | None, runs: int) -> dict:
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            cmd = ["vidlatent", "generate", "a red circle moving right", "-o", f"{tmp}/out{i}.mp4", "-q"]
            if model:
                cmd += ["--model", model]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
            times.append(time.perf_counter() - t0)
    return {"runs": runs, "best_s": min(times), "worst_s": max(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="pipeline folder (default: the shipped default model)")
    ap.add_argument("--count", type=int, default=216, help="prompts per split")
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--seeds", "--seed", dest="seeds", type=int, nargs="+", default=[0],
                    help="sampling seeds: each split runs once per seed and its rates are pooled (per seed too)")  # fmt: skip
    ap.add_argument("--vae-clips", type=int, default=64)
    ap.add_argument("--cli-runs", type=int, default=3)
    splits = ["heldout", "train", "image", "animate", "edit-shape", "edit-colour"]
    ap.add_argument("--splits", nargs="+", default=splits, choices=splits)
    ap.add_argument("--edit-count", type=int, default=72, help="clips per edit split")
    ap.add_argument("--edit-strength", type=float, default=0.5)
    ap.add_argument("--edit-source", action="store_true", help="edit by FlowEdit from each clip's caption")
    ap.add_argument("--source-guidance", type=float, default=None, help="FlowEdit's source guidance")
    ap.add_argument("--device", default=None, help="run the pipeline here (default: the CPU); the CLI timing "
                    "always runs the CLI as a user would")  # fmt: skip
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("overrides", nargs="*", help="job options, e.g. steps=20 guidance=4")
    args = ap.parse_args()
    if len(set(args.seeds)) != len(args.seeds):
        ap.error(f"--seeds repeats a seed ({' '.join(map(str, args.seeds))}): each seed samples once")
    if args.source_guidance is not None and not args.edit_source:
        ap.error("--source-guidance is FlowEdit's: add --edit-source")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    pipe = VideoPipeline.from_pretrained(args.model or "default", device=args.device)
    job = {}
    for kv in args.overrides:
        k, _, v = kv.partition("=")
        if not v or not hasattr(pipe.config, k):
            ap.error(
                f"bad job option {kv!r}: expected key=value with key one of {', '.join(vars(pipe.config))}"
            )
        if k == "seed":
            ap.error("the seed of each batch comes from --seeds; it is not a job option")
        job[k] = type(getattr(pipe.config, k))(v)
    pipe.config = dataclasses.replace(pipe.config, **job)  # every job takes them, first_frame (animate) too
    results = {"model": args.model or "default", "job": vars(pipe.config)}
    for split in args.splits:
        t0 = time.perf_counter()
        edit = split.startswith("edit-")
        count = args.edit_count if edit else args.count
        flow = None
        if args.edit_source:
            flow = {
                "source_guidance": SOURCE_GUIDANCE if args.source_guidance is None else args.source_guidance
            }
        runs = [
            score_prompts(pipe, split, count, args.batch, seed, args.edit_strength, flow)
            for seed in args.seeds
        ]
        results[split] = pool(runs, args.seeds)
        if edit:
            results[split].update(strength=args.edit_strength, flow_edit=flow, guidance=pipe.config.guidance)
        results[split]["seconds"] = time.perf_counter() - t0
        r = results[split]
        scores = " ".join(f"{k} {r[k]:.1%}" for k in ("colour", "shape", "motion", "all") if k in r)
        first = f", first frame {r['first_psnr']:.2f} dB" if "first_psnr" in r else ""
        seeds = f" x {len(args.seeds)} seeds" if len(args.seeds) > 1 else ""
        print(f"{split}: {scores} (nothing found {r['nothing']:.1%}, {r['prompts']} prompts{seeds}{first})")
        for one in r.get("per_seed", []):
            print("  seed {seed}: ".format(**one) + " ".join(f"{k} {one[k]:.1%}" for k in RATES if k in one))
    if args.vae_clips:
        results["vae"] = vae_psnr(pipe.vae, args.vae_clips)
        v = results["vae"]
        print(f"vae: PSNR {v['psnr_mean']:.2f} dB (min {v['psnr_min']:.2f}); oracle through it: colour "
              f"{v['oracle_colour']:.1%} shape {v['oracle_shape']:.1%} motion {v['oracle_motion']:.1%}")  # fmt: skip
    if args.cli_runs:
        results["cli"] = cli_time(args.model, args.cli_runs)
        print(f"cli generate: {results['cli']['best_s']:.1f}-{results['cli']['worst_s']:.1f} s")
    if args.json:
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2, default=str)))


if __name__ == "__main__":
    main()
