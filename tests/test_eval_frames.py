"""First-frame quality and ghosts (vidlatent.eval.frames), and the rates by asked colour, shape and pair
(vidlatent.eval.shapes.breakdown): true clips of the world read clean, clips spoilt on purpose are flagged, and
a stand-in pipeline that draws what it is asked (blue squares as circles) is broken down as drawn."""

import dataclasses

import numpy as np
import torch

from vidlatent.data.shapes import (
    COLOURS,
    HELDOUT,
    SHAPES,
    Scene,
    ShapesWorld,
    coverage,
    object_mask,
    parse_prompt,
    to_tensor,
)
from vidlatent.eval import frame_quality, frame_shares, pool, score_split, shape_fit, summary
from vidlatent.eval.card import breakdown_table, frames_by_colour_table, frames_card_line
from vidlatent.eval.shapes import ANIMATE_SEED, split_items


def world_clip(split: str, index: int, seed: int = ANIMATE_SEED) -> tuple[np.ndarray, Scene, ShapesWorld]:
    """A one-object clip of the world, uint8 (f, h, w, 3), with its scene and world."""
    world = ShapesWorld(64, 64, 17, split=split, seed=seed, max_objects=1)
    scene = world.scene(index)
    return world.render(scene), scene, world


def with_object(scene: Scene, obj) -> Scene:
    return dataclasses.replace(scene, objects=[*scene.objects, obj])


def far_corner(scene: Scene, frames: int = 17) -> tuple[float, float]:
    """The corner of a 64x64 frame farthest from every position of the scene's object."""
    xs, ys = scene.objects[0].path(frames)
    corners = [(8.0, 8.0), (56.0, 8.0), (8.0, 56.0), (56.0, 56.0)]
    return max(corners, key=lambda c: np.hypot(xs - c[0], ys - c[1]).min())


def blob(scene: Scene, colour: str, frames: int = 17):
    """A still circle of radius 5 of ``colour`` in the corner farthest from the scene's object."""
    x, y = far_corner(scene, frames)
    obj = dataclasses.replace(scene.objects[0], colour=colour, shape="circle", motion="right", size=5.0)
    return dataclasses.replace(obj, x=x, y=y, speed=0.0, rgb=COLOURS[colour])


def test_shape_fit_reads_each_drawn_shape_and_not_a_bar():
    for shape in SHAPES:
        mask = coverage(shape, 9.3, [30.2], [33.7], 64, 64)[0] >= 0.5
        iou, fitted = shape_fit(mask)
        assert fitted == shape and iou > 0.95, (shape, iou, fitted)
    bar = np.zeros((64, 64), dtype=bool)
    bar[28:34, 10:50] = True  # a 40x6 bar: no circle, square or triangle of its area covers it
    assert shape_fit(bar)[0] < 0.75
    assert shape_fit(np.zeros((64, 64), dtype=bool)) == (0.0, None)


def test_true_world_clips_have_no_malformed_first_frame_and_no_ghost():
    rows = []
    for split, seed in (("heldout", ANIMATE_SEED), ("train", 3)):
        for i in range(12):
            video, scene, _ = world_clip(split, i, seed)
            rows.append(frame_quality(video, scene.objects[0].colour))
    shares = frame_shares(rows)
    assert shares["clips"] == 24 and shares["malformed"] <= 1 / 24 and shares["first_iou_median"] > 0.95, (
        shares
    )
    assert shares["ghost"] == 0 and shares["first_missing"] == 0, shares
    assert (
        frame_quality(to_tensor(world_clip("heldout", 0)[0]), world_clip("heldout", 0)[1].objects[0].colour)[
            "first_iou"
        ]
        == rows[0]["first_iou"]
    )  # the (3, f, h, w) tensor in [-1, 1] reads as the uint8 frames do


def test_a_blown_up_first_frame_is_oversize():
    video, scene, world = world_clip("heldout", 1)
    big = dataclasses.replace(scene.objects[0], size=scene.objects[0].size * 1.4)
    video[0] = world.render(dataclasses.replace(scene, objects=[big]))[0]
    row = frame_quality(video, scene.objects[0].colour)
    assert row["oversize"] and row["malformed"] and not row["misfit"] and row["growth"] > 1.8, row


def test_a_distorted_first_frame_misfits_its_shape():
    video, scene, world = world_clip("heldout", 2)
    obj = scene.objects[0]
    area = object_mask(video, obj.colour)[0].sum()
    video[0] = world.render(dataclasses.replace(scene, objects=[]))[0]  # the background alone
    rows, half = (
        slice(int(obj.y) - 3, int(obj.y) + 3),
        int(area / 6 / 2),
    )  # a 6-pixel-high bar of about its area
    video[0, rows, max(0, int(obj.x) - half) : int(obj.x) + half] = obj.rgb
    row = frame_quality(video, obj.colour)
    assert row["misfit"] and row["malformed"] and not row["oversize"] and not row["misfit_mid"], row


def test_a_second_blob_of_the_asked_colour_in_three_frames_is_a_ghost_and_in_two_is_not():
    video, scene, world = world_clip("heldout", 3)
    colour = scene.objects[0].colour
    ghosted = world.render(with_object(scene, blob(scene, colour)))
    for frames, ghost in ((slice(3, 6), True), (slice(3, 5), False)):
        spoilt = video.copy()
        spoilt[frames] = ghosted[frames]
        row = frame_quality(spoilt, colour)
        assert (
            row["ghost"] == row["ghost_same"] == ghost and not row["ghost_other"] and not row["malformed"]
        ), row


def test_an_object_of_a_colour_not_asked_in_half_the_frames_is_a_ghost():
    video, scene, world = world_clip("heldout", 4)
    colour = scene.objects[0].colour
    other = next(c for c in COLOURS if c != colour)
    ghosted = world.render(with_object(scene, blob(scene, other)))
    video[8:] = ghosted[8:]  # 9 of 17 frames
    row = frame_quality(video, colour)
    assert row["ghost_other"] and row["other_colours"] == [other] and not row["ghost_same"], row
    video, _, _ = world_clip("heldout", 4)
    video[9:] = ghosted[9:]  # 8 of 17: under half
    assert not frame_quality(video, colour)["ghost"]


class Drawn:
    """A pipeline drawing what each prompt asks as the world draws it (the asked colour exactly), but each
    (colour, shape) in ``swap`` as another shape."""

    def __init__(self, swap: dict):
        self.swap = swap

    def generate(self, prompts, seed=0, progress=True, frames=17):
        world = ShapesWorld(64, 64, frames, split="all", seed=seed)
        return torch.stack([self.draw(world, prompt, seed, i, frames) for i, prompt in enumerate(prompts)])

    def draw(self, world, prompt, seed, i, frames, scale=1.0):
        """Prompt ``i``'s clip as the world draws it, its object ``scale`` times the size."""
        colour, shape, motion = parse_prompt(prompt)
        rng = np.random.default_rng([seed, i])
        obj = world.make_object(rng, colour, self.swap.get((colour, shape), shape), motion, frames)
        obj.rgb, obj.size = COLOURS[colour], obj.size * scale
        return to_tensor(world.render(Scene([obj], world.make_background(rng), prompt, frames)))


def test_heldout_split_is_broken_down_by_asked_colour_shape_and_pair_and_pooled():
    pipe = Drawn({("blue", "square"): "circle"})
    runs = [score_split(pipe, "heldout", count=32, batch=16, seed=seed) for seed in (0, 16)]
    r = runs[0]
    assert sum(g["n"] for g in r["by_colour"].values()) == sum(g["n"] for g in r["by_shape"].values()) == 32
    assert r["by_pair"]["blue square"] == {"n": 3, "colour": 1.0, "shape": 0.0, "motion": 1.0, "all": 0.0}
    assert r["by_pair"]["red square"]["shape"] == 1.0 and r["by_shape"]["square"]["shape"] == 6 / 9
    assert r["by_colour"]["blue"]["shape"] < r["by_colour"]["red"]["shape"]
    assert r["frames"]["clips"] == 32 and r["frames"]["malformed"] <= 1 / 32 and r["frames"]["ghost"] == 0
    pooled = pool(runs, [0, 16])
    assert pooled["by_pair"]["blue square"]["n"] == 6 and pooled["frames"]["clips"] == 64
    shapes = [run["by_shape"]["square"]["shape"] for run in runs]
    assert np.isclose(pooled["by_shape"]["square"]["shape"], sum(shapes) / 2)

    lines = "\n".join(summary("heldout", pooled))
    assert "first frames of 64 clips" in lines and "blue square" not in lines and "square" in lines
    table = breakdown_table(pooled)
    blue = [shape for colour, shape, _ in HELDOUT if colour == "blue"]  # one prompt each, in both seeds
    row = f"| blue | {len(blue)} | 100.0% | {1 - blue.count('square') / len(blue):.1%} | 100.0% |"
    assert row in "\n".join(table), table
    assert any(line.startswith("| blue | ") and "0.0% (3)" in line for line in table)
    assert "64 clips: malformed first frame" in frames_card_line("heldout", pooled["frames"])


class FirstBlownUp(Drawn):
    """``Drawn``, with every third clip's first frame drawn with its object 1.4x the size."""

    def generate(self, prompts, seed=0, progress=True, frames=17):
        videos = super().generate(prompts, seed, progress, frames)
        world = ShapesWorld(64, 64, frames, split="all", seed=seed)
        for i in range(0, len(prompts), 3):
            videos[i, :, 0] = self.draw(world, prompts[i], seed, i, frames, scale=1.4)[:, 0]
        return videos


def test_each_seed_lists_the_items_whose_first_frame_was_malformed():
    pipe = FirstBlownUp({})
    runs = [score_split(pipe, "heldout", count=12, batch=6, seed=seed) for seed in (0, 6)]
    for r in runs:  # the blown-up clips are items 0, 3 (first batch) and 6, 9 (second batch)
        assert r["frame_items"]["malformed"] == [0, 3, 6, 9], r["frame_items"]
        assert r["frames"]["malformed"] == 4 / 12 and r["frame_items"]["ghost"] == []
    pooled = pool(runs, [0, 6])
    assert [items["malformed"] for items in pooled["frame_items_by_seed"]] == [[0, 3, 6, 9]] * 2
    assert "frame_items" not in pooled and "seed 6: colour 100.0%" in "\n".join(summary("heldout", pooled))


def test_first_frames_and_ghosts_are_counted_by_asked_colour():
    pipe = FirstBlownUp({})
    runs = [score_split(pipe, "heldout", count=12, batch=6, seed=seed) for seed in (0, 6)]
    colours = [asked[0] for _, asked in split_items("heldout", 12)]
    blown = [colours[i] for i in (0, 3, 6, 9)]
    for r in (*runs, pool(runs, [0, 6])):
        by = r["frames_by_colour"]
        assert (
            sorted(by) == sorted(set(colours))
            and sum(f["clips"] for f in by.values()) == r["frames"]["clips"]
        )
        for colour, f in by.items():
            assert f["malformed"] == blown.count(colour) / colours.count(colour) and f["ghost"] == 0
    card = frames_by_colour_table(pool(runs, [0, 6])["frames_by_colour"])
    row = next(line for line in card if line.startswith(f"| {colours[0]} |"))
    share = blown.count(colours[0]) / colours.count(colours[0])
    assert row == f"| {colours[0]} | {2 * colours.count(colours[0])} | {share:.1%} | 0.0% | 0.0% |"
    assert len(card) == 2 + len(set(colours))
    lines = "\n".join(summary("heldout", pool(runs, [0, 6])))
    first = colours[0]
    assert (
        f"{first} {blown.count(first) / colours.count(first):.1%} / 0.0% ({2 * colours.count(first)})"
        in lines
    )
