"""Scoring a pipeline on the shapes world: generate, read each clip back with the world's oracle, count.

Splits (each a list of items: a prompt and what it asks, (colour, shape, motion)):

  heldout / train   text to video from ``eval_prompts``: combinations no training clip shows / seen ones
  image             the held-out prompts as one frame (colour and shape only: one frame shows no motion)
  animate           image to video from the first frames of held-out clips with their captions; also the PSNR
                    of the first output frame against the still (``first_psnr``)
  edit-shape/-colour  those clips edited at ``strength`` towards a caption asking for the next shape (circle ->
                    square -> triangle) or the colour three along, with the clip's own motion

An item counts for a key when the largest object the oracle finds has the asked value; ``all`` when every key
does, ``nothing`` when the oracle finds no object. ``pool`` merges one split's results over sampling seeds.
The text-to-video and image splits are also broken down by the asked colour, the asked shape and the asked
(colour, shape) pair (``breakdown``), and the text-to-video clips read for malformed first frames and ghost
objects (``frames.frame_quality``).
``score_vae`` reads held-out clips back through the VAE alone: a ceiling for what the denoiser can reach.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from ..data.shapes import COLOURS, SHAPES, ShapeObject, ShapesWorld, caption, eval_prompts, oracle
from ..metrics import psnr
from .frames import frame_quality, frame_shares, pool_shares

SPLITS = ("heldout", "train", "image", "animate", "edit-shape", "edit-colour", "wide")
RATES = ("colour", "shape", "motion", "all", "nothing")
# splits whose rates are also given per asked colour, shape and pair; those whose clips are read for frames
BREAKDOWN_SPLITS = ("heldout", "train", "image")
FRAME_SPLITS = ("heldout", "train")
FRAME_ITEMS = ("malformed", "ghost")  # flags whose items a split's result lists (frame_items), to trace them
BY = ("by_colour", "by_shape", "by_pair")
ANIMATE_SEED = 2024  # the held-out clips whose first frames animate, and edit, start from
VAE_SEED = 12345  # the held-out clips score_vae reconstructs


def split_keys(split: str) -> tuple[str, ...]:
    """What the oracle is asked of a split's items: colour and shape for one frame, motion too for clips."""
    return ("colour", "shape") if split == "image" else ("colour", "shape", "motion")


def edit_target(obj: ShapeObject, split: str) -> tuple[str, str, str]:
    """What an edit split asks of a clip's object: the next shape, or the colour three along, same motion."""
    shape, colour = obj.shape, obj.colour
    if split == "edit-shape":
        shape = SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]
    else:
        names = list(COLOURS)
        colour = names[(names.index(colour) + 3) % len(names)]
    return colour, shape, obj.motion


def read_back(video: torch.Tensor, asked: tuple[str, str, str], keys: tuple[str, ...]) -> dict:
    """One item's row: what the oracle found in ``video`` (3, t, h, w) (``None``: no object) and, for each of
    ``keys``, whether the largest object has the asked (colour, shape, motion)."""
    found = oracle(video)
    if not found:
        return {"found": None, **dict.fromkeys(keys, False)}
    top, want = found[0], dict(zip(("colour", "shape", "motion"), asked))
    return {"found": tuple(top[key] for key in keys), **{key: top[key] == want[key] for key in keys}}


def tally(rows: list[dict], keys: tuple[str, ...]) -> dict:
    """The rates of ``rows`` (``read_back``'s): each key's, ``all`` of them, and ``nothing`` found."""
    n = max(len(rows), 1)
    rates = {key: sum(row[key] for row in rows) / n for key in keys}
    rates["all"] = sum(row["found"] is not None and all(row[key] for key in keys) for row in rows) / n
    rates["nothing"] = sum(row["found"] is None for row in rows) / n
    return rates


def breakdown(asked: list[tuple[str, str, str]], rows: list[dict], keys: tuple[str, ...]) -> dict:
    """``tally``'s rates of ``rows`` grouped by what each item asked: ``by_colour`` {colour: {"n", rates}},
    ``by_shape`` {shape: ...} and ``by_pair`` {"colour shape": ...} (``nothing`` left out), in the world's
    order; ``asked`` holds each row's (colour, shape, motion)."""
    groups = {by: {} for by in BY}
    for (colour, shape, _), row in zip(asked, rows):
        for by, name in zip(BY, (colour, shape, f"{colour} {shape}")):
            groups[by].setdefault(name, []).append(row)
    order = {
        "by_colour": list(COLOURS),
        "by_shape": list(SHAPES),
        "by_pair": [f"{c} {s}" for c in COLOURS for s in SHAPES],
    }
    out = {}
    for by, named in groups.items():
        rates = {
            name: {"n": len(named[name]), **tally(named[name], keys)} for name in order[by] if name in named
        }
        out[by] = {name: {k: v for k, v in r.items() if k != "nothing"} for name, r in rates.items()}
    return out


def breakdown_rows(r: dict, seeds: int = 1) -> dict | None:
    """The cells of a split's breakdown (``breakdown``'s, in ``r``) for a table, None without one: ``keys`` (the
    rates it has, of colour / shape / motion / all), ``rows`` [(asked colour or shape, items, [rate per key])],
    colours first, ``shapes`` (the pair table's columns) and ``pairs`` [(colour, [(shape rate, items) or None per
    shape])]. Item counts are divided by ``seeds`` (a pooled run's per-seed count)."""
    if "by_colour" not in r:
        return None
    keys = [k for k in ("colour", "shape", "motion", "all") if k in next(iter(r["by_colour"].values()))]
    rows = [(name, g["n"] // seeds, [g[k] for k in keys]) for by in BY[:2] for name, g in r[by].items()]
    shapes = list(r["by_shape"])
    pairs = []
    for colour in r["by_colour"]:
        groups = [r["by_pair"].get(f"{colour} {shape}") for shape in shapes]
        pairs.append((colour, [(g["shape"], g["n"] // seeds) if g else None for g in groups]))
    return {"keys": keys, "rows": rows, "shapes": shapes, "pairs": pairs}


def pool_breakdown(parts: list[dict]) -> dict:
    """``breakdown``s of several runs merged: each group's rates weighted by its items."""
    out = {}
    for by in BY:
        names = list(dict.fromkeys(name for part in parts for name in part[by]))
        out[by] = {}
        for name in names:
            groups = [part[by][name] for part in parts if name in part[by]]
            n = sum(g["n"] for g in groups)
            keys = [k for k in groups[0] if k != "n"]
            out[by][name] = {"n": n, **{k: sum(g[k] * g["n"] for g in groups) / n for k in keys}}
    return out


def _heldout_clips(count: int) -> tuple[ShapesWorld, list]:
    world = ShapesWorld(64, 64, 17, split="heldout", seed=ANIMATE_SEED)
    return world, [world.scene(i) for i in range(count)]


def split_items(split: str, count: int, seed: int = 0) -> list[tuple[str, tuple[str, str, str]]]:
    """The (prompt, (colour, shape, motion) asked) items of ``split``; edit prompts depend on the ``seed``."""
    if split == "animate":
        _, scenes = _heldout_clips(count)
        return [
            (sc.caption, (sc.objects[0].colour, sc.objects[0].shape, sc.objects[0].motion)) for sc in scenes
        ]
    if split.startswith("edit-"):
        _, scenes = _heldout_clips(count)
        rng = np.random.default_rng([seed, 0xED17])
        asked = [edit_target(sc.objects[0], split) for sc in scenes]
        return [(caption([ShapeObject(*a, 1.0, 0.0, 0.0, 0.0)], rng), a) for a in asked]
    return eval_prompts("heldout" if split == "image" else split, count=count)


def _maker(
    pipe, split: str, count: int, seed: int, strength: float, source: dict | None, job: dict, first: list
):
    """``make(start, chunk)``: the videos of items ``start ..`` of ``split`` (animate's first-frame PSNRs go to
    ``first``)."""
    if split == "animate":
        world, _ = _heldout_clips(0)
        stills = torch.stack([world.clip(i)[0][:, :1] for i in range(count)])

        def make(s: int, chunk: list) -> torch.Tensor:
            videos = pipe.animate(stills[s : s + len(chunk)], [p for p, _ in chunk], seed=seed + s, progress=False,
                                  **job)  # fmt: skip
            first.extend(psnr(v[:, :1].cpu(), still, data_range=2.0) for v, still in zip(videos, stills[s:]))
            return videos

        return make
    if split.startswith("edit-"):
        world, scenes = _heldout_clips(count)
        clips = torch.stack([world.clip(i)[0] for i in range(count)])
        captions = [sc.caption for sc in scenes]

        def make(s: int, chunk: list) -> torch.Tensor:
            flow = {"source_prompt": captions[s : s + len(chunk)], **source} if source else {}
            return pipe.edit(clips[s : s + len(chunk)], [p for p, _ in chunk], strength, seed=seed + s,
                             progress=False, **flow, **job)  # fmt: skip

        return make
    job = {**job, "frames": 1} if split == "image" else job

    def make(s: int, chunk: list) -> torch.Tensor:
        return pipe.generate([p for p, _ in chunk], seed=seed + s, progress=False, **job)

    return make


def score_split(
    pipe,
    split: str,
    count: int,
    batch: int = 24,
    seed: int = 0,
    strength: float = 0.5,
    source: dict | None = None,
    **job,
) -> dict:
    """Generate ``count`` items of ``split`` with ``pipe`` (``batch`` at a time, batch ``s`` with seed ``seed +
    s``; ``job``: further job options) and score them with the oracle. For the edit splits, ``strength`` is the
    edit's and ``source`` (a dict of FlowEdit options, maybe empty) edits by FlowEdit from the clip's own caption.

    Returns ``prompts``, the ``RATES``, ``first_psnr`` (animate), the ``breakdown`` by asked colour, shape and
    pair (``BREAKDOWN_SPLITS``), ``frames``: the shares of malformed first frames and ghosts
    (``frames.frame_shares``, ``FRAME_SPLITS``; by asked colour ``frames_by_colour``) and ``frame_items``: which
    items (indices into the split's prompts) were flagged so, for each of ``FRAME_ITEMS``, and up to 10
    ``examples_missed`` as (prompt, what was found or ``None``)."""
    keys, first = split_keys(split), []
    items = split_items(split, count, seed)
    make = _maker(pipe, split, count, seed, strength, source, job, first)
    rows, frames = [], []
    for s in range(0, len(items), batch):
        chunk = items[s : s + batch]
        videos = make(s, chunk)
        rows += [read_back(video, asked, keys) for (_, asked), video in zip(chunk, videos)]
        if split in FRAME_SPLITS:
            frames += [frame_quality(video, asked[0]) for (_, asked), video in zip(chunk, videos)]
        print(f"  {split}: {min(s + batch, len(items))}/{len(items)}", file=sys.stderr)
    extra = {"first_psnr": sum(first) / len(items)} if first else {}
    if split in BREAKDOWN_SPLITS:
        extra.update(breakdown([asked for _, asked in items], rows, keys))
    if split in FRAME_SPLITS:
        extra["frames"] = frame_shares(frames)
        extra["frames_by_colour"] = frames_by_colour([asked for _, asked in items], frames)
        extra["frame_items"] = {
            flag: [i for i, row in enumerate(frames) if row[flag]] for flag in FRAME_ITEMS
        }
    misses = [
        (prompt, row["found"]) for (prompt, _), row in zip(items, rows) if not all(row[k] for k in keys)
    ]
    return {"prompts": len(items), **tally(rows, keys), **extra, "examples_missed": misses[:10]}


def frames_by_colour(asked: list[tuple], frames: list[dict]) -> dict:
    """``frame_shares`` of a split's clips grouped by the colour each asked (``asked[i][0]``), in the world's
    order of colours as ``breakdown``'s ``by_colour``."""
    groups: dict[str, list[dict]] = {}
    for (colour, *_), row in zip(asked, frames):
        groups.setdefault(colour, []).append(row)
    return {colour: frame_shares(groups[colour]) for colour in COLOURS if colour in groups}


def pool(runs: list[dict], seeds: list[int]) -> dict:
    """One split's results over several sampling seeds (same prompts, same count): the rates pooled over every
    item (the breakdown and the frame shares too), each seed's rates under ``per_seed`` and, for the frame
    splits, each seed's ``frame_items`` under ``frame_items_by_seed``. One seed is returned as it is."""
    if len(runs) == 1:
        return runs[0]
    keys = [k for k, v in runs[0].items() if isinstance(v, float) and k != "seconds"]  # every rate
    pooled = {k: sum(r[k] for r in runs) / len(runs) for k in keys}
    if BY[0] in runs[0]:
        pooled.update(pool_breakdown([{by: r[by] for by in BY} for r in runs]))
    if "frames" in runs[0]:
        pooled["frames"] = pool_shares([r["frames"] for r in runs])
        colours = runs[0]["frames_by_colour"]
        pooled["frames_by_colour"] = {
            c: pool_shares([r["frames_by_colour"][c] for r in runs]) for c in colours
        }
    per_seed = [{"seed": seed, **{k: r[k] for k in keys}} for seed, r in zip(seeds, runs)]
    # flagged items are kept per seed, in the order of ``seeds``: pooled, the indices would mix clips
    if "frame_items" in runs[0]:
        pooled["frame_items_by_seed"] = [r["frame_items"] for r in runs]
    return {"prompts": runs[0]["prompts"], "seeds": list(seeds), **pooled,
            "examples_missed": runs[0]["examples_missed"], "per_seed": per_seed}  # fmt: skip


@torch.no_grad()
def score_vae(vae, clips: int, seed: int = VAE_SEED) -> dict:
    """PSNR of the VAE's reconstructions of ``clips`` held-out clips, how often the oracle still reads the clip's
    object right through them (``oracle_colour`` / ``_shape`` / ``_motion``: the most the denoiser can reach
    through this VAE), and those rates by the object's colour, shape and (colour, shape) pair (``breakdown``);
    ``frames`` and ``frames_by_colour``: the reconstructions' malformed first frames and ghosts as for generated
    clips (``frame_quality``; the true clips have none), the least a denoiser's clips can show through this VAE."""
    world = ShapesWorld(64, 64, 17, split="heldout", seed=seed)
    keys = ("colour", "shape", "motion")
    scores, asked, rows, frames = [], [], [], []
    for i in range(clips):
        video = world.clip(i)[0][None]
        recon = vae.decode(vae.encode(video.to(vae.device)).mode()).cpu()
        scores.append(psnr(recon, video, data_range=2.0))
        truth = world.scene(i).objects[0]  # held-out clips show one object
        asked.append((truth.colour, truth.shape, truth.motion))
        rows.append(read_back(recon[0], asked[-1], keys))
        frames.append(frame_quality(recon[0], truth.colour))
    rates = tally(rows, keys)
    return {"clips": clips, "psnr_mean": sum(scores) / clips, "psnr_min": min(scores),
            **{f"oracle_{key}": rates[key] for key in keys}, **breakdown(asked, rows, keys),
            "frames": frame_shares(frames), "frames_by_colour": frames_by_colour(asked, frames)}  # fmt: skip
