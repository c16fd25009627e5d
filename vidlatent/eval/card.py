"""MODEL_CARD.md of the shipped default model: what it is, how the default recipe trained it, how it scores."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import PRESET_DIR, DiTConfig, list_presets, load_config
from ..recipes.recipe import Recipe, Stage, load_recipe
from .frames import MAX_GROWTH, MIN_IOU
from .shapes import breakdown_rows

# the working folder the card's train commands name: scripts/train_default.py's default --out
CARD_OUT = "runs/default"

SPLIT_NAMES = {
    "heldout": "held-out prompts",
    "train": "prompts seen in training",
    "image": "held-out prompts as one frame",
}


def breakdown_table(r: dict) -> list[str]:
    """Markdown lines of one split's results (``evaluate``'s, pooled over seeds) broken down by what was asked: a
    table of the rates by asked colour, then by asked shape (items, colour, shape, motion, all), and a table of
    the shape rate by asked (colour, shape) pair, a row per colour ("-": no such item); [] without them."""
    seeds = len(r.get("seeds", [0]))
    t = breakdown_rows(r, seeds)
    if t is None:
        return []
    keys = t["keys"]
    n = f"n (x {seeds} seeds)" if seeds > 1 else "n"
    lines = [f"| asked | {n} | " + " | ".join("all three" if k == "all" and "motion" in keys else k for k in keys)
             + " |", "|---" * (len(keys) + 2) + "|"]  # fmt: skip
    lines += [
        f"| {name} | {count} | " + " | ".join(f"{v:.1%}" for v in rates) + " |"
        for name, count, rates in t["rows"]
    ]
    shapes = t["shapes"]
    lines += ["", "| shape read right | " + " | ".join(shapes) + " |", "|---" * (len(shapes) + 1) + "|"]
    for colour, cells in t["pairs"]:
        lines.append(
            f"| {colour} | " + " | ".join(f"{c[0]:.1%} ({c[1]})" if c else "-" for c in cells) + " |"
        )
    return lines


def frames_card_line(split: str, f: dict) -> str:
    """A MODEL_CARD.md line of one split's first-frame and ghost shares (``frames.frame_shares``')."""
    return (f"- {SPLIT_NAMES.get(split, split)}, {f['clips']} clips: malformed first frame {f['malformed']:.1%} (the "
            f"object fits its best circle / square / triangle template with IoU < {MIN_IOU} in "
            f"{f['misfit']:.1%}, {f['misfit_mid']:.1%} in the middle frame; it is over {MAX_GROWTH}x its median "
            f"area in {f['oversize']:.1%}); ghost objects {f['ghost']:.1%} (a second region of the asked colour "
            f"{f['ghost_same']:.1%}, a colour not asked {f['ghost_other']:.1%}).")  # fmt: skip


def frames_by_colour_table(by: dict) -> list[str]:
    """Markdown lines of one split's first-frame and ghost shares by asked colour (``frames_by_colour``)."""
    lines = ["| asked colour | clips | malformed first frame | ghost objects | ghosts of a colour not asked |",
             "|---|---|---|---|---|"]  # fmt: skip
    return lines + [
        f"| {colour} | {f['clips']} | {f['malformed']:.1%} | {f['ghost']:.1%} | {f['ghost_other']:.1%} |"
        for colour, f in by.items()
    ]


def wide_lines(r: dict | None) -> list[str]:
    """MODEL_CARD.md lines of the wide split (``eval.wide``): each attribute's rate, and the plain rates of
    those prompts; none without it."""
    if not r:
        return []
    n = f"{r['prompts']} x {len(r['seeds'])} seeds" if "seeds" in r else r["prompts"]
    return ["", f"Wide-world words (`vidlatent.eval.wide`; {n} held-out prompts, each asking one of size, count, "
                "background colour or stillness; a prompt counts when the oracle reads that back):", "",
            "| size | count | background colour | still | colour | shape | motion | all three | nothing found |",
            "|---|---|---|---|---|---|---|---|---|",
            "| " + " | ".join(f"{r[k]:.1%}" for k in ("size", "count", "background", "still", "colour", "shape",
                                                     "motion", "all", "nothing")) + " |"]  # fmt: skip


CONTROL_VARIANTS = {
    "none": "the prompt alone (no control)",
    "control": "with the control (the model's defaults)",
}


def control_lines(r: dict | None) -> list[str]:
    """MODEL_CARD.md lines of the control evaluation (``scripts/eval_control.py``'s results: variant -> numbers):
    the shipped control branch on held-out silhouettes, and the same prompts without it; none without them."""
    if not r:
        return []
    lines = ["", "Silhouette control (`scripts/eval_control.py`; held-out clips of the world, each clip's caption as the "
                 "prompt and its silhouettes as the control; IoU of the generated object's mask with the silhouette, "
                 "per frame, averaged):", "",
             "| | clips | mean IoU | lowest IoU | clips with IoU >= 0.5 | colour right | no object |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for variant, v in r.items():
        levels = zip(("scale", "guidance"), variant.split("@")[1:])
        name = (
            CONTROL_VARIANTS.get(variant) or f"with the control ({', '.join(f'{k} {x}' for k, x in levels)})"
        )
        lines.append(f"| {name} | {v['clips']} | {v['iou']:.3f} | {v['iou_min']:.3f} | {v['iou_at_least_0.5']:.1%} "
                     f"| {v['colour']:.1%} | {v['nothing']:.1%} |")  # fmt: skip
    return lines


def lane_lines(stage: Stage) -> list[str]:
    """Markdown list items, one per run of the stage's lanes, with its ``vidlatent train`` arguments."""
    return [f"- {lane}: `{run.command()}`" for lane, runs in stage.lanes.items() for run in runs]


def dit_preset(folder: Path) -> str:
    """The name of the dit preset whose layout the denoiser at ``folder`` has (else "custom")."""
    shipped = json.loads((folder / "config.json").read_text())
    for name in list_presets("dit"):
        preset = dataclasses.asdict(load_config(DiTConfig, "dit", name))
        if all(shipped.get(k) == v for k, v in preset.items() if k != "gradient_checkpointing"):
            return name
    return "custom"


def model_card(recipe: Recipe, ship: Path, results: dict) -> str:
    """MODEL_CARD.md of the default model shipped at ``ship``: its parts, the default recipe's stages as they run
    (with the wall times in ``<out>/timings.json`` and ``<out>/HISTORY.md``, written by hand, where there), and
    ``results`` (``evaluate``'s)."""
    # runs shown in train_default.py's working folder (runs/default), as a person runs them from the repository
    out, stages = recipe.out, load_recipe(recipe.folder, CARD_OUT).stages
    gpu_name = recipe.notes["gpu_name"]
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").is_file() else {}
    vae_cfg = (PRESET_DIR / "train" / "default-vae.yaml").read_text()
    vae_ft_cfg = (PRESET_DIR / "train" / "default-vae-finetune.yaml").read_text()
    dit_cfg = (PRESET_DIR / "train" / "default-dit.yaml").read_text()
    params = {
        n: sum(t.numel() for t in load_file(ship / n / "model.safetensors").values())
        for n in ("vae", "dit", "text_encoder", "control")
        if (ship / n / "model.safetensors").is_file()
    }
    size = sum(f.stat().st_size for f in ship.rglob("*.safetensors"))
    control = [params["control"]] if "control" in params else []
    # clips cached by each stage, counted where the latents are still kept, else the script's defaults
    clips, joint_clips, joint2_clips, gpu_clips = (
        len(list((out / stages[name].cache.into).glob("clip-*.safetensors"))) or stages[name].cache.clips
        for name in ("cache", "joint", "joint2", "gpu")
    )
    later = {  # stages 12 to 14, listed once they have run
        "carry": f"Stage 12 (carry), on this CPU: {stages['carry'].cache.clips} training clips cached afresh, then the stage-9 "
                 "denoiser carried on with both threads:",
        "gpu2": f"Stage 13 (gpu2), on one GPU: {stages['gpu2'].cache.clips} training clips cached (the first "
                f"{stages['gpu'].cache.clips} are stage "
                "9's), then the stage-12 denoiser carried on alone:",
        "redraw3": "Stage 14 (redraw3), stage 11 carried on with its clips re-drawn by the stage-13 denoiser "
                   "instead, with both CPU threads:",
        "wide": f"Stage 15 (wide), on this CPU: {stages['wide'].cache.clips} training clips of the wide world "
                "(`ShapesWorld(wide=True)`: sizes, still objects, coloured backgrounds, counted groups) cached, then "
                "the stage-12 denoiser and text encoder carried on with both threads, the captions' new words added "
                "to the vocabulary (`text_new_words`):",
        "control": "Stage 16 (control), on this CPU: a silhouette control branch (VACE's layout, hints after every "
                   "second block, its blocks starting as the denoiser's) beside the shipped denoiser, text encoder and "
                   "VAE (all frozen), on training clips of the world with their silhouettes, with both threads:",
    }  # fmt: skip
    ran = [(head, stages[stage]) for stage, head in later.items()
           if all((out / runs[-1].name / "final").is_dir() for runs in stages[stage].lanes.values())]  # fmt: skip
    later_lines = [line for head, stage in ran for line in (head, "", *lane_lines(stage), "")]
    history_file = out / "HISTORY.md"  # the runs as they actually went, written by hand
    history = (
        ["## How it actually ran", "", history_file.read_text().strip(), ""] if history_file.is_file() else []
    )
    lines = [
        "# vidlatent default model (shapes world)",
        "",
        "A small text-to-video model trained from scratch by `scripts/train_default.py` on the procedural shapes",
        "world (`vidlatent.data.shapes`): one to three flat shapes (circle, square, triangle; red, orange, yellow,",
        "green, blue, purple) moving left/right/up/down/diagonally or bouncing over desaturated backgrounds.",
        "It knows nothing else. 17 frames at 64x64 (5 latent frames of 8x8x16).",
        "",
        "| part | preset | parameters |",
        "|---|---|---|",
        f"| VAE (Wan 2.1 layout, 4x8x8, 16 channels) | vae/default-arch | {params['vae'] / 1e6:.2f}M |",
        f"| denoiser (Wan 2.1 T2V layout) | dit/{dit_preset(ship / 'dit')} | {params['dit'] / 1e6:.2f}M |",
        f"| text encoder (built-in, word level) | text/default-arch | {params['text_encoder'] / 1e6:.3f}M |",
        *[
            f"| control branch (VACE layout; silhouettes) | trained in stage 16 | {n / 1e6:.2f}M |"
            for n in control
        ],
        "",
        f"Weights: {size / 2**20:.1f} MiB of safetensors (fp32).",
        "",
        "## Training",
        "",
        f"Hardware: stages 1-8 and 10-12 on {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no "
        f"GPU, torch {torch.__version__}; stage 9 on one {gpu_name} (torch 2.11).",
        "",
        "| stage | wall time |",
        "|---|---|",
        *[f"| {k}{f' ({gpu_name})' if k == 'gpu' else ''} | {v / 60:.1f} min |" for k, v in timings.items()],
        "",
        "Stage 1a, `vidlatent train default-vae`:",
        "```yaml",
        vae_cfg.strip(),
        "```",
        "Stage 1b, `vidlatent train default-vae-finetune`:",
        "```yaml",
        vae_ft_cfg.strip(),
        "```",
        f"Stage 2, `vidlatent train default-dit` on {clips} cached latent clips of the training split "
        "(world seed 1):",
        "```yaml",
        dit_cfg.strip(),
        "```",
        "",
        "Stage 3 (refine), the two lanes at once with one CPU thread each, each lane's runs in order (the encoder",
        "stays frozen, so the stage-2 latents stay valid):",
        "",
        *lane_lines(stages["refine"]),
        "",
        "Stage 4 (joint): the whole VAE, encoder included, with both CPU threads, "
        f"`{stages['joint'].runs[0].command()}`; {joint_clips} training clips encoded with it; then, as in",
        "stage 3, two lanes at once:",
        "",
        *lane_lines(stages["joint"]),
        "",
        "Stage 5 (polish): both stage-4 lanes carried on from their exports, twice, with fresh, lower schedules, at once:",
        "",
        *lane_lines(stages["polish"]),
        "",
        "Stage 6 (joint2): stage 4 again from the stage-5 exports, the whole VAE with both CPU threads, "
        f"`{stages['joint2'].runs[0].command()}`; {joint2_clips} training clips encoded with it; then two lanes",
        "at once (the denoiser also learns one-frame generation: `image_fraction`):",
        "",
        *lane_lines(stages["joint2"]),
        "",
        "Stage 7 (polish3): both stage-6 lanes carried on at once, the denoiser with uniform sigmas:",
        "",
        *lane_lines(stages["polish3"]),
        "",
        "Stage 8 (i2v): the denoiser alone, learning image-to-video conditioning:",
        "",
        *lane_lines(stages["i2v"]),
        "",
        f"Stage 9 (gpu), on one {gpu_name}: {gpu_clips} training clips cached with the stage-7 VAE, then three",
        "runs sharing the GPU, each for a wall-clock budget (`max_minutes`); the dit lane's second run alone after:",
        "",
        *lane_lines(stages["gpu"]),
        "",
        "Stage 10 (redraw), the decoder alone (one CPU thread), with half of its clips re-drawn first by the stage-9",
        f"denoiser (the stage-7 VAE with it, assembled at `{CARD_OUT}/{stages['redraw'].redraw_pipeline['folder']}`):",
        "",
        *lane_lines(stages["redraw"]),
        "",
        "Stage 11 (redraw2), stage 10 carried on the same way from its export, with both CPU threads:",
        "",
        *lane_lines(stages["redraw2"]),
        "",
        *later_lines,
        *history,
        "## Evaluation (`scripts/eval_default.py`)",
        "",
        "The oracle reads each generated clip; a prompt counts when the largest object found has the asked",
        "colour / shape / motion. Held-out prompts use (colour, shape, motion) combinations no training clip has.",
        "",
        "| prompts | n | colour | shape | motion | all three | nothing found |",
        "|---|---|---|---|---|---|---|",
    ]
    for split, label in (("heldout", "held-out combinations"), ("train", "combinations seen in training"),
                         ("image", "held-out prompts as one frame (text to image; all = colour and shape)"),
                         ("animate", "first frames of held-out clips animated with their captions (image to video)")):  # fmt: skip
        if split in results:
            r = results[split]
            motion = f"{r['motion']:.1%}" if "motion" in r else "-"
            n = f"{r['prompts']} x {len(r['seeds'])} seeds" if "seeds" in r else r["prompts"]
            lines.append(f"| {label} | {n} | {r['colour']:.1%} | {r['shape']:.1%} | {motion} "
                         f"| {r['all']:.1%} | {r['nothing']:.1%} |")  # fmt: skip
    edits = {
        "edit-shape": "held-out clips edited to the next shape",
        "edit-colour": "held-out clips recoloured",
    }
    for key, r in results.items():  # edit splits, maybe several runs ("edit-colour", "edit-colour-0.7", ...)
        if key.startswith("edit-") and isinstance(r, dict):
            what = next(label for split, label in edits.items() if key.startswith(split))
            flow = r.get("flow_edit")
            how = "SDEdit" if flow is None else f"FlowEdit with source guidance {flow['source_guidance']}"
            lines.append(f"| {what}, strength {r['strength']}, {how}, guidance {r['guidance']} | {r['prompts']} "
                         f"| {r['colour']:.1%} | {r['shape']:.1%} | {r['motion']:.1%} | {r['all']:.1%} "
                         f"| {r['nothing']:.1%} |")  # fmt: skip
    lines += wide_lines(results.get("wide"))
    lines += control_lines(results.get("control"))
    seeded = [(split, r) for split, r in results.items() if isinstance(r, dict) and "per_seed" in r]
    if seeded:
        lines += ["", "Rows with several seeds pool the same prompts sampled with each seed; each seed alone "
                      "(colour / shape / motion):"]  # fmt: skip
    for split, r in seeded:
        each = "; ".join(f"seed {o['seed']} " + " / ".join(f"{o[k]:.1%}" for k in ("colour", "shape", "motion")
                                                           if k in o) for o in r["per_seed"])  # fmt: skip
        lines.append(f"- {split}: {each}")
    framed = [(split, results[split]["frames"]) for split in SPLIT_NAMES
              if isinstance(results.get(split), dict) and "frames" in results[split]]  # fmt: skip
    if framed:
        lines += ["", "First frames and ghosts (text to video, pooled over seeds; `vidlatent.eval.frames`):"]
        lines += [frames_card_line(split, f) for split, f in framed]
        for split, _ in framed:
            if "frames_by_colour" in results[split]:
                lines += ["", f"By asked colour, {SPLIT_NAMES.get(split, split)}:", ""]
                lines += frames_by_colour_table(results[split]["frames_by_colour"])
    for split, name in SPLIT_NAMES.items():
        if isinstance(results.get(split), dict) and "by_colour" in results[split]:
            lines += [
                "",
                f"By what was asked, {name} (pooled over seeds):",
                "",
                *breakdown_table(results[split]),
            ]
    if "animate" in results:
        a = results["animate"]
        lines += ["", f"Image to video: the first output frame against the still, {a['first_psnr']:.2f} dB PSNR "
                      f"(animate with first_frame={results.get('job', {}).get('first_frame')})."]  # fmt: skip
    if "vae" in results:
        v = results["vae"]
        lines += ["", f"VAE on {v['clips']} held-out clips (17x64x64): PSNR {v['psnr_mean']:.2f} dB mean, "
                      f"{v['psnr_min']:.2f} dB worst. The oracle reads the clip's object right through the VAE "
                      f"(reconstruction of the true clip): colour {v['oracle_colour']:.1%}, shape "
                      f"{v['oracle_shape']:.1%}, motion {v['oracle_motion']:.1%}."]  # fmt: skip
        if "by_colour" in v:
            lines += ["", "Read through the VAE, by the clip's object:", "", *breakdown_table(v)]
        if "frames" in v:  # the least a denoiser's clips can show through this VAE
            lines += ["", "First frames and ghosts of the VAE's own reconstructions (the true clips have none):",
                      "", frames_card_line("VAE reconstructions", v["frames"])]  # fmt: skip
    if "cli" in results:
        c = results["cli"]
        lines += ["", f"`vidlatent generate \"a red circle moving right\" -o out.mp4` in a fresh process: "
                      f"{c['best_s']:.1f}-{c['worst_s']:.1f} s over {c['runs']} runs (2 CPU threads)."]  # fmt: skip
    job = results.get("job", {})
    settings = json.loads((ship / "pipeline.json").read_text())
    control = (f" The control job: scale {settings.get('control_scale', 1.0):g}, guidance "
               f"{settings.get('control_guidance') or job.get('guidance'):g} (pipeline.json's `control_scale`, "
               "`control_guidance`)." if control else "")  # fmt: skip
    lines += ["", f"Sampling: {job.get('sampler')} sampler, {job.get('steps')} steps, guidance {job.get('guidance')}, "
                  f"shift {job.get('shift')}.{control}"]  # fmt: skip
    return "\n".join(lines) + "\n"
