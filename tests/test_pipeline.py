"""VideoPipeline jobs on the tiny random pipeline: shapes, seeds, and the properties each job promises."""

import math

import pytest
import torch
from einops import rearrange

from vidlatent import VideoPipeline
from vidlatent.pipelines import (
    PipelineConfig,
    arc_length_weights,
    content_order,
    latent_mask,
    lerp,
    morph_weights,
    slerp,
    smoothness,
    staggered_slerp,
)
from vidlatent.pipelines.video import NOISE_MORPH_STAGGER, NOISE_MORPH_STRENGTH


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    return tiny_pipe


def pattern(frames=5, size=32, phase=0.0):
    """A smooth moving colour pattern (1, 3, t, h, w) in [-1, 1]."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    t = torch.linspace(0, 1, frames)[:, None, None]
    video = torch.stack(
        [torch.sin(3 * x + 2 * t + phase), torch.cos(2 * y - t), x * y * torch.cos(t + phase)]
    )
    return video[None].clamp(-1, 1)


def reconstruction(pipe, video):
    return pipe.decode(pipe.encode(video))


# ------------------------------------------------------------------------------------------------ generate


def test_generate_shapes_dtypes_and_range(pipe):
    video = pipe.generate("a red ball", seed=0)
    assert video.shape == (1, 3, 5, 32, 32) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1 and video.std() > 0.01
    image = pipe.generate("a red ball", frames=1, height=16, width=48, seed=0, steps=2)
    assert image.shape == (1, 3, 1, 16, 48)
    latents = pipe.generate(["a red ball", "a blue box"], seed=0, steps=2, output_type="latent")
    assert latents.shape == (2, 4, 2, 4, 4) and latents.dtype == torch.float32


def test_generate_is_reproducible_by_seed_and_follows_the_prompt(pipe):
    def run(seed, prompt="a red ball", **kw):
        return pipe.generate(prompt, seed=seed, steps=3, output_type="latent", **kw)

    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4), atol=1e-3)
    assert not torch.allclose(run(3), run(3, "a blue square"), atol=1e-3)
    # a batch of prompts draws one noise tensor: its first item is the single-prompt result
    torch.testing.assert_close(run(3, ["a red ball", "a blue square"])[:1], run(3), rtol=0, atol=1e-5)
    # guidance 1 skips the negative pass; a different guidance changes the result
    assert not torch.allclose(run(3, guidance=1.0), run(3), atol=1e-3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"frames": 6}, "frames must be 1 \\+ 4k"),
        ({"frames": 0}, "frames must be 1 \\+ 4k"),
        ({"height": 24}, "multiples of 16 and 16"),
        ({"width": 8}, "multiples of 16 and 16"),
        ({"sampler": "ddim"}, "unknown sampler 'ddim'; accepted: euler, unipc, dpm"),
        ({"steps": 0}, r"steps must be in \[1, 10000\]; got 0"),
        ({"output_type": "pil"}, "unknown output_type"),
    ],
)
def test_generate_rejects_bad_requests(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe.generate("a ball", seed=0, **kwargs)


# ------------------------------------------------------------------------------------------------ edit


def test_edit_strength_zero_is_the_reconstruction_and_small_strength_stays_close(pipe):
    video = pattern()
    z0 = pipe.encode(video)
    assert torch.equal(pipe.edit(video, "a ball", strength=0.0), pipe.decode(z0))

    def latent_error(strength):
        z = pipe.edit(
            video, "a ball", strength, seed=1, sampler="euler", steps=30, shift=3.0, output_type="latent"
        )
        return ((z - z0).norm() / z0.norm()).item()

    errors = [latent_error(s) for s in (0.01, 0.3, 1.0)]
    # strength 0.01 re-runs only the last Euler step, from sigma 0.0089: the input moves by ~sigma * |noise - v|
    # relative to latents of norm |z0| (~0.2 per element for this random VAE, hence ~0.15 and not ~0.01)
    assert errors[0] < 0.25
    assert errors == sorted(errors) and errors[0] < errors[-1] / 20
    edited = pipe.edit(video, "a ball", 0.01, seed=1, sampler="euler", steps=30, shift=3.0)
    assert (edited - pipe.decode(z0)).abs().mean() < 0.05


def test_edit_latents_is_edit_without_the_encoding(pipe):
    video = pattern()
    for strength in (0.0, 0.4, 1.0):
        want = pipe.edit(video, "a ball", strength, seed=3, output_type="latent")
        got = pipe.edit_latents(pipe.encode(video), "a ball", strength, seed=3)
        assert torch.equal(got, want), strength
    z = pipe.encode(video)
    assert not torch.equal(
        pipe.edit_latents(z, "a ball", 0.4, seed=3), pipe.edit_latents(z, "a ball", 0.4, seed=4)
    )
    assert pipe.edit_latents(z, "a ball", 0.0) is not z  # a new tensor, as edit's
    with pytest.raises(ValueError, match="strength must be in"):
        pipe.edit_latents(pipe.encode(video), "a ball", -0.1)


def test_edit_strength_one_ignores_the_input(pipe):
    a, b = pattern(), -pattern(phase=1.0)
    out_a = pipe.edit(a, "a ball", strength=1.0, seed=5, output_type="latent")
    out_b = pipe.edit(b, "a ball", strength=1.0, seed=5, output_type="latent")
    assert torch.equal(out_a, out_b)
    assert torch.equal(out_a, pipe.generate("a ball", seed=5, output_type="latent"))
    with pytest.raises(ValueError, match="strength must be in"):
        pipe.edit(a, "a ball", strength=1.5)


def test_flow_edit_keeps_the_input_when_both_prompts_agree_and_is_seeded(pipe):
    video = pattern()
    kept = pipe.edit(video, "a ball", 0.7, source_prompt="a ball", source_guidance=5.0, guidance=5.0, seed=1)
    assert torch.equal(kept, pipe.edit(video, "a ball", strength=0.0))  # the VAE reconstruction, exactly
    a, b = (pipe.edit(video, "a red ball", 0.7, source_prompt="a ball", seed=2, output_type="latent")
            for _ in range(2))  # fmt: skip
    assert torch.equal(a, b) and not torch.equal(a, pipe.encode(video))
    batch = torch.cat([pattern(), pattern(phase=2.0)])
    out = pipe.edit(batch, ["a", "b"], 0.5, source_prompt=["a", "d"], guidance=3.0, source_guidance=3.0, seed=0,
                    steps=3, output_type="latent")  # fmt: skip
    z = pipe.encode(batch)  # each clip is paired with its own prompts: only the second one moves
    torch.testing.assert_close(out[0], z[0], rtol=0, atol=1e-6)
    assert (out[1] - z[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="runs on the euler grid"):
        pipe.edit(video, "a ball", 0.5, source_prompt="a cube", sampler="unipc")
    with pytest.raises(ValueError, match="source_prompt: 2 prompts for a batch of 1"):
        pipe.edit(video, "a ball", 0.5, source_prompt=["a", "b"])
    with pytest.raises(ValueError, match="give source_prompt"):
        pipe.edit(video, "a ball", 0.5, source_guidance=2.0)


def test_edit_accepts_images_and_batches(pipe):
    image = pattern(frames=1)[0, :, 0]  # (3, h, w)
    assert pipe.edit(image, "a ball", 0.5, seed=0, steps=2).shape == (1, 3, 1, 32, 32)
    batch = torch.cat([pattern(), pattern(phase=2.0)])
    assert pipe.edit(batch, ["a", "b"], 0.5, seed=0, steps=2).shape == (2, 3, 5, 32, 32)
    with pytest.raises(ValueError, match="multiples of 16 and 16"):
        pipe.edit(pattern(size=40), "a ball", 0.5)
    with pytest.raises(ValueError, match="expected a video"):
        pipe.edit(torch.zeros(4, 5, 32, 32), "a ball", 0.5)
    with pytest.raises(ValueError, match="expected a float video"):
        pipe.edit(torch.zeros(3, 5, 32, 32, dtype=torch.uint8), "a ball", 0.5)


# ------------------------------------------------------------------------------------------------ inpaint


def test_latent_mask_follows_the_causal_frame_groups_and_max_pools_space():
    def marked(frame, y=0, x=0):
        mask = torch.zeros(1, 9, 32, 32, dtype=torch.bool)
        mask[0, frame, y, x] = True
        return latent_mask(mask, temporal_factor=4, spatial_factor=8)[0, 0].nonzero().tolist()

    # latent frame 0 <- pixel frame 0; 1 <- pixel frames 1-4; 2 <- pixel frames 5-8
    assert [marked(f)[0][0] for f in range(9)] == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert marked(4, y=9, x=31) == [[1, 1, 3]]  # one pixel marks exactly the latent that holds it
    one_frame = latent_mask(torch.ones(1, 1, 16, 16, dtype=torch.bool), 4, 8)
    assert one_frame.shape == (1, 1, 1, 2, 2) and one_frame.all()
    with pytest.raises(ValueError, match="does not map onto latents"):
        latent_mask(torch.ones(1, 6, 16, 16, dtype=torch.bool), 4, 8)


def test_inpaint_keeps_unmasked_latents_exactly_and_earlier_frames_bit_for_bit(pipe):
    video = pattern(frames=9)
    mask = torch.zeros(9, 32, 32)
    mask[5:, 8:24, 8:24] = 1  # the last four frames: latent frame 2 only
    z0 = pipe.encode(video)
    z = pipe.inpaint(video, mask, "a green square", seed=2, output_type="latent")
    regen = latent_mask(mask[None] > 0.5, 4, 8).expand_as(z)
    assert torch.equal(z[~regen], z0[~regen])
    assert (z[regen] - z0[regen]).abs().mean() > 0.1  # the masked latents were regenerated
    # the decoder is causal: frames before the first regenerated latent frame are the reconstruction exactly
    out, rec = pipe.decode(z), pipe.decode(z0)
    assert torch.equal(out[:, :, :5], rec[:, :, :5])
    assert (out[:, :, 5:] - rec[:, :, 5:]).abs().max() > 0.02  # (this random decoder responds weakly)


def test_inpaint_pixels_far_from_the_mask_match_the_reconstruction(pipe):
    image = pattern(frames=1, size=128)
    mask = torch.zeros(128, 128)
    mask[:16, :16] = 1
    out, rec = pipe.inpaint(image, mask, "a red ball", seed=0), reconstruction(pipe, image)
    err = (out - rec).abs().amax(dim=(0, 1, 2))
    y, x = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    distance = torch.maximum(y - 15, x - 15).clamp(min=0)  # pixels from the masked square
    assert err[distance == 0].max() > 0.2  # the masked region changed
    # beyond the decoder's convolutions' reach (~100 px) only its per-frame attention carries the change;
    # at >= 64 px the worst pixel moves by 0.04 and the mean by 0.003 (of a [-1, 1] range), measured
    assert err[distance >= 64].max() < 0.1 and err[distance >= 64].mean() < 0.01


def test_inpaint_masks_of_every_form_and_bad_masks(pipe, tmp_path):
    from vidlatent.data.io import write_video

    video = pattern()
    square = torch.zeros(32, 32)
    square[:16, :16] = 1
    ref = pipe.inpaint(video, square, "a ball", seed=0, steps=2, output_type="latent")
    per_frame = square.expand(5, 32, 32)
    same = [
        square.bool(),
        square[None, None].expand(3, 1, 32, 32),
        per_frame,
        per_frame[None].expand(3, 5, 32, 32),
    ]
    file = tmp_path / "mask.png"
    write_video(file, (square * 2 - 1).expand(3, 1, 32, 32))
    for mask in [*same, file]:
        torch.testing.assert_close(
            pipe.inpaint(video, mask, "a ball", seed=0, steps=2, output_type="latent"), ref
        )
    with pytest.raises(ValueError, match="mask is 48x48 but the input is 32x32 \\(width x height\\)"):
        pipe.inpaint(video, torch.zeros(48, 48), "a ball")
    with pytest.raises(ValueError, match="mask has 3 frames but the input has 5"):
        pipe.inpaint(video, torch.zeros(3, 32, 32), "a ball")


def test_a_video_mask_file_follows_the_inputs_frame_selection(pipe, tmp_path):
    """A per-frame mask file is read at the input's frames: start, stride, and padding by the frame policy."""
    from vidlatent.config.pipeline import FrameSelection
    from vidlatent.data.io import write_video

    source, mask_file = tmp_path / "in.mp4", tmp_path / "mask.mp4"
    frames = pattern(frames=9)[0]
    write_video(source, frames)
    late = torch.full((3, 9, 32, 32), -1.0)
    late[:, 4:] = 1.0  # black for frames 0-3, white from frame 4
    write_video(mask_file, late)
    kw = dict(seed=0, steps=2, output_type="latent")
    selection = FrameSelection(start=4, frames=5)
    whole = torch.ones(32, 32)  # frames 4-8 are all white in the mask: everything is regenerated
    torch.testing.assert_close(
        pipe.inpaint(str(source), str(mask_file), "a ball", selection=selection, **kw),
        pipe.inpaint(str(source), whole, "a ball", selection=selection, **kw),
    )
    # 6 frames padded to 9 (1 + 4k) for the input: the 6-frame mask is padded alike, not refused
    write_video(source, frames[:, :6])
    write_video(mask_file, late[:, :6])
    padded = FrameSelection(frame_policy="pad")
    per_frame = torch.cat([torch.zeros(4, 32, 32), torch.ones(5, 32, 32)])  # frames 6-8 repeat frame 5
    torch.testing.assert_close(
        pipe.inpaint(str(source), str(mask_file), "a ball", selection=padded, **kw),
        pipe.inpaint(str(source), per_frame, "a ball", selection=padded, **kw),
    )


def test_mask_files_in_colour_or_with_transparency_are_refused_and_an_empty_mask_warns(pipe, tmp_path):
    import numpy as np
    from PIL import Image

    video = pattern()
    red = np.zeros((32, 32, 3), np.uint8)
    red[:16, :16] = (255, 0, 0)
    Image.fromarray(red).save(tmp_path / "red.png")
    with pytest.raises(ValueError, match="must be one channel .*red.png has colour"):
        pipe.inpaint(video, str(tmp_path / "red.png"), "a ball", steps=1)
    drawn = np.zeros((32, 32, 4), np.uint8)  # an editor's mask: black, the shape only in the alpha
    drawn[:16, :16, 3] = 255
    Image.fromarray(drawn, "RGBA").save(tmp_path / "alpha.png")
    with pytest.raises(ValueError, match="alpha.png has transparent pixels"):
        pipe.inpaint(video, str(tmp_path / "alpha.png"), "a ball", steps=1)
    opaque = np.full((32, 32, 4), 255, np.uint8)  # RGBA but opaque: read from its grey level
    opaque[:16, :16, :3] = 0
    Image.fromarray(opaque, "RGBA").save(tmp_path / "opaque.png")
    pipe.inpaint(video, str(tmp_path / "opaque.png"), "a ball", steps=1)
    with pytest.warns(UserWarning, match="mask selects nothing"):
        pipe.inpaint(video, torch.zeros(32, 32), "a ball", steps=1)


def test_float_pixels_outside_minus_one_to_one_are_refused(pipe):
    video = (pattern() + 1) * 127.5  # 0-255 as floats
    for job in (lambda: pipe.edit(video, "a ball", strength=0.5, steps=1), lambda: pipe.encode(video)):
        with pytest.raises(ValueError, match="values span 0 to 255 .*x / 127.5 - 1"):
            job()
    with pytest.raises(ValueError, match="as a float tensor in \\[-1, 1\\]; got str"):
        pipe.encode("clip.mp4")
    pipe.edit(pattern().clamp(-1, 1) * 1.2, "a ball", strength=0.5, steps=1)  # a little overshoot is fine


# ------------------------------------------------------------------------------------------------ animate


def test_animate_first_frame_is_the_image_reconstruction(pipe):
    image = pattern(frames=1)
    z_image = pipe.encode(image)
    z = pipe.animate(image, "the ball rolls right", frames=9, seed=0, output_type="latent")
    assert z.shape == (1, 4, 3, 4, 4)
    assert torch.equal(z[:, :, :1], z_image)
    assert (z[:, :, 1:] - z_image).abs().mean() > 0.1  # later frames are generated, not copies
    video = pipe.decode(z)
    assert video.shape == (1, 3, 9, 32, 32)
    torch.testing.assert_close(video[:, :, :1], pipe.decode(z_image), rtol=0, atol=1e-6)
    # strength < 1 starts the other frames from the still image: closer to it than a free start
    calm = pipe.animate(image, "the ball rolls right", frames=9, strength=0.3, seed=0, output_type="latent")
    assert torch.equal(calm[:, :, :1], z_image)
    assert (calm[:, :, 1:] - z_image).abs().mean() < (z[:, :, 1:] - z_image).abs().mean()
    with pytest.raises(ValueError, match="animate takes an image"):
        pipe.animate(pattern(), "a ball", frames=9)
    with pytest.raises(ValueError, match="frames must be 1 \\+ 4k"):
        pipe.animate(image, "a ball", frames=8)


def test_animate_first_frame_clean_or_noised_as_the_denoiser_sees_it(pipe):
    """``first_frame="clean"`` gives the denoiser the image's latent itself at every step (as training with
    first_frame_dropout < 1 did); the default "noised" gives it noised to the step's sigma."""
    image = pattern(frames=1)
    z_image = pipe.encode(image)
    seen = []
    handle = pipe.dit.register_forward_pre_hook(lambda module, args: seen.append(args[0][:, :, :1].clone()))
    try:
        for mode in ("clean", "noised"):
            seen.clear()
            z = pipe.animate(
                image, "the ball", frames=9, first_frame=mode, steps=4, seed=0, output_type="latent"
            )
            assert torch.equal(z[:, :, :1], z_image) and len(seen) == 4
            given = [(x - z_image).abs().max().item() for x in seen]  # every row of each (guided) batch
            if mode == "clean":
                assert max(given) == 0, given
            else:
                assert min(given[:-1]) > 0.1, given  # noised at every step with sigma > 0
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="unknown first_frame 'sharp'; accepted: noised, clean"):
        pipe.animate(image, "a ball", frames=9, first_frame="sharp")


# ------------------------------------------------------------------------------------------------ morph


def test_slerp_keeps_norms_where_lerp_loses_them():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 2, 8, 8, generator=g), 1.5 * torch.randn(4, 2, 8, 8, generator=g)
    t = morph_weights(9)
    s, line = slerp(a, b, t), lerp(a, b, t)
    assert torch.equal(s[0], a) and torch.equal(s[-1], b)
    expected = torch.lerp(a.norm(), b.norm(), t.float())
    torch.testing.assert_close(s.flatten(1).norm(dim=1), expected, rtol=1e-5, atol=0)
    # two independent Gaussians are nearly orthogonal: the straight line's midpoint loses ~1 - 1/sqrt(2)
    assert line[4].norm() < 0.8 * expected[4]
    # constant angular speed: equal angles between consecutive frames
    unit = s.flatten(1) / s.flatten(1).norm(dim=1, keepdim=True)
    angles = torch.arccos((unit[1:] * unit[:-1]).sum(1).clamp(-1, 1))
    torch.testing.assert_close(angles, angles.mean().expand(8), rtol=1e-3, atol=0)


def test_staggered_slerp_moves_each_position_in_its_own_window():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 1, 2, 3, generator=g), 2 * torch.randn(4, 1, 2, 3, generator=g)
    order = torch.tensor([[[-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0]]])  # (t, h, w): column 0 first, column 2 last
    t = morph_weights(9)
    assert torch.equal(staggered_slerp(a, b, t, order, 0.0), slerp(a, b, t))  # 0: the plain slerp
    s = staggered_slerp(a, b, t, order, 0.5)
    assert torch.equal(s[0], a) and torch.equal(s[-1], b)
    # every frame keeps slerp's norm (linear from |a| to |b|)
    torch.testing.assert_close(
        s.flatten(1).norm(dim=1), torch.lerp(a.norm(), b.norm(), t.float()), rtol=1e-5, atol=0
    )
    # stagger 0.5: order -1 moves over t in [0, 0.5], order 1 over [0.5, 1]; half-way the first column is
    # all b's direction and the last all a's (b / |b| and a / |a| times the frame's one scale), the middle one
    # a blend
    mid = s[4]
    ratio_b, ratio_a = mid[..., 0] / b[..., 0], mid[..., 2] / a[..., 2]
    torch.testing.assert_close(ratio_b, ratio_b.flatten()[0].expand_as(ratio_b), rtol=1e-5, atol=0)
    torch.testing.assert_close(ratio_a * a.norm(), ratio_b * b.norm(), rtol=1e-5, atol=0)
    assert not torch.allclose(mid[..., 1] / a[..., 1], ratio_a, rtol=1e-2)
    assert not torch.allclose(mid[..., 1] / b[..., 1], ratio_b, rtol=1e-2)
    with pytest.raises(ValueError, match=r"stagger must be in \[0, 1\); got 1"):
        staggered_slerp(a, b, t, order, 1.0)


def test_content_order_puts_what_only_b_holds_first():
    background = torch.zeros(4, 1, 6, 6)
    a, b = background.clone(), background.clone()
    a[:, 0, 1, 1] = 3.0  # a's object at (1, 1), b's at (4, 4)
    b[:, 0, 4, 4] = -2.0
    order = content_order(a, b)
    assert order.shape == (1, 6, 6)
    assert order[0, 1, 1] == 1 and order[0, 4, 4] == -1  # a's own goes last, b's own first
    expected = torch.linspace(-1, 1, 36, dtype=torch.float64)
    torch.testing.assert_close(order.flatten().sort().values, expected, rtol=0, atol=1e-12)  # spread evenly
    with pytest.raises(ValueError, match="two latents"):
        content_order(a, b[:, :, :3])


def test_smoothness_sees_even_change_and_flags_a_cut():
    ramp = torch.linspace(-1, 1, 9).reshape(1, 1, 9, 1, 1).expand(1, 3, 9, 8, 8)
    even = smoothness(ramp)
    assert even["jump"] == pytest.approx(1.0) and even["mean"] == pytest.approx(0.25)
    cut = ramp.clone()
    cut[:, :, 5:] += 2  # even change, and one pop between frames 4 and 5
    assert smoothness(cut)["jump"] == pytest.approx(9.0)
    with pytest.raises(ValueError, match="t >= 2"):
        smoothness(ramp[:, :, :1])


def test_latent_morph_has_exact_endpoints_and_no_jumps(pipe):
    a, b = pattern(frames=1), pattern(frames=1, phase=2.5)
    video = pipe.morph(a, b, frames=9)
    assert video.shape == (1, 3, 9, 32, 32)
    torch.testing.assert_close(video[:, :, :1], reconstruction(pipe, a), rtol=0, atol=1e-6)
    torch.testing.assert_close(video[:, :, -1:], reconstruction(pipe, b), rtol=0, atol=1e-6)
    stats = smoothness(video)
    assert stats["median"] > 0
    # equal angular steps in latent space; k = 1.25 leaves room for the decoder's curvature over the path
    # (measured 1.02 here), while a single pop stands out at several times the median (see the cut test)
    assert stats["jump"] < 1.25
    eased = smoothness(pipe.morph(a, b, frames=9, easing="cosine"))
    assert eased["steps"][0] < stats["steps"][0] / 3  # lingers at A: the first step is small
    assert eased["jump"] < math.pi / 2 * 1.25  # the cosine ease's middle step is pi/2 times the mean one
    z = pipe.morph(a, b, frames=9, output_type="latent")
    assert z.shape == (9, 4, 1, 4, 4)
    with pytest.raises(ValueError, match="prompts apply to mode='noise' only"):
        pipe.morph(a, b, frames=9, prompt_a="a ball")


def test_noise_morph_endpoints_reconstruct_the_images(pipe):
    a, b = pattern(frames=1), pattern(frames=1, phase=2.5)
    za, zb = pipe.encode(a), pipe.encode(b)

    def endpoint_errors(steps, refine):
        z = pipe.morph(a, b, 2, "noise", "a red ball", "a blue box", steps=steps, refine=refine, strength=1,
                       output_type="latent")  # fmt: skip
        return [((z[i] - ref[0]).norm() / ref.norm()).item() for i, ref in ((0, za), (-1, zb))]

    plain, refined = endpoint_errors(20, 0), endpoint_errors(20, 2)
    # DDIM-style inversion is first order (measured ~0.2 relative at 20 steps); two fixed-point iterations
    # per step make the Euler round trip nearly exact (measured ~0.004)
    assert max(refined) < 0.02 and max(refined) < min(plain) / 5
    video = pipe.morph(a, b, 5, "noise", "a red ball", "a blue box", steps=4, refine=1)
    assert video.shape == (1, 3, 5, 32, 32)
    with pytest.raises(ValueError, match="unknown morph mode"):
        pipe.morph(a, b, 5, "pixel")
    with pytest.raises(ValueError, match="must have one size"):
        pipe.morph(a, pattern(frames=1, size=48), 5)


def test_noise_morph_strength_sets_how_far_the_stills_are_inverted(pipe):
    """strength < 1 inverts A and B part way and regenerates from there: the ends still come back, the middle
    lies between the latent morph (nothing regenerated) and the full inversion's."""
    a, b = pattern(frames=1), pattern(frames=1, phase=2.5)
    za, zb = pipe.encode(a), pipe.encode(b)

    def noise_morph(strength):
        return pipe.morph(a, b, 5, "noise", "a red ball", "a blue box", steps=20, refine=2, strength=strength,
                          output_type="latent")  # fmt: skip

    latent = pipe.morph(a, b, 5, output_type="latent")
    part, full = noise_morph(0.3), noise_morph(1.0)
    for z in (part, full):
        assert max(((z[i] - ref[0]).norm() / ref.norm()).item() for i, ref in ((0, za), (-1, zb))) < 0.02
    to_latent = [(z[2] - latent[2]).norm().item() for z in (part, full)]
    assert 0 < to_latent[0] < to_latent[1] / 2  # part way regenerates less of the middle
    assert torch.equal(
        pipe.morph(a, b, 5, "noise", steps=10, output_type="latent"),
        pipe.morph(a, b, 5, "noise", steps=10, strength=NOISE_MORPH_STRENGTH, output_type="latent"),
    )
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]; got 0"):
        pipe.morph(a, b, 5, "noise", strength=0)
    with pytest.raises(ValueError, match="strength applies to mode='noise' only"):
        pipe.morph(a, b, 5, strength=0.5)


def test_morph_stagger_defaults_and_checks(pipe):
    a, b = pattern(frames=1), pattern(frames=1, phase=2.5)
    plain = pipe.morph(a, b, 5, output_type="latent")
    assert torch.equal(pipe.morph(a, b, 5, stagger=0, output_type="latent"), plain)  # latent: 0 by default
    staggered = pipe.morph(a, b, 5, stagger=0.4, output_type="latent")
    assert torch.equal(staggered[0], plain[0]) and torch.equal(staggered[-1], plain[-1])
    assert (staggered[2] - plain[2]).norm() > 0.1 * (plain[0] - plain[-1]).norm()  # measured 0.23
    noise = pipe.morph(a, b, 5, "noise", steps=10, output_type="latent")
    assert torch.equal(
        noise, pipe.morph(a, b, 5, "noise", steps=10, stagger=NOISE_MORPH_STAGGER, output_type="latent")
    )
    assert not torch.equal(noise, pipe.morph(a, b, 5, "noise", steps=10, stagger=0, output_type="latent"))
    with pytest.raises(ValueError, match=r"stagger must be in \[0.0, 1.0\); got 1"):
        pipe.morph(a, b, 5, stagger=1)


def test_staggered_noise_morph_keeps_the_object_a_plain_one_loses(default_pipe):
    """A green triangle and a purple square of held-out stills (the shapes world, seed 32): with the plain
    slerp (stagger 0) the middle frame fades both half-way and the colours blend to grey, no object; the
    staggered default brings the square in before the triangle goes."""
    from vidlatent.eval.morph import MORPH_SEED, morph_pairs, morph_report

    pair = morph_pairs(3, MORPH_SEED + 1)[2]
    assert (pair["prompt_a"], pair["prompt_b"]) == ("a green triangle", "a purple square")

    def blank_frames(stagger):
        video = default_pipe.morph(pair["a"][None], pair["b"][None], 17, "noise", pair["prompt_a"], pair["prompt_b"],
                                   stagger=stagger, progress=False)  # fmt: skip
        return morph_report([video[0]])["blank"][0]

    assert blank_frames(0) != []  # measured: frames 8 and 9
    assert blank_frames(None) == []


def test_noise_morph_respacing_evens_out_the_steps(pipe):
    a, b = pattern(frames=1), pattern(frames=1, phase=2.5)

    def latent_jump(respace):
        z = pipe.morph(a, b, 9, "noise", "a red ball", "a blue box", steps=8, refine=1, respace=respace,
                       strength=1, output_type="latent")  # fmt: skip
        return smoothness(rearrange(z, "t c 1 h w -> 1 c t h w"))["jump"]

    # two prompts: this denoiser's path moves slowly in the middle and fast at the end (measured jump 2.3);
    # one respacing pass brings the largest step near the median (measured 1.12)
    plain, even = latent_jump(False), latent_jump(True)
    assert plain > 1.8 and even < 1.3


def test_arc_length_weights_invert_the_length_of_a_path():
    w = morph_weights(5)
    path = (w**2)[:, None]  # a path that moves slowly, then fast, in its parameter
    even = arc_length_weights(w, path, w)
    assert even[0] == 0 and even[-1] == 1
    # the exact answer is sqrt(target); piecewise-linear inversion of 5 samples is close
    torch.testing.assert_close(even, w.sqrt(), rtol=0, atol=0.07)
    assert torch.equal(arc_length_weights(w, torch.zeros(5, 3), w), w)  # a still path keeps its weights


# ------------------------------------------------------------------------------------------------ loading


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    assert sorted(p.name for p in (tmp_path / "pipe").iterdir()) == [
        "dit",
        "pipeline.json",
        "text_encoder",
        "vae",
    ]
    loaded = VideoPipeline.from_pretrained(tmp_path / "pipe")
    loaded.progress = False
    assert loaded.config == pipe.config
    for part in ("vae", "dit", "text_encoder"):
        saved, original = getattr(loaded, part).state_dict(), getattr(pipe, part).state_dict()
        assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
    # same weights; kernels may differ with memory layout in the last bits
    torch.testing.assert_close(
        loaded.generate("a red ball", seed=1, steps=2),
        pipe.generate("a red ball", seed=1, steps=2),
        rtol=0,
        atol=1e-5,
    )
    # a second preset load gives the same random weights
    again = VideoPipeline.from_pretrained("tiny")
    assert all(torch.equal(p, q) for p, q in zip(again.dit.parameters(), pipe.dit.parameters()))


def test_loading_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.setattr("vidlatent.checkpoint.WEIGHTS_DIR", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="default model is not installed"):
        VideoPipeline.from_pretrained("default")
    with pytest.raises(FileNotFoundError, match="not a folder, and not a preset"):
        VideoPipeline.from_pretrained("nonexistent-model")
    (tmp_path / "vae").mkdir()
    with pytest.raises(FileNotFoundError, match="lacks dit/, text_encoder/"):
        VideoPipeline.from_pretrained(tmp_path)


def test_mismatched_parts_are_refused(pipe):
    from vidlatent.config import DiTConfig, load_config
    from vidlatent.models.dit import VideoDiT

    dit = VideoDiT(load_config(DiTConfig, "dit", "tiny"))  # 16 latent channels; the tiny VAE has 4
    with pytest.raises(
        ValueError, match="denoiser takes 16 and returns 16 latent channels, but the VAE makes 4"
    ):
        VideoPipeline(pipe.vae, dit, pipe.text_encoder, PipelineConfig())


def test_api_type_slips_get_errors_naming_the_argument(pipe, tmp_path):
    from vidlatent.data.io import write_video

    kw = dict(steps=1, progress=False)
    for call, match in [
        (lambda: pipe.generate(None, **kw), "prompt must be a str or a list of str; got NoneType"),
        (lambda: pipe.generate(["a", 3], **kw), "prompt must be a str or a list of str; got list"),
        (lambda: pipe.generate("a", frames=5.0, **kw), "frames must be an integer; got 5.0"),
        (lambda: pipe.generate("a", height="32", width=32, **kw), "height must be an integer; got '32'"),
        (lambda: pipe.generate("a", negative_prompt=["x"], **kw), "negative_prompt must be one str"),
        (lambda: pipe.morph(pattern(1), pattern(1), batch_size=0), "batch_size must be"),
        (lambda: pipe.morph(pattern(1), pattern(1), mode="noise", refine=-1), "refine must be"),
        (lambda: write_video(pattern(1)[0], tmp_path / "x.png"), "takes the path first"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()


# ------------------------------------------------------------------------------------------------ runtime


def test_split_guidance_gives_the_batched_jobs_results(pipe, monkeypatch, tmp_path, capsys):
    """``split_guidance`` (guidance's halves as two calls): generate, a FlowEdit edit and a noise morph give what
    one batch of both halves gives, to rounding; not with a step cache; the CLI's --split-guidance sets it."""
    from vidlatent.cli import main

    kw = dict(seed=1, steps=3, guidance=4.0, negative_prompt="blurry, dark", output_type="latent")
    video = pattern()
    jobs = {
        "generate": lambda: pipe.generate("a red ball", **kw),
        "flow edit": lambda: pipe.edit(video, "a blue ball", 0.8, source_prompt="a red ball", **kw),
        "noise morph": lambda: pipe.morph(
            video[0, :, 0],
            video[0, :, -1],
            5,
            "noise",
            "red",
            "blue",
            steps=3,
            guidance=4.0,
            output_type="latent",
        ),
    }
    for name, job in jobs.items():
        monkeypatch.setattr(pipe, "split_guidance", False)
        batched = job()
        monkeypatch.setattr(pipe, "split_guidance", True)
        torch.testing.assert_close(job(), batched, rtol=0, atol=1e-4, msg=name)
    monkeypatch.setattr(pipe, "cache", 0.1)
    with pytest.raises(ValueError, match="split_guidance runs guidance's halves as two denoiser calls"):
        jobs["generate"]()
    monkeypatch.setattr(pipe, "cache", None)
    with pytest.raises(ValueError, match="split_guidance and a step cache do not run together"):
        VideoPipeline.from_pretrained("tiny", split_guidance=True, cache=0.1)
    argv = [
        "generate",
        "a red ball",
        "--model",
        "tiny",
        "-q",
        "--frames",
        "1",
        "--height",
        "32",
        "--width",
        "32",
    ]
    assert main([*argv, "--split-guidance", "-o", str(tmp_path / "a.png"), "steps=2"]) == 0
    assert main([*argv, "--split-guidance", "--cache", "0.1", "-o", str(tmp_path / "b.png")]) != 0
    assert "split_guidance runs guidance's halves" in capsys.readouterr().err
