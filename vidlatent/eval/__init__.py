"""Scoring shipped models on the shapes world (``vidlatent.data.shapes``: the world and its oracle).

``shapes``: the prompt splits, generation over seeds, the oracle's reading of each item and the rates;
``evaluate``: the whole score MODEL_CARD.md reports; ``last_frame``: the first- and last-frame PSNRs of
``animate --last``; ``speed``: the CLI's wall time; ``card``: the default model's MODEL_CARD.md.
``control``: how well videos follow silhouette controls (IoU, colour) on a held-out control set.
``frames``: malformed first frames and ghost objects of text-to-video clips.
``morph``: whether morphs between two one-object stills keep an object in every middle frame, and how smoothly.
"""

from .evaluate import evaluate, summary
from .frames import frame_quality, frame_shares, shape_fit
from .last_frame import LABELS, last_frame_scores
from .morph import morph_pairs, morph_report, morph_scores, object_frames
from .shapes import (
    RATES,
    SPLITS,
    breakdown,
    edit_target,
    pool,
    read_back,
    score_split,
    score_vae,
    split_items,
    tally,
)
from .speed import cli_time

__all__ = [
    "LABELS",
    "RATES",
    "SPLITS",
    "breakdown",
    "cli_time",
    "edit_target",
    "evaluate",
    "frame_quality",
    "frame_shares",
    "last_frame_scores",
    "morph_pairs",
    "morph_report",
    "morph_scores",
    "object_frames",
    "pool",
    "read_back",
    "score_split",
    "score_vae",
    "shape_fit",
    "split_items",
    "summary",
    "tally",
]
