"""Control videos (data/controls.py), the world's silhouettes and masks (data/shapes.py), and the control
score (eval/control.py) on ground truth."""

import numpy as np
import pytest
import torch

from vidlatent.data.controls import (
    CONTROL_TRANSFORMS,
    control_path,
    control_paths,
    control_transform,
    edges,
    make_control,
    silhouette,
    silhouette_path,
    world_control,
)
from vidlatent.data.shapes import (
    HELDOUT,
    ShapesWorld,
    colour_masks,
    object_mask,
    oracle,
    render,
    render_masks,
    render_silhouette,
    to_tensor,
)
from vidlatent.eval.control import (
    control_mask,
    evaluate_control,
    heldout_controls,
    mask_iou,
    score_control,
    tally_control,
)


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-frame IoU of the white pixels of two controls."""
    return float(mask_iou(control_mask(a), control_mask(b)).mean())


def test_world_silhouette_is_the_render_of_its_objects():
    world = ShapesWorld(seed=0)
    for i in range(3):
        scene = world.scene(i)
        sil = render_silhouette(scene, 17, 64, 64)
        masks = render_masks(scene, 17, 64, 64)
        assert sil.dtype == np.uint8 and sil.shape == (17, 64, 64, 3)
        assert masks.shape == (len(scene.objects), 17, 64, 64) and 0 <= masks.min() and masks.max() <= 1
        assert np.array_equal(np.round(masks.sum(0) * 255), sil[..., 0])  # white over black, as render paints
        # where the silhouette is solid, the clip shows the object's own colour
        solid = sil[..., 0] == 255
        clip = render(scene, 17, 64, 64)
        colours = {tuple(o.rgb) for o in scene.objects}
        assert {tuple(px) for px in clip[solid][::50]} <= colours
    # cropped worlds crop the silhouette with the clip
    cropped = ShapesWorld(seed=3, crop=32)
    clip, _ = cropped.clip(5)
    sil = cropped.silhouette(5)
    assert sil.shape == clip.shape == (3, 17, 32, 32)
    assert iou(sil, silhouette(clip)) > 0.85 or not (sil > 0).any()


def test_transforms_by_name_and_their_shapes():
    world = ShapesWorld(seed=1)
    clip, _ = world.clip(0)
    assert set(CONTROL_TRANSFORMS) >= {"silhouette", "edges"}
    for name in CONTROL_TRANSFORMS:
        control = make_control(clip, name)
        assert control.shape == clip.shape and control.dtype == clip.dtype
        assert set(control.unique().tolist()) <= {-1.0, 1.0}
        batch = make_control(torch.stack([clip, world.clip(1)[0]]), name)
        assert torch.equal(batch[0], control)
    assert make_control(clip, edges) is not None  # a function works as well as a name
    with pytest.raises(ValueError, match="unknown control transform 'depth'; accepted: silhouette, edges"):
        control_transform("depth")
    with pytest.raises(ValueError, match="unknown control transform"):
        make_control(clip, "depth")
    with pytest.raises(ValueError, match=r"\(3, t, h, w\) or \(b, 3, t, h, w\)"):
        make_control(clip[:1], "edges")
    with pytest.raises(ValueError, match="must have its clip's shape"):
        make_control(clip, lambda c: c[:, :1])


def test_silhouette_from_pixels_matches_the_exact_one():
    world = ShapesWorld(seed=2)
    for i in range(4):
        clip, caption, exact = world_control(world, i, "silhouette")
        assert caption == world.scene(i).caption and torch.equal(clip, world.clip(i)[0])
        assert torch.equal(exact, world.silhouette(i))
        assert iou(silhouette(clip), exact) > 0.85


def test_edges_outline_objects_and_ignore_the_background():
    world = ShapesWorld(seed=4)
    for i in range(4):
        clip, _, control = world_control(world, i, "edges")
        assert torch.equal(control, edges(clip))
        outline = control_mask(control)
        scene = world.scene(i)
        cov = render_masks(scene, 17, 64, 64).sum(0)
        boundary = (cov > 0.02) & (cov < 0.98)  # the anti-aliased rim of every object
        assert outline[boundary].mean() > 0.9  # the rims are edges
        # far from every object (the soft stripes, checks, gradients) nothing is
        from scipy import ndimage

        far = ~ndimage.binary_dilation(cov > 0.02, iterations=3)
        assert outline[far].mean() < 0.01
    flat = torch.zeros(3, 5, 32, 32)
    assert (edges(flat) == -1).all()


def test_silhouette_path_draws_the_asked_shape_along_the_line():
    video = silhouette_path("square", (0.25, 0.5), (0.75, 0.5), size=0.15, frames=9, height=64, width=96)
    assert video.shape == (3, 9, 64, 96) and video.dtype == torch.float32
    mask = control_mask(video)
    gy, gx = np.mgrid[0:64, 0:96] + 0.5
    xs = [(gx * m).sum() / m.sum() for m in mask]
    ys = [(gy * m).sum() / m.sum() for m in mask]
    assert np.allclose(xs, np.linspace(24, 72, 9), atol=0.6) and np.allclose(ys, 32, atol=0.6)
    # it looks like the world's own objects: the oracle reads the shape from a coloured copy
    coloured = torch.where(video > 0, torch.tensor([0.8, -0.7, -0.7])[:, None, None, None], torch.tensor(0.0))
    assert oracle(coloured)[0]["shape"] == "square" and oracle(coloured)[0]["motion"] == "right"
    circle = silhouette_path("circle", (0.5, 0.5), (0.5, 0.5), size=0.25, frames=1)
    area = control_mask(circle).sum()
    assert abs(area - np.pi * 16**2) < 0.03 * np.pi * 16**2
    with pytest.raises(ValueError, match="unknown shape 'star'; accepted: circle, square, triangle"):
        silhouette_path("star", (0, 0), (1, 1))
    with pytest.raises(ValueError, match="fractions of the frame"):
        silhouette_path("circle", (10, 32), (50, 32))
    with pytest.raises(ValueError, match="size is a radius"):
        silhouette_path("circle", (0.1, 0.1), (0.9, 0.9), size=8)


def test_control_paths_beside_the_clips(tmp_path):
    data = tmp_path / "data"
    (data / "controls").mkdir(parents=True)
    (data / "sub" / "controls").mkdir(parents=True)
    for name in ("a.mp4", "b.mov", "sub/c.mp4", "d.mp4", "e.mp4"):
        (data / name).write_bytes(b"")
    (data / "controls" / "a.mp4").write_bytes(b"")
    (data / "controls" / "b.png").write_bytes(b"")  # any readable suffix
    (data / "controls" / "d").mkdir()  # a folder of frames
    (data / "sub" / "controls" / "c.webm").write_bytes(b"")
    (data / "controls" / "e.mp4").write_bytes(b"")
    (data / "controls" / "e.txt").write_bytes(b"")  # not a video: ignored
    found = control_paths([data / n for n in ("a.mp4", "b.mov", "sub/c.mp4", "d.mp4", "e.mp4")])
    assert found[data / "a.mp4"] == data / "controls" / "a.mp4"
    assert found[data / "b.mov"] == data / "controls" / "b.png"
    assert found[data / "sub/c.mp4"] == data / "sub" / "controls" / "c.webm"
    assert found[data / "d.mp4"] == data / "controls" / "d"
    assert found[data / "e.mp4"] == data / "controls" / "e.mp4"
    # a configurable folder, mirrored under a root
    (data / "ctl" / "sub").mkdir(parents=True)
    (data / "ctl" / "sub" / "c.mp4").write_bytes(b"")
    assert control_path(data / "sub" / "c.mp4", "ctl", root=data) == data / "ctl" / "sub" / "c.mp4"
    assert control_path(data / "sub" / "c.mp4", data / "ctl" / "sub") == data / "ctl" / "sub" / "c.mp4"
    # every clip without a control is named
    for name in ("x.mp4", "y.mp4"):
        (data / name).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"2 of 3 clips have no control.*x\.mp4.*y\.mp4"):
        control_paths([data / "a.mp4", data / "x.mp4", data / "y.mp4"])
    (data / "controls" / "a.webm").write_bytes(b"")
    with pytest.raises(ValueError, match="several control videos"):
        control_path(data / "a.mp4")


def test_object_mask_is_the_oracles_reading():
    world = ShapesWorld(split="heldout", seed=5)
    clip, _ = world.clip(0)
    colour = world.scene(0).objects[0].colour
    masks = colour_masks(clip)
    assert set(masks) == {"red", "orange", "yellow", "green", "blue", "purple"}
    found = object_mask(clip)
    assert found.shape == (17, 64, 64) and found.dtype == bool
    assert np.array_equal(found, object_mask(clip, colour)) and (found <= masks[colour]).all()
    assert not object_mask(torch.zeros(3, 4, 32, 32)).any()  # grey: no object
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        object_mask(clip, "pink")


def test_heldout_controls_score_ground_truth_and_fail_a_shifted_control():
    assert len(heldout_controls()) >= 200
    cases = heldout_controls(count=4)
    assert len(cases) == 4 and cases[-1].caption == cases[3].caption
    case = cases[0]
    assert case.control.shape == case.video.shape == (3, 17, 64, 64)
    assert (case.colour, case.shape, case.motion) in HELDOUT
    captions, controls, videos, colours = cases.stack(0, 4)
    assert torch.equal(controls[0], case.control) and colours[0] == case.colour

    def truth(captions, controls, seed):  # each clip itself: what a perfect control would generate
        return videos[seed : seed + len(captions)]

    def shifted(captions, controls, seed):  # the right object, a third of the frame off to the side
        return torch.roll(truth(captions, controls, seed), 24, dims=-1)

    right = evaluate_control(truth, cases, batch=3)
    assert right["clips"] == 4 and right["colour"] == 1.0 and right["nothing"] == 0.0
    assert right["iou"] >= 0.95 and len(right["ious"]) == 4
    off = evaluate_control(shifted, cases, batch=3)
    assert off["iou"] < 0.2 and off["colour"] == 1.0
    grey = score_control(torch.zeros(3, 17, 64, 64), case.control, case.colour)
    assert grey == {"iou": 0.0, "colour": False, "found": None}
    assert tally_control([grey, {"iou": 1.0, "colour": True, "found": "red"}])["iou"] == 0.5
    with pytest.raises(ValueError, match="must have one shape"):
        score_control(case.video[:, :5], case.control, case.colour)


def test_existing_world_outputs_are_unchanged():
    # render and the clip tensors must not move a bit: the default model was trained on them
    world = ShapesWorld(seed=0)
    clip, _ = world.clip(3)
    assert torch.equal(clip, to_tensor(render(world.scene(3), 17, 64, 64)))
