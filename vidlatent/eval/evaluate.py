"""The whole score of a shapes-world pipeline, as MODEL_CARD.md reports it: every split over the sampling seeds,
the VAE's reconstructions, the CLI's wall time; a dict to save as JSON, and a line per part as it goes."""

from __future__ import annotations

import dataclasses
import time

from .frames import MAX_GROWTH, MIN_IOU
from .shapes import SPLITS, breakdown_rows, pool, score_split, score_vae
from .speed import cli_time
from .wide import ATTRIBUTES, score_wide


def breakdown_lines(r: dict) -> list[str]:
    """One split's rates by asked colour and by asked shape (a row each: items, colour, shape, motion, all) and
    its shape rate by asked (colour, shape) pair (a row per colour), as plain-text tables; none without them."""
    t = breakdown_rows(r)
    if t is None:
        return []
    lines = ["  {:<9} {:>4} ".format("asked", "n") + " ".join(f"{k:>7}" for k in t["keys"])]
    lines += [f"  {name:<9} {n:>4} " + " ".join(f"{v:>7.1%}" for v in rates) for name, n, rates in t["rows"]]
    lines.append("  {:<9} ".format("shape by") + " ".join(f"{s:>14}" for s in t["shapes"]))
    for colour, cells in t["pairs"]:
        lines.append(
            f"  {colour:<9} " + " ".join(f"{c[0]:>7.1%} ({c[1]:>3})" if c else f"{'-':>14}" for c in cells)
        )
    return lines


def frames_line(f: dict) -> str:
    """One line of a split's first-frame and ghost shares (``frames.frame_shares``')."""
    return (f"first frames of {f['clips']} clips: malformed {f['malformed']:.1%} (shape IoU < {MIN_IOU} "
            f"{f['misfit']:.1%}, over {MAX_GROWTH}x median area {f['oversize']:.1%}, no object "
            f"{f['first_missing']:.1%}; middle frame IoU < {MIN_IOU} {f['misfit_mid']:.1%}; median IoU "
            f"{f['first_iou_median']:.3f}); ghosts {f['ghost']:.1%} (second region of the asked colour "
            f"{f['ghost_same']:.1%}, a colour not asked {f['ghost_other']:.1%})")  # fmt: skip


def summary(split: str, r: dict) -> list[str]:
    """The printed lines of one split's results (its rates, and each seed's when pooled; then the first-frame
    and ghost shares and the rates by asked colour, shape and pair where the split has them)."""
    scores = " ".join(f"{k} {r[k]:.1%}" for k in (*ATTRIBUTES, "colour", "shape", "motion", "all") if k in r)
    first = f", first frame {r['first_psnr']:.2f} dB" if "first_psnr" in r else ""
    seeds = f" x {len(r['seeds'])} seeds" if "seeds" in r else ""
    lines = [f"{split}: {scores} (nothing found {r['nothing']:.1%}, {r['prompts']} prompts{seeds}{first})"]
    for one in r.get("per_seed", []):
        lines.append(
            "  seed {seed}: ".format(**one) + " ".join(f"{k} {v:.1%}" for k, v in one.items() if k != "seed")
        )
    if "frames" in r:
        lines.append("  " + frames_line(r["frames"]))
    if "frames_by_colour" in r:
        lines.append("  by asked colour, malformed first frames / ghosts: " + ", ".join(
            f"{c} {f['malformed']:.1%} / {f['ghost']:.1%} ({f['clips']})" for c, f in r["frames_by_colour"].items()
        ))  # fmt: skip
    return lines + breakdown_lines(r)


def evaluate(
    pipe,
    splits=SPLITS,
    count: int = 216,
    batch: int = 24,
    seeds=(0,),
    edit_count: int = 72,
    edit_strength: float = 0.5,
    flow: dict | None = None,
    vae_clips: int = 64,
    cli_runs: int = 0,
    model: str | None = None,
    log=print,
) -> dict:
    """Score ``pipe`` (its ``config`` holds the job options every split uses) on ``splits``: each split once per
    sampling seed and pooled (``count`` prompts, ``edit_count`` clips for the edit splits at ``edit_strength``,
    by FlowEdit with ``flow``'s options when given); then ``score_vae`` on ``vae_clips`` clips and ``cli_time``
    of ``model`` over ``cli_runs`` processes (0: skipped). ``log`` gets each part's summary line."""
    results = {"model": model or "default", "job": dataclasses.asdict(pipe.config)}
    for split in splits:
        t0 = time.perf_counter()
        edit = split.startswith("edit-")
        n = edit_count if edit else count
        if split == "wide":  # its own items and rates (eval/wide.py)
            runs = [score_wide(pipe, count, batch, seed) for seed in seeds]
        else:
            runs = [score_split(pipe, split, n, batch, seed, edit_strength, flow) for seed in seeds]
        results[split] = pool(runs, list(seeds))
        if edit:
            results[split].update(strength=edit_strength, flow_edit=flow, guidance=pipe.config.guidance)
        results[split]["seconds"] = time.perf_counter() - t0
        for line in summary(split, results[split]):
            log(line)
    if vae_clips:
        v = results["vae"] = score_vae(pipe.vae, vae_clips)
        log(f"vae: PSNR {v['psnr_mean']:.2f} dB (min {v['psnr_min']:.2f}); oracle through it: colour "
            f"{v['oracle_colour']:.1%} shape {v['oracle_shape']:.1%} motion {v['oracle_motion']:.1%}")  # fmt: skip
        log(f"vae: {frames_line(v['frames'])}")
        for line in breakdown_lines(v):
            log(line)
    if cli_runs:
        c = results["cli"] = cli_time(model, cli_runs)
        log(f"cli generate: {c['best_s']:.1f}-{c['worst_s']:.1f} s")
    return results
