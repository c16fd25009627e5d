"""The morph measurement (vidlatent.eval.morph) on constructed videos: a morph whose middle frames are blank is
flagged, one whose object passes through an in-between hue is not, and the pairs of stills differ as promised."""

import pytest
import torch

from vidlatent.data.shapes import COLOURS, oracle
from vidlatent.eval.morph import MIN_AREA, morph_pairs, morph_report, object_frames


def scene(frames: int = 9, size: int = 64, colours=None, side: int = 10) -> torch.Tensor:
    """A grey video (3, t, h, w) in [-1, 1] with a square of ``colours[i]`` (an RGB triple, or None: no square)
    in frame i, moving right one pixel a frame."""
    video = torch.full((3, frames, size, size), -0.1)
    for i, rgb in enumerate(colours or [COLOURS["red"]] * frames):
        if rgb is not None:
            video[:, i, 20 : 20 + side, 10 + i : 10 + i + side] = torch.tensor(rgb).view(3, 1, 1) / 127.5 - 1
    return video


def test_blank_middle_frames_are_flagged():
    red, blue = COLOURS["red"], COLOURS["blue"]
    kept = scene(colours=[red] * 4 + [blue] * 5)
    lost = scene(colours=[red, red, None, None, None, None, blue, blue, blue])  # frames 2-5 blank
    assert object_frames(kept) == ["red"] * 4 + ["blue"] * 5
    assert object_frames(lost)[2:6] == [None] * 4
    report = morph_report([kept, lost], [("red", "blue"), ("red", "blue")])
    assert report["middle_frames"] == 14
    assert report["kept"] == pytest.approx(10 / 14) and report["all_kept"] == 0.5
    assert report["blank"] == [[], [2, 3, 4, 5]]
    assert report["ends_colour"] == pytest.approx(10 / 14)
    only_lost = morph_report([lost])
    assert only_lost["all_kept"] == 0 and "ends_colour" not in only_lost


def test_a_blank_end_frame_is_not_counted():
    """Only the middle frames count: the ends are the stills (or their reconstructions)."""
    red = COLOURS["red"]
    video = scene(colours=[None] + [red] * 7 + [None])
    assert morph_report([video])["kept"] == 1.0


def test_an_object_too_small_or_faded_is_no_object():
    red = COLOURS["red"]
    tiny = scene(colours=[red] * 9, side=3)  # 9 pixels < min_area of 64 x 64 (16.4)
    assert object_frames(tiny) == [None] * 9
    faded = scene(colours=[tuple(0.3 * c + 0.7 * 115 for c in red)] * 9)  # most of the way to the grey
    assert oracle(faded[:, :1]) == [] and object_frames(faded) == [None] * 9
    assert object_frames(scene(colours=[red] * 9, side=5)) == ["red"] * 9  # 25 pixels
    assert 16 < MIN_AREA * 64 * 64 < 25


def test_an_object_split_between_two_hues_still_counts():
    """A morph from purple to red passes through magenta, which the oracle's segmentation splits between the
    two palette colours: one object, though neither colour alone reaches min_area."""
    video = torch.full((3, 3, 64, 64), -0.1)
    purple, red = (torch.tensor(COLOURS[c]).view(3, 1, 1, 1) / 127.5 - 1 for c in ("purple", "red"))
    video[:, :, 20:24, 10:14] = purple  # 16 pixels each, side by side: one region of 32
    video[:, :, 20:24, 14:18] = red
    assert all(o["area"] * 64 * 64 < MIN_AREA * 64 * 64 for o in oracle(video))
    assert object_frames(video) == ["purple"] * 3 or object_frames(video) == ["red"] * 3


def test_morph_pairs_differ_in_colour_and_shape():
    pairs = morph_pairs(6, seed=3)
    again = morph_pairs(6, seed=3)
    assert len(pairs) == 6
    for p, q in zip(pairs, again):
        assert torch.equal(p["a"], q["a"]) and torch.equal(p["b"], q["b"])
        assert p["a"].shape == p["b"].shape == (3, 1, 64, 64)
        colour_a, shape_a = p["prompt_a"].split()[1:]
        colour_b, shape_b = p["prompt_b"].split()[1:]
        assert p["colours"] == (colour_a, colour_b) and colour_a != colour_b and shape_a != shape_b
        # the oracle reads each still's own colour
        assert oracle(p["a"])[0]["colour"] == colour_a and oracle(p["b"])[0]["colour"] == colour_b
    assert len({tuple(p["colours"]) for p in pairs}) > 1  # not one pair repeated


def test_bad_inputs_say_what_is_accepted():
    with pytest.raises(ValueError, match="at least one video"):
        morph_report([])
    with pytest.raises(
        ValueError, match=r"a morph is a video \(3, t, h, w\) with t >= 3; got \(3, 2, 8, 8\)"
    ):
        morph_report([torch.zeros(3, 2, 8, 8)])
    with pytest.raises(ValueError, match="2 videos and 1 colour pairs"):
        morph_report([scene(), scene()], [("red", "blue")])
    with pytest.raises(ValueError, match=r"object_frames needs a video \(3, t, h, w\)"):
        object_frames(torch.zeros(1, 3, 4, 8, 8))
