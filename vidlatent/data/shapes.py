"""The shapes world: a seeded, endless procedural video generator, its caption grammar and an oracle.

Every clip shows one to three flat-coloured shapes (circle, square, triangle in six saturated colours) moving
left, right, up, down, along a diagonal or bouncing, over a low-saturation background (solid, gradient,
soft stripes, soft checks). Captions come from a small grammar with paraphrases ("a red circle moving
left", "a red ball slides to the left"). Backgrounds are kept desaturated so that the ``oracle`` can find
objects by colour: it reads a clip and reports every object's colour, shape, motion, size and count, so
generated videos can be scored without a person looking at them (``object_mask``: the pixels it reads as an
object; ``read_background``: the background's colour).

The *wide* world (``ShapesWorld(wide=True)``) adds what people ask of it: sizes ("a small red circle", "a big
blue square"), still objects ("a green triangle standing still"), coloured backgrounds ("... on a blue
background") and counts of one kind ("two red circles moving right", "three purple boxes bouncing").
A scene's objects can also be drawn alone: ``render_masks`` (each object's coverage) and
``render_silhouette`` (white objects on black, a control video), drawn exactly as ``render`` draws them.

The (colour, shape, motion) combinations are split once: ``HELDOUT`` combinations never appear in a
training clip (no object of a training clip has one) and are used only for evaluation.

Everything is a pure function of ``(seed, index)``: ``ShapesWorld(seed=s).clip(i)`` is the same clip on
every machine. Letters: f frames, h height, w width.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "COLOURS",
    "SHAPES",
    "MOTIONS",
    "HELDOUT",
    "TRAIN_COMBOS",
    "ShapeObject",
    "Scene",
    "ShapesWorld",
    "caption",
    "colour_masks",
    "coverage",
    "eval_prompts",
    "grammar_words",
    "object_mask",
    "oracle",
    "parse_prompt",
    "render",
    "render_masks",
    "render_silhouette",
    "prompt_attributes",
    "read_background",
    "SIZES",
]

# saturated RGB colours (0-255) whose hues are at least ~25 degrees apart
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (235, 215, 30),
    "green": (40, 185, 60),
    "blue": (40, 80, 230),
    "purple": (150, 50, 210),
}
SHAPES = ("circle", "square", "triangle")
# unit direction (dx, dy) in image coordinates (y grows downwards); "bouncing" rises and falls back
MOTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up-left": (-1.0, -1.0),
    "up-right": (1.0, -1.0),
    "down-left": (-1.0, 1.0),
    "down-right": (1.0, 1.0),
    "bouncing": (0.0, 0.0),
}
BACKGROUNDS = ("solid", "gradient", "stripes", "checks")

# ----------------------------------------------------------------------------------------------- grammar

SHAPE_WORDS = {
    "circle": ("circle", "ball", "disk"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
}
DIRECTION_PHRASES = {
    "left": ("left", "to the left", "leftward"),
    "right": ("right", "to the right", "rightward"),
    "up": ("up", "upward", "upwards"),
    "down": ("down", "downward", "downwards"),
    "up-left": ("up and to the left", "up and left", "diagonally up and left"),
    "up-right": ("up and to the right", "up and right", "diagonally up and right"),
    "down-left": ("down and to the left", "down and left", "diagonally down and left"),
    "down-right": ("down and to the right", "down and right", "diagonally down and right"),
}
MOVING_VERBS = ("moving", "moves", "slides", "sliding", "drifts", "goes", "travels")
BOUNCING_PHRASES = ("bouncing", "bounces", "bouncing up and down", "hops up and down")
BACKGROUND_PHRASES = {
    "solid": ("on a plain background", "on a {tone} background"),
    "gradient": ("over a gradient", "on a {tone} gradient background"),
    "stripes": ("over soft stripes", "on a striped background"),
    "checks": ("over soft checks", "on a checkered background"),
}


# the wide world's additions (``ShapesWorld(wide=True)``)
SIZES: dict[str, tuple[float, float]] = {  # radius as a fraction of the frame's shorter side
    "small": (0.075, 0.10),
    "medium": (0.12, 0.19),  # the narrow world's only size; captions name no size for it
    "big": (0.22, 0.28),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "big": ("big", "large")}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
PLURAL_WORDS = {
    "circle": ("circles", "balls", "disks"),
    "square": ("squares", "boxes", "blocks"),
    "triangle": ("triangles",),
}
PLURAL_MOVING_VERBS = ("moving", "sliding", "move", "slide", "drift", "go", "travel")
PLURAL_BOUNCING_PHRASES = ("bouncing", "bounce", "bouncing up and down", "hop up and down")
STILL_PHRASES = ("standing still", "staying still", "that stays still", "sitting still", "not moving")
PLURAL_STILL_PHRASES = ("standing still", "staying still", "that stay still", "sitting still", "not moving")
COLOUR_BACKGROUND_PHRASES = (
    "on {a} {colour} background",
    "over {a} {colour} background",
    "against {a} {colour} background",
)
BACKGROUND_SATURATION = (0.25, 0.32)  # coloured backgrounds: below the oracle's object threshold (0.4)
BACKGROUND_VALUE = (0.4, 0.85)


def _combo_split(seed: int = 2026, fraction: float = 0.2) -> tuple[tuple[str, str, str], ...]:
    """Pick ~``fraction`` of all (colour, shape, motion) combinations to hold out, such that every pair of
    attributes (colour+shape, colour+motion, shape+motion) still occurs in some training combination."""
    combos = list(itertools.product(COLOURS, SHAPES, MOTIONS))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(combos))
    held: list[tuple[str, str, str]] = []
    pairs = {
        k: {}
        for k in ((0, 1), (0, 2), (1, 2))  # attribute pair -> {pair value: training combos with it}
    }
    for c in combos:
        for k in pairs:
            key = (c[k[0]], c[k[1]])
            pairs[k][key] = pairs[k].get(key, 0) + 1
    target = round(fraction * len(combos))
    for j in order:
        c = combos[j]
        if all(pairs[k][(c[k[0]], c[k[1]])] > 1 for k in pairs):
            held.append(c)
            for k in pairs:
                pairs[k][(c[k[0]], c[k[1]])] -= 1
        if len(held) == target:
            break
    return tuple(sorted(held))


HELDOUT: tuple[tuple[str, str, str], ...] = _combo_split()
TRAIN_COMBOS: tuple[tuple[str, str, str], ...] = tuple(
    c for c in itertools.product(COLOURS, SHAPES, MOTIONS) if c not in set(HELDOUT)
)


def _direction(motion: str) -> tuple[float, float]:
    """The unit vector (x right, y down) of a straight ``motion``."""
    dx, dy = MOTIONS[motion]
    norm = math.hypot(dx, dy)
    return dx / norm, dy / norm


@dataclass
class ShapeObject:
    """One object of a scene: what it is, where it starts and how it moves (pixels; size = radius)."""

    colour: str
    shape: str
    motion: str
    size: float
    x: float
    y: float
    speed: float  # pixels per frame along the motion direction (bouncing: height of the hop)
    rgb: tuple[int, int, int] = (0, 0, 0)
    size_class: str = ""  # "small" / "big" are named in captions (wide world); "" or "medium" are not

    def path(self, frames: int) -> tuple[np.ndarray, np.ndarray]:
        """Centre positions (x, y) at each frame."""
        t = np.arange(frames, dtype=np.float64)
        if self.motion == "still":
            return np.full(frames, self.x), np.full(frames, self.y)
        if self.motion == "bouncing":
            phase = t / max(1, frames - 1)
            return np.full(frames, self.x), self.y - self.speed * np.sin(np.pi * phase)
        ux, uy = _direction(self.motion)
        return self.x + ux * self.speed * t, self.y + uy * self.speed * t


@dataclass
class Scene:
    """A clip's content: objects drawn in order over a background, and one caption for it."""

    objects: list[ShapeObject]
    background: dict = field(default_factory=dict)
    caption: str = ""
    frames: int = 17


def _tone(level: float) -> str:
    return "dark" if level < 90 else ("light" if level > 170 else "gray")


def _groups(objects: list[ShapeObject]) -> list[tuple[ShapeObject, int]]:
    """Runs of objects of one kind (colour, shape, motion, size class) as (first object, how many)."""

    def kind(obj: ShapeObject) -> tuple[str, str, str, str]:
        return obj.colour, obj.shape, obj.motion, obj.size_class

    out: list[tuple[ShapeObject, int]] = []
    for obj in objects:
        if out and kind(out[-1][0]) == kind(obj):
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((obj, 1))
    return out


def _phrase(obj: ShapeObject, count: int, rng: np.random.Generator, wide: bool) -> str:
    """ "a red circle moving left", "a small red ball standing still", "two big red circles bouncing"."""
    size = f"{rng.choice(SIZE_WORDS[obj.size_class])} " if obj.size_class in SIZE_WORDS else ""
    if count == 1:
        noun = rng.choice(SHAPE_WORDS[obj.shape])
        if wide and rng.random() < 0.1:
            det = COUNT_WORDS[1]
        else:
            det = "an" if (size or obj.colour)[0] in "aeiou" else "a"
        moving, bouncing, still = MOVING_VERBS, BOUNCING_PHRASES, STILL_PHRASES
    else:
        noun, det = rng.choice(PLURAL_WORDS[obj.shape]), COUNT_WORDS[count]
        moving, bouncing, still = PLURAL_MOVING_VERBS, PLURAL_BOUNCING_PHRASES, PLURAL_STILL_PHRASES
    head = f"{det} {size}{obj.colour} {noun}"
    if obj.motion == "bouncing":
        return f"{head} {rng.choice(bouncing)}"
    if obj.motion == "still":
        return f"{head} {rng.choice(still)}"
    verb, where = rng.choice(moving), rng.choice(DIRECTION_PHRASES[obj.motion])
    return f"{head} {verb} {where}"


def caption(
    objects: list[ShapeObject], rng: np.random.Generator, background: dict | None = None, wide: bool = False
) -> str:
    """A paraphrased caption of ``objects`` (joined with "and"), sometimes naming the background (always when it
    is coloured). Consecutive objects of one kind are counted ("two red circles ..."); ``wide`` captions
    sometimes say "one" for a single object."""
    text = " and ".join(_phrase(obj, n, rng, wide) for obj, n in _groups(objects))
    if background and background.get("colour"):
        colour = background["colour"]
        text += " " + rng.choice(COLOUR_BACKGROUND_PHRASES).format(
            a="an" if colour[0] in "aeiou" else "a", colour=colour
        )
    elif background and rng.random() < 0.3:
        phrase = rng.choice(BACKGROUND_PHRASES[background["kind"]])
        text += " " + phrase.format(tone=_tone(background["level"]))
    return text


def grammar_words(wide: bool = False) -> list[str]:
    """Every word the caption grammar can produce (the default text encoder's vocabulary); ``wide``: the wide
    world's grammar (its extra words come after the narrow grammar's)."""
    texts = [*COLOURS, *itertools.chain(*SHAPE_WORDS.values()), *MOVING_VERBS, *BOUNCING_PHRASES]
    texts += list(itertools.chain(*DIRECTION_PHRASES.values()))
    texts += [
        p.format(tone=t) for ps in BACKGROUND_PHRASES.values() for p in ps for t in ("dark", "light", "gray")
    ]
    if wide:
        texts += [*itertools.chain(*SIZE_WORDS.values()), *COUNT_WORDS.values()]
        texts += [*itertools.chain(*PLURAL_WORDS.values()), *PLURAL_MOVING_VERBS, *PLURAL_BOUNCING_PHRASES]
        texts += [*STILL_PHRASES, *PLURAL_STILL_PHRASES]
        texts += [p.format(a=a, colour="red") for p in COLOUR_BACKGROUND_PHRASES for a in ("a", "an")]
    words: list[str] = ["a", "an", "and"]
    for text in texts:
        for w in text.split():
            if w not in words:
                words.append(w)
    return words


def parse_prompt(prompt: str) -> tuple[str | None, str | None, str | None]:
    """(colour, shape, motion) named by a one-object prompt of the grammar; None for what it does not name."""
    words = prompt.lower().replace(",", " ").split()
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((s for s, names in SHAPE_WORDS.items() if any(n in words for n in names)), None)
    shape = shape or next((s for s, names in PLURAL_WORDS.items() if any(n in words for n in names)), None)
    motion = None
    if {"bouncing", "bounces", "bounce", "hops", "hop"} & set(words):
        motion = "bouncing"
    else:
        vertical = "up" if {"up", "upward", "upwards"} & set(words) else None
        vertical = vertical or ("down" if {"down", "downward", "downwards"} & set(words) else None)
        horizontal = "left" if {"left", "leftward"} & set(words) else None
        horizontal = horizontal or ("right" if {"right", "rightward"} & set(words) else None)
        if vertical and horizontal:
            motion = f"{vertical}-{horizontal}"
        else:
            motion = vertical or horizontal
    return colour, shape, motion


def prompt_attributes(prompt: str) -> dict:
    """What a one-kind prompt of the wide grammar asks: ``{"colour", "shape", "motion", "size", "count",
    "background"}`` (``motion`` "still" for a still object; ``size`` "small" / "big" / None; ``count`` 1-3;
    ``background`` the colour of a coloured background or None)."""
    words = prompt.lower().replace(",", " ").replace(".", " ").split()
    background = None
    if "background" in words:
        k = words.index("background")
        background = words[k - 1] if k and words[k - 1] in COLOURS else None
        words = (
            words[: max(0, k - 3)] + words[k + 1 :]
        )  # "on a blue background": its colour is not the object's
    colour, shape, motion = parse_prompt(" ".join(words))
    if "still" in words or " ".join(words).find("not moving") >= 0:
        motion = "still"
    size = next((s for s, names in SIZE_WORDS.items() if set(names) & set(words)), None)
    count = next((n for n, w in COUNT_WORDS.items() if w in words), None)
    if count is None:
        count = 2 if any(n in words for n in itertools.chain(*PLURAL_WORDS.values())) else 1
    return {"colour": colour, "shape": shape, "motion": motion, "size": size, "count": count,
            "background": background}  # fmt: skip


# --------------------------------------------------------------------------------------------- rendering


def _coverage(obj: ShapeObject, xs: np.ndarray, ys: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of ``obj`` at centres (xs, ys) (f,) on the pixel grid -> (f, h, w)."""
    dx = gx[None] - xs[:, None, None]
    dy = gy[None] - ys[:, None, None]
    r = obj.size
    if obj.shape == "circle":
        inside = r - np.sqrt(dx * dx + dy * dy)
    elif obj.shape == "square":
        inside = r * 0.9 - np.maximum(np.abs(dx), np.abs(dy))
    else:  # upright isosceles triangle: apex at -r, base at +r*0.8, half-width r
        top, bottom, half = -r, 0.8 * r, r
        height = bottom - top
        slope = half / height
        # distance to the two slanted edges (approximately signed, normalised) and the base
        side = (slope * (dy - top) - np.abs(dx)) / math.sqrt(1 + slope * slope)
        inside = np.minimum(side, bottom - dy)
    return np.clip(inside + 0.5, 0.0, 1.0)


def _background(bg: dict, f: int, h: int, w: int, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    tint = np.asarray(bg["tint"], dtype=np.float64)  # small per-channel offsets keep it desaturated
    level, kind = bg["level"], bg["kind"]
    if kind == "solid":
        grey = np.full((h, w), level)
    elif kind == "gradient":
        u = (gx * math.cos(bg["angle"]) + gy * math.sin(bg["angle"])) / max(h, w)
        u = (u - u.min()) / max(1e-6, u.max() - u.min())
        grey = level + (bg["level2"] - level) * u
    elif kind == "stripes":
        u = gx * math.cos(bg["angle"]) + gy * math.sin(bg["angle"])
        grey = level + bg["amplitude"] * np.sin(2 * np.pi * u / bg["period"])
    else:
        grey = level + bg["amplitude"] * np.sin(2 * np.pi * gx / bg["period"]) * np.sin(
            2 * np.pi * gy / bg["period"]
        )
    img = grey[..., None] + tint
    return np.broadcast_to(img, (f, h, w, 3)).copy()


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (gx, gy), each (h, w)."""
    gy, gx = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    return gx, gy


def render(scene: Scene, frames: int, height: int, width: int) -> np.ndarray:
    """The clip of ``scene`` as uint8 (f, h, w, 3)."""
    gx, gy = _grid(height, width)
    video = _background(scene.background, frames, height, width, gx, gy)
    for obj in scene.objects:
        xs, ys = obj.path(frames)
        cov = _coverage(obj, xs, ys, gx, gy)[..., None]
        video = video * (1 - cov) + np.asarray(obj.rgb, dtype=np.float64) * cov
    return np.clip(np.round(video), 0, 255).astype(np.uint8)


def coverage(shape: str, size: float, xs, ys, height: int, width: int) -> np.ndarray:
    """How much of each pixel a ``shape`` of radius ``size`` (pixels) centred at ``(xs[i], ys[i])`` in frame i
    covers, float64 (f, h, w) in [0, 1], anti-aliased exactly as ``render`` draws an object."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; accepted: {', '.join(SHAPES)}")
    gx, gy = _grid(height, width)
    obj = ShapeObject("", shape, "", float(size), 0.0, 0.0, 0.0)
    return _coverage(obj, np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64), gx, gy)


def render_masks(scene: Scene, frames: int, height: int, width: int) -> np.ndarray:
    """How much of each pixel each object of ``scene`` covers in its rendering: float64 (n, f, h, w) in
    [0, 1], one map per object in ``scene.objects`` order, the parts hidden by later objects removed (as
    ``render`` paints them). The maps sum to the coverage of all objects together."""
    gx, gy = _grid(height, width)
    masks = np.zeros((len(scene.objects), frames, height, width))
    for k, obj in enumerate(scene.objects):
        xs, ys = obj.path(frames)
        cov = _coverage(obj, xs, ys, gx, gy)
        masks[:k] *= 1 - cov
        masks[k] = cov
    return masks


def render_silhouette(scene: Scene, frames: int, height: int, width: int) -> np.ndarray:
    """The objects of ``scene`` in white on black, uint8 (f, h, w, 3): ``render`` with a black background and
    every object white (anti-aliased edges alike)."""
    gx, gy = _grid(height, width)
    video = np.zeros((frames, height, width, 3))
    for obj in scene.objects:
        xs, ys = obj.path(frames)
        cov = _coverage(obj, xs, ys, gx, gy)[..., None]
        video = video * (1 - cov) + 255.0 * cov
    return np.clip(np.round(video), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------- world


class ShapesWorld:
    """Seeded, endless clips of the shapes world.

    ``split``: "train" (objects only from ``TRAIN_COMBOS``), "heldout" (single objects from ``HELDOUT``) or
    "all". ``clip(i)`` -> (video (3, f, h, w) float32 in [-1, 1], caption); ``scene(i)`` the description;
    ``render(scene)`` the uint8 (f, h, w, 3) frames. ``max_objects`` caps objects per clip (1-3);
    ``image_fraction`` of the clips are one-frame images; ``length`` makes the world a fixed set of that many
    clips (index ``i`` shows clip ``i % length``), e.g. to overfit. ``crop`` (a multiple of 8) makes ``clip``
    return a ``crop`` x ``crop`` window of each rendering, placed by the clip's seed (cheap VAE training at the
    shapes' full-size scale). ``wide`` adds the wide world's sizes, still objects, coloured backgrounds and
    counted groups of one kind ("two red circles", train and all splits); each is named by the caption.
    ``wide_mix`` changes how often (keys of ``WIDE_MIX``: ``group``, ``still`` and ``background`` shares, ``sizes``
    {small, medium, big} weights) and ``shape_weights`` ({shape: weight}, others 1) how often each shape is drawn,
    e.g. to train more on what a model gets wrong; without them the world is the same clip for clip.
    """

    WIDE_MIX = {
        "group": 0.25,  # share of wide clips showing a group of 2-3 objects of one kind (train / all splits)
        "still": 0.12,  # share of objects (or groups) that stand still
        "background": 0.25,  # share of backgrounds that are coloured
        "sizes": {"small": 0.2, "medium": 0.6, "big": 0.2},  # size classes' weights
    }

    def __init__(
        self,
        height: int = 64,
        width: int = 64,
        frames: int = 17,
        split: str = "train",
        seed: int = 0,
        max_objects: int = 3,
        image_fraction: float = 0.0,
        length: int | None = None,
        crop: int | None = None,
        wide: bool = False,
        wide_mix: dict | None = None,
        shape_weights: dict | None = None,
    ):
        if split not in ("train", "heldout", "all"):
            raise ValueError(f"unknown split {split!r}; accepted: train, heldout, all")
        if height < 16 or width < 16 or frames < 1:
            raise ValueError(
                f"need height, width >= 16 and frames >= 1; got {width}x{height} (width x height), {frames} frames"
            )
        if not 1 <= max_objects <= 3:
            raise ValueError(f"max_objects must be 1-3; got {max_objects}")
        self.height, self.width, self.frames = height, width, frames
        self.split, self.seed, self.max_objects = split, seed, max_objects
        if crop is not None and (crop <= 0 or crop % 8 or crop > min(height, width)):
            raise ValueError(f"crop must be a positive multiple of 8 up to the frame size; got {crop}")
        self.image_fraction, self.length, self.crop, self.wide = image_fraction, length, crop, wide
        self.combos = {
            "train": TRAIN_COMBOS,
            "heldout": HELDOUT,
            "all": tuple(itertools.product(COLOURS, SHAPES, MOTIONS)),
        }[split]
        self.mix = _wide_mix(wide_mix)
        self.combo_p = _combo_weights(self.combos, shape_weights)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index, 0x5EA])

    def make_object(
        self,
        rng: np.random.Generator,
        colour: str,
        shape: str,
        motion: str,
        frames: int,
        size_class: str = "",
    ) -> ShapeObject:
        """An object of the given kind with a random size (in ``SIZES[size_class]``; "" is medium, unnamed),
        speed and a start that keeps its path in frame; ``motion`` "still" stays where it starts."""
        side = min(self.height, self.width)
        size = side * rng.uniform(*SIZES[size_class or "medium"])
        jitter = rng.integers(-12, 13, size=3)
        rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter))
        if motion == "still":
            speed = 0.0
        elif motion == "bouncing":
            speed = side * rng.uniform(0.25, 0.4)  # hop height
        else:  # ~0.3-0.5 of the frame over 17 frames
            speed = self._fit_speed(side * rng.uniform(0.3, 0.5) / 16, size, motion, frames)
        x, y = self._start(rng, size, motion, speed, frames)
        return ShapeObject(colour, shape, motion, size, x, y, speed, rgb, size_class)

    def _fit_speed(self, speed: float, size: float, motion: str, frames: int) -> float:
        """``speed`` (pixels a frame along a straight ``motion``) slowed, if need be, so that an object of radius
        ``size`` never leaves the frame (long clips move slower)."""
        ux, uy = _direction(motion)
        room_x = (self.width - 2 * size) / abs(ux) if ux else math.inf
        room_y = (self.height - 2 * size) / abs(uy) if uy else math.inf
        return min(speed, 0.95 * min(room_x, room_y) / max(1, frames - 1))

    def _start(
        self, rng: np.random.Generator, size: float, motion: str, speed: float, frames: int
    ) -> tuple[float, float]:
        """A start (x, y) drawn uniformly among those that keep the path of an object of radius ``size`` in
        frame."""
        h, w = self.height, self.width
        if motion == "still":
            return rng.uniform(size, w - size), rng.uniform(size, h - size)
        if motion == "bouncing":
            return rng.uniform(size, w - size), rng.uniform(min(h - size, size + speed), h - size)
        ux, uy = _direction(motion)
        travel = speed * max(1, frames - 1)
        lo_x, hi_x = (size, w - size - ux * travel) if ux >= 0 else (size - ux * travel, w - size)
        lo_y, hi_y = (size, h - size - uy * travel) if uy >= 0 else (size - uy * travel, h - size)
        return rng.uniform(lo_x, max(lo_x, hi_x)), rng.uniform(lo_y, max(lo_y, hi_y))

    def make_background(self, rng: np.random.Generator) -> dict:
        kind = str(rng.choice(BACKGROUNDS))
        level = float(rng.uniform(25, 225))
        bg = {"kind": kind, "level": level, "tint": (rng.uniform(-8, 8, size=3)).tolist()}
        if kind == "gradient":
            bg.update(level2=float(np.clip(level + rng.choice([-1, 1]) * rng.uniform(40, 110), 10, 240)))
            bg.update(angle=float(rng.uniform(0, 2 * math.pi)))
        elif kind in ("stripes", "checks"):
            bg.update(amplitude=float(rng.uniform(8, 22)), period=float(rng.uniform(12, 28)))
            bg.update(angle=float(rng.uniform(0, math.pi)))
        return bg

    def make_coloured_background(self, rng: np.random.Generator) -> dict:
        """A solid background of a palette colour's hue, saturated below what the oracle reads as an object."""
        name = str(rng.choice(list(COLOURS)))
        sat, value = rng.uniform(*BACKGROUND_SATURATION), rng.uniform(*BACKGROUND_VALUE)
        rgb = np.asarray(_hsv_to_rgb(PALETTE_HUES[name], sat, value)) * 255.0
        level = float(rgb.mean())
        return {"kind": "solid", "level": level, "tint": (rgb - level).tolist(), "colour": name}

    def _wide_kind(self, rng: np.random.Generator, combo: tuple[str, str, str]) -> tuple[str, str, str, str]:
        """A wide world's object kind: the combination, still or not, and its size class."""
        colour, shape, motion = combo
        if rng.random() < self.mix["still"]:
            motion = "still"
        sizes = self.mix["sizes"]
        size_class = str(rng.choice(list(sizes), p=np.array(list(sizes.values())) / sum(sizes.values())))
        return colour, shape, motion, "" if size_class == "medium" else size_class

    def _group(self, rng: np.random.Generator, frames: int) -> list[ShapeObject]:
        """Two or three objects of one kind (wide world) moving together: one direction and speed, or one hop,
        so that members kept well apart at the start (for the oracle to count them) stay apart. A group that
        finds no room at its speed tries again at half the speed (straight motions), then with one object
        fewer; its caption counts what was placed. Without the shared motion, medium groups of three and big
        groups hardly ever found room, so "three" was learnt as "three small" (asked for counts without a size,
        stage 18's model drew one big object)."""
        count = 2 if self.max_objects == 2 or rng.random() < 0.6 else 3
        colour, shape, motion, size_class = self._wide_kind(rng, self._combo(rng))
        lead = self.make_object(rng, colour, shape, motion, frames, size_class)
        side = min(self.height, self.width)
        straight = motion not in ("still", "bouncing")
        # a square's corners reach 1.27 radii out in every direction; a group's upright triangles (one
        # orientation) and circles stay apart at 1.1 (the oracle counted 118 of 118 groups of each right)
        margin = 1.3 if shape == "square" else 1.1
        for n in range(count, 1, -1):
            sizes = [lead.size, *(side * rng.uniform(*SIZES[size_class or "medium"]) for _ in range(n - 1))]
            for slow in (1.0, 0.5) if straight else (1.0,):
                speed = lead.speed * slow
                if straight:
                    speed = self._fit_speed(speed, max(sizes), motion, frames)
                members: list[ShapeObject] = []
                for size in sizes:
                    for _ in range(50):
                        x, y = self._start(rng, size, motion, speed, frames)
                        obj = ShapeObject(colour, shape, motion, size, x, y, speed, lead.rgb, size_class)
                        if all(_clear(obj, other, frames, margin) for other in members):
                            members.append(obj)
                            break
                    else:
                        break
                if len(members) == n:
                    return members
        return [lead]

    def scene(self, index: int) -> Scene:
        """The description of clip ``index`` (objects, background, caption)."""
        rng = self._rng(index % self.length if self.length else index)
        frames = 1 if rng.random() < self.image_fraction else self.frames
        if (
            self.wide
            and self.split != "heldout"
            and self.max_objects > 1
            and rng.random() < self.mix["group"]
        ):
            objects = self._group(rng, frames)
            background = self._background(rng)
            return Scene(objects, background, caption(objects, rng, background, wide=True), frames)
        if self.split == "heldout":
            count = 1
        else:
            weights = np.array([0.6, 0.3, 0.1][: self.max_objects])
            count = 1 + int(rng.choice(self.max_objects, p=weights / weights.sum()))
        objects, used = [], set()
        while len(objects) < count:
            colour, shape, motion = self._combo(rng)
            if colour in used:  # one object per colour, so captions and the oracle are unambiguous
                continue
            size_class = ""
            if self.wide:
                colour, shape, motion, size_class = self._wide_kind(rng, (colour, shape, motion))
            for _ in range(20):  # a few tries at a path that keeps clear of the objects already placed
                obj = self.make_object(rng, colour, shape, motion, frames, size_class)
                if all(_clear(obj, other, frames) for other in objects):
                    break
            else:  # no room: the clip keeps the objects it has
                break
            used.add(colour)
            objects.append(obj)
        background = self._background(rng)
        return Scene(objects, background, caption(objects, rng, background, wide=self.wide), frames)

    def _combo(self, rng: np.random.Generator) -> tuple[str, str, str]:
        """A (colour, shape, motion) combination of the split: uniform, or by ``shape_weights``."""
        if self.combo_p is None:
            return self.combos[rng.integers(len(self.combos))]
        return self.combos[rng.choice(len(self.combos), p=self.combo_p)]

    def _background(self, rng: np.random.Generator) -> dict:
        if self.wide and rng.random() < self.mix["background"]:
            return self.make_coloured_background(rng)
        return self.make_background(rng)

    def render(self, scene: Scene) -> np.ndarray:
        """``scene`` as uint8 (f, h, w, 3) at this world's size."""
        return render(scene, scene.frames, self.height, self.width)

    def clip(self, index: int) -> tuple[torch.Tensor, str]:
        """Clip ``index``: (video (3, f, h, w) float32 in [-1, 1], caption)."""
        scene = self.scene(index)
        return self._crop(to_tensor(self.render(scene)), index), scene.caption

    def silhouette(self, index: int) -> torch.Tensor:
        """The objects of clip ``index`` in white on black, (3, f, h, w) float32 in [-1, 1]: exactly where
        ``clip(index)`` draws them (same crop), anti-aliased alike (``render_silhouette``)."""
        scene = self.scene(index)
        return self._crop(to_tensor(render_silhouette(scene, scene.frames, self.height, self.width)), index)

    def _crop(self, video: torch.Tensor, index: int) -> torch.Tensor:
        """Clip ``index``'s ``crop`` window of a rendering (c, f, h, w); all of it without ``crop``."""
        if not self.crop:
            return video
        rng = np.random.default_rng([self.seed, index, 0xC409])
        y = int(rng.integers(0, (self.height - self.crop) // 8 + 1)) * 8
        x = int(rng.integers(0, (self.width - self.crop) // 8 + 1)) * 8
        return video[..., y : y + self.crop, x : x + self.crop]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return self.clip(index)

    def __iter__(self):
        return (self.clip(i) for i in itertools.count())


def _wide_mix(mix: dict | None) -> dict:
    """``ShapesWorld.WIDE_MIX`` with ``mix``'s entries over it, checked."""
    base = ShapesWorld.WIDE_MIX
    mix = dict(mix or {})
    unknown = sorted(set(mix) - set(base))
    if unknown:
        raise ValueError(f"unknown wide_mix keys {unknown}; accepted: {sorted(base)}")
    for key in ("group", "still", "background"):
        value = mix.get(key, base[key])
        if not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"wide_mix {key} must be a share in [0, 1]; got {value!r}")
    sizes = {**base["sizes"], **mix.get("sizes", {})}
    if set(sizes) != set(base["sizes"]) or any(w < 0 for w in sizes.values()) or not sum(sizes.values()) > 0:
        raise ValueError(
            f"wide_mix sizes must give weights >= 0 (not all 0) to {sorted(base['sizes'])}; got {mix['sizes']!r}"
        )
    return {**base, **mix, "sizes": sizes}


def _combo_weights(combos, shape_weights: dict | None) -> np.ndarray | None:
    """Sampling probabilities of ``combos`` that draw each shape by ``shape_weights`` (others 1); None: uniform."""
    if not shape_weights:
        return None
    unknown = sorted(set(shape_weights) - set(SHAPES))
    bad = {k: v for k, v in shape_weights.items() if not isinstance(v, (int, float)) or v < 0}
    if unknown or bad:
        raise ValueError(f"shape_weights takes weights >= 0 for {list(SHAPES)}; got {shape_weights!r}")
    weights = np.array([float(shape_weights.get(shape, 1.0)) for _, shape, _ in combos])
    if not weights.sum() > 0:
        raise ValueError(f"shape_weights leave no shape to draw: {shape_weights!r}")
    return weights / weights.sum()


def _clear(a: ShapeObject, b: ShapeObject, frames: int, margin: float = 1.05) -> bool:
    """Whether two objects never overlap (bounding circles grown by ``margin``) over ``frames`` frames."""
    (ax, ay), (bx, by) = a.path(frames), b.path(frames)
    return bool((np.hypot(ax - bx, ay - by) > margin * (a.size + b.size)).all())


def to_tensor(video: np.ndarray) -> torch.Tensor:
    """uint8 (f, h, w, 3) -> float32 (3, f, h, w) in [-1, 1]."""
    return torch.from_numpy(video).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def eval_prompts(split: str = "heldout", per_combo: int | None = None, count: int = 216, seed: int = 0):
    """Evaluation prompts: list of (prompt, (colour, shape, motion)), single objects.

    ``split`` "heldout" draws from ``HELDOUT`` (combinations no training clip shows), "train" from
    ``TRAIN_COMBOS``. Each combination gets ``per_combo`` paraphrases (default: enough for ``count``).
    """
    combos = HELDOUT if split == "heldout" else TRAIN_COMBOS
    rng = np.random.default_rng([seed, 0xE7A1])
    if split != "heldout":
        combos = [combos[i] for i in rng.permutation(len(combos))]
    per = per_combo or math.ceil(count / len(combos))
    out = []
    for _ in range(per):
        for colour, shape, motion in combos:
            obj = ShapeObject(colour, shape, motion, 1.0, 0.0, 0.0, 0.0)
            out.append((caption([obj], rng), (colour, shape, motion)))
            if per_combo is None and len(out) == count:
                return out
    return out


# ------------------------------------------------------------------------------------------------ oracle


def _hsv(video: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rgb = video.astype(np.float64) / 255.0
    mx, mn = rgb.max(-1), rgb.min(-1)
    delta = mx - mn
    sat = np.where(mx > 1e-6, delta / np.maximum(mx, 1e-6), 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    d = np.maximum(delta, 1e-6)
    hue = np.where(mx == r, ((g - b) / d) % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4)) * 60.0
    return hue, sat, mx


def _hsv_to_rgb(hue: float, sat: float, value: float) -> tuple[float, float, float]:
    """One colour from hue (degrees), saturation and value in [0, 1] to RGB in [0, 1]."""
    c = value * sat
    x = c * (1 - abs((hue / 60.0) % 2 - 1))
    r, g, b = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(hue // 60) % 6]
    m = value - c
    return r + m, g + m, b + m


def _palette_hues() -> dict[str, float]:
    out = {}
    for name, rgb in COLOURS.items():
        hue, _, _ = _hsv(np.asarray(rgb, dtype=np.uint8)[None])
        out[name] = float(hue[0])
    return out


PALETTE_HUES = _palette_hues()


def _hue_distance(a: np.ndarray, b: float) -> np.ndarray:
    d = np.abs(a - b) % 360
    return np.minimum(d, 360 - d)


def _classify_shape(fill: float) -> str:
    # fill = area / bounding-box area: square ~1.0, circle ~pi/4 = 0.785, triangle ~0.5
    if fill > 0.885:
        return "square"
    if fill > 0.64:
        return "circle"
    return "triangle"


def _classify_motion(xs: np.ndarray, ys: np.ndarray, scale: float) -> str:
    f = len(xs)
    if f < 2:
        return "still"
    dx, dy = xs[-1] - xs[0], ys[-1] - ys[0]
    mid = ys[f // 2 - 1 : f // 2 + 2].mean() if f >= 3 else ys.mean()
    rise = min(ys[0], ys[-1]) - mid  # > 0 when the middle of the clip is higher (smaller y) than both ends
    net = math.hypot(dx, dy)
    if rise > 0.12 * scale and rise > 0.8 * net:
        return "bouncing"
    if net < 0.08 * scale:
        return "still"
    angle = math.degrees(math.atan2(-dy, dx)) % 360  # counter-clockwise from "right", y up
    sector = int(((angle + 22.5) % 360) // 45)
    return ("right", "up-right", "up", "up-left", "left", "down-left", "down", "down-right")[sector]


def colour_masks(video, sat_threshold: float = 0.4, value_threshold: float = 0.3) -> dict[str, np.ndarray]:
    """The oracle's colour segmentation: {palette colour: bool (f, h, w)}, every pixel saturated above
    ``sat_threshold`` and brighter than ``value_threshold`` given to the colour of nearest hue (the rest is
    background). ``video`` as for ``oracle``."""
    hue, sat, val = _hsv(_as_uint8(video))
    coloured = (sat > sat_threshold) & (val > value_threshold)
    names = list(PALETTE_HUES)
    dist = np.stack([_hue_distance(hue, PALETTE_HUES[n]) for n in names])
    label = np.where(coloured, dist.argmin(0), -1)
    return {name: label == k for k, name in enumerate(names)}


def object_mask(video, colour: str | None = None, **thresholds) -> np.ndarray:
    """The pixels the oracle reads as the object of ``colour`` in each frame: bool (f, h, w), the largest
    connected region of that colour (empty in frames without it). ``colour`` None: the colour of the largest
    object ``oracle`` finds (all empty when it finds none). ``thresholds``: ``oracle``'s ``sat_threshold``
    and ``value_threshold``; ``video`` as for ``oracle``."""
    masks = colour_masks(video, **thresholds)
    if colour is None:
        found = oracle(video, **thresholds)
        if not found:
            return np.zeros_like(next(iter(masks.values())))
        colour = found[0]["colour"]
    if colour not in masks:
        raise ValueError(f"unknown colour {colour!r}; accepted: {', '.join(masks)}")
    return np.stack([_largest_component(m) for m in masks[colour]])


def oracle(
    video, min_area: float = 0.004, sat_threshold: float = 0.4, value_threshold: float = 0.3
) -> list[dict]:
    """Read a clip and report its objects: ``[{"colour", "shape", "motion", "area", "frames", "count",
    "size"}, ...]``, one entry per colour.

    ``video``: uint8 (f, h, w, 3), or float (3, f, h, w) / (f, h, w, 3) in [-1, 1]. Pixels saturated above
    ``sat_threshold`` (backgrounds of the world are below ~0.35) are given the palette colour of nearest hue;
    each colour present in at least half the frames with at least ``min_area`` of the frame is read. Its
    ``count`` is how many separate regions of at least ``min_area`` it has (median over frames; "two red
    circles" are one entry of count 2). Shape comes from how much of its bounding box its largest region fills
    (median over frames), ``size`` ("small" / "medium" / "big", ``SIZES``) from that region's area and shape,
    motion from the path of its centre (of all its regions' together when it counts more than one). Entries
    are sorted by area, largest first.
    """
    masks = colour_masks(video, sat_threshold, value_threshold)
    f, h, w = next(iter(masks.values())).shape
    found = []
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float64)
    for name, mask in masks.items():
        areas = mask.reshape(f, -1).sum(1)
        present = areas >= min_area * h * w
        if present.sum() < max(1, f / 2):
            continue
        split = [
            _components(mask[i], min_area * h * w) for i in np.flatnonzero(present)
        ]  # one labelling a frame
        count = max(1, int(np.round(np.median([len(parts) for _, parts in split]))))
        fills, sizes, xs, ys = [], [], [], []
        for m, parts in split:
            rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
            fills.append(m.sum() / box)
            sizes.append(m.sum())
            if count > 1 and parts:  # a group: the centre of its regions together
                m = np.logical_or.reduce(parts)
            xs.append((gx * m).sum() / m.sum())
            ys.append((gy * m).sum() / m.sum())
        motion = (
            _classify_motion(np.asarray(xs), np.asarray(ys), float(min(h, w))) if present.all() else "still"
        )
        shape = _classify_shape(float(np.median(fills)))
        found.append(
            {
                "colour": name,
                "shape": shape,
                "motion": motion,
                "area": float(areas[present].mean() / (h * w)),
                "frames": int(present.sum()),
                "count": count,
                "size": _classify_size(float(np.median(sizes)), shape, float(min(h, w))),
            }
        )
    return sorted(found, key=lambda o: -o["area"])


SHAPE_AREA = {"circle": math.pi, "square": 1.8**2, "triangle": 0.5 * 2.0 * 1.8}  # area / radius**2


def _classify_size(area: float, shape: str, side: float) -> str:
    """ "small" / "medium" / "big" from an object's area in pixels (its radius, given its shape, against the
    midpoints between ``SIZES``' ranges as fractions of the frame's shorter side)."""
    radius = math.sqrt(area / SHAPE_AREA[shape]) / side
    if radius < (SIZES["small"][1] + SIZES["medium"][0]) / 2:
        return "small"
    if radius > (SIZES["medium"][1] + SIZES["big"][0]) / 2:
        return "big"
    return "medium"


def _components(mask: np.ndarray, min_pixels: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """From one labelling of ``mask``: its largest connected region (as ``_largest_component``) and its regions
    of at least ``min_pixels`` pixels (bool maps)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0:
        return mask, []
    sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
    largest = mask if n == 1 else labels == (1 + int(np.argmax(sizes)))
    return largest, [labels == k + 1 for k in range(n) if sizes[k] >= min_pixels]


def read_background(video, sat_threshold: float = 0.4, value_threshold: float = 0.3) -> str:
    """The background's colour as a caption names it: a palette colour for a coloured background (median of
    the pixels no object covers saturated above 0.17 and brighter than 0.35), else its tone ("dark", "gray",
    "light"). ``video`` as for ``oracle``; the thresholds are ``oracle``'s."""
    frames = _as_uint8(video)
    hue, sat, val = _hsv(frames)
    rest = ~((sat > sat_threshold) & (val > value_threshold))
    rgb = np.median(frames[rest].astype(np.float64), axis=0) if rest.any() else np.zeros(3)
    bhue, bsat, bval = (float(a[0]) for a in _hsv(np.round(rgb).astype(np.uint8)[None]))
    if bsat > 0.17 and bval > 0.35:
        return min(PALETTE_HUES, key=lambda n: float(_hue_distance(np.asarray(bhue), PALETTE_HUES[n])))
    return _tone(float(rgb.mean()))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
    return labels == (1 + int(np.argmax(sizes)))


def _as_uint8(video) -> np.ndarray:
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu()
        if video.dtype != torch.uint8:
            if video.ndim == 4 and video.shape[0] == 3:
                video = video.permute(1, 2, 3, 0)
            video = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return video.numpy()
    video = np.asarray(video)
    if video.dtype != np.uint8:
        if video.ndim == 4 and video.shape[0] == 3:
            video = video.transpose(1, 2, 3, 0)
        video = np.round((np.clip(video, -1, 1) + 1) * 127.5).astype(np.uint8)
    return video
