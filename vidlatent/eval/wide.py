"""Scoring the wide world's words: does a pipeline draw the size, count, background colour and stillness a
prompt asks?

Items are held-out prompts (``HELDOUT`` combinations of colour, shape and motion, which no training clip shows)
that each add one wide-world attribute: "a small red circle moving left" / "a big ...", "two red circles ..." /
"three ...", "... on a blue background" (a colour other than the object's), "a red circle standing still".
Each item is read back by the oracle: ``size`` / ``count`` / ``still`` ask the object of the asked colour to
have that size class, count or no motion; ``background`` asks ``read_background`` for the asked colour. The
largest object's colour, shape and motion are scored as the plain splits do (``all``: the three together).
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from ..data.shapes import COLOURS, HELDOUT, ShapeObject, caption, oracle, read_background

ATTRIBUTES = ("size", "count", "background", "still")
WIDE_RATES = (*ATTRIBUTES, "colour", "shape", "motion", "all", "nothing")


def wide_items(count: int, seed: int = 0) -> list[tuple[str, dict]]:
    """``count`` (prompt, asked) items, the attributes in turn; ``asked`` holds ``attribute``, the object's
    ``colour`` / ``shape`` / ``motion`` and the attribute's value. The same for every sampling seed."""
    rng = np.random.default_rng([seed, 0x1DE])
    colours = list(COLOURS)
    items = []
    for i in range(count):
        attribute = ATTRIBUTES[i % len(ATTRIBUTES)]
        colour, shape, motion = HELDOUT[(i // len(ATTRIBUTES)) % len(HELDOUT)]
        turn = i // len(ATTRIBUTES)
        asked = {"attribute": attribute, "colour": colour, "shape": shape, "motion": motion}
        obj = ShapeObject(colour, shape, motion, 1.0, 0.0, 0.0, 0.0)
        objects, background = [obj], None
        if attribute == "size":
            asked["size"] = obj.size_class = ("small", "big")[turn % 2]
        elif attribute == "count":
            asked["count"] = 2 + turn % 2
            objects = [obj] * asked["count"]
        elif attribute == "background":
            others = [c for c in colours if c != colour]
            asked["background"] = others[turn % len(others)]
            background = {"kind": "solid", "level": 128.0, "colour": asked["background"]}
        else:
            asked["motion"] = obj.motion = "still"
        items.append((caption(objects, rng, background, wide=True), asked))
    return items


def read_wide(video: torch.Tensor, asked: dict) -> dict:
    """One item's row: whether ``video`` (3, t, h, w) shows the asked attribute (``asked["attribute"]``) and
    whether its largest object has the asked colour, shape and motion."""
    found = oracle(video)
    mine = next((o for o in found if o["colour"] == asked["colour"]), None)
    attribute = asked["attribute"]
    if attribute == "background":
        ok = read_background(video) == asked["background"]
    elif attribute == "still":
        ok = mine is not None and mine["motion"] == "still"
    else:
        ok = mine is not None and mine[attribute] == asked[attribute]
    top = found[0] if found else None
    row = {"attribute": attribute, "ok": bool(ok), "found": None if top is None else dict(top)}
    for key in ("colour", "shape", "motion"):
        row[key] = top is not None and top[key] == asked[key]
    return row


def tally_wide(rows: list[dict]) -> dict:
    """Each attribute's rate over its own items, and colour / shape / motion / all / nothing over all items."""
    n = max(len(rows), 1)
    rates = {}
    for attribute in ATTRIBUTES:
        mine = [r["ok"] for r in rows if r["attribute"] == attribute]
        rates[attribute] = sum(mine) / max(len(mine), 1)
    for key in ("colour", "shape", "motion"):
        rates[key] = sum(r[key] for r in rows) / n
    rates["all"] = sum(r["colour"] and r["shape"] and r["motion"] for r in rows) / n
    rates["nothing"] = sum(r["found"] is None for r in rows) / n
    return rates


def score_wide(pipe, count: int, batch: int = 24, seed: int = 0, **job) -> dict:
    """Generate ``wide_items(count)`` with ``pipe`` (``batch`` at a time, batch ``s`` with seed ``seed + s``) and
    score them (``tally_wide``), with up to 10 ``examples_missed`` as (prompt, what was found)."""
    items = wide_items(count)
    rows = []
    for s in range(0, len(items), batch):
        chunk = items[s : s + batch]
        videos = pipe.generate([p for p, _ in chunk], seed=seed + s, progress=False, **job)
        rows += [read_wide(video, asked) for (_, asked), video in zip(chunk, videos)]
        print(f"  wide: {min(s + batch, len(items))}/{len(items)}", file=sys.stderr)
    misses = [(prompt, row["found"]) for (prompt, _), row in zip(items, rows) if not row["ok"]]
    return {"prompts": len(items), **tally_wide(rows), "examples_missed": misses[:10]}
