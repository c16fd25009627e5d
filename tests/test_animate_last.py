"""animate with a first and a last image on text-to-video denoisers (ours): both stills kept through the latent
mask, the last one encoded after the first so that the causal VAE gives it back; on the default model, a
generative morph whose end frames are the stills."""

import pytest
import torch
from test_pipeline import pattern

from vidlatent.data.shapes import ShapesWorld
from vidlatent.pipelines.encode import psnr


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    return tiny_pipe


def test_first_and_last_latent_frames_are_the_stills(pipe):
    first, last = pattern(frames=1), pattern(frames=1, phase=2.0)
    z = pipe.animate(first, "the ball rolls right", frames=9, last_image=last, seed=0, output_type="latent")
    assert z.shape == (1, 4, 3, 4, 4)
    assert torch.equal(z[:, :, :1], pipe.encode(first))
    # the last latent frame is the last of the clip [first, last x 8]: a latent the decoder ends on the still with
    held = pipe.encode(torch.cat([first, last.expand(-1, -1, 8, -1, -1)], dim=2))
    assert torch.equal(z[:, :, -1:], held[:, :, -1:])
    assert (z[:, :, 1] - held[:, :, 1]).abs().mean() > 0.1  # the middle is generated
    alone = pipe.animate(first, "the ball rolls right", frames=9, seed=0, output_type="latent")
    assert torch.equal(alone[:, :, :1], z[:, :, :1]) and not torch.allclose(alone[:, :, -1], z[:, :, -1])


def test_the_last_still_is_noised_even_when_the_first_is_clean(pipe):
    """No denoiser here was trained with a clean last frame: it is given noised to each step's sigma, like
    inpaint's known region, whatever ``first_frame`` says of the first."""
    first, last = pattern(frames=1), pattern(frames=1, phase=2.0)
    seen = []
    handle = pipe.dit.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        z = pipe.animate(first, "a ball", frames=9, last_image=last, first_frame="clean", seed=0, steps=3,
                         output_type="latent")  # fmt: skip
    finally:
        handle.remove()
    assert len(seen) == 3
    assert all(torch.equal(x[:, :, 0], z[:1, :, 0].expand_as(x[:, :, 0])) for x in seen)  # clean first frame
    assert min((x[:, :, -1] - z[:1, :, -1]).abs().max().item() for x in seen) > 0.1  # noised last frame


def test_bad_last_images_say_what_is_accepted(pipe):
    first = pattern(frames=1)
    with pytest.raises(
        ValueError, match=r"last_image must have image's shape \(1, 3, 1, 32, 32\); got \(1, 3, 1, 16, 32\)"
    ):
        pipe.animate(first, "a ball", frames=9, last_image=pattern(frames=1)[..., :16, :])
    with pytest.raises(ValueError, match=r"animate takes an image \(one frame\) as last_image; got 5 frames"):
        pipe.animate(first, "a ball", frames=9, last_image=pattern())
    with pytest.raises(ValueError, match=r"a first and a last image need frames >= 5; got 1"):
        pipe.animate(first, "a ball", frames=1, last_image=first)


@pytest.mark.slow
def test_default_model_morphs_between_two_held_out_stills(default_pipe):
    """The first and last frames of 4 held-out clips, with their captions: the generated clips start and end on
    the stills (PSNR of the first and last output frames against them; the VAE's own round trip of such a still
    as an image is about 30 dB). scripts/eval_last_frame.py measures 8 such pairs and the alternatives."""
    pipe = default_pipe
    world = ShapesWorld(64, 64, 17, split="heldout", seed=11)
    clips, captions = zip(*(world.clip(i) for i in range(4)))
    clips = torch.stack(clips)
    first, last = clips[:, :, :1], clips[:, :, -1:]
    video = pipe.animate(first, list(captions), last_image=last, seed=0, progress=False)
    assert video.shape == (4, 3, 17, 64, 64)

    def mean_psnr(a, b):
        return sum(psnr((x + 1) / 2, (y + 1) / 2) for x, y in zip(a, b)) / len(a)

    first_db, last_db = mean_psnr(video[:, :, 0], first[:, :, 0]), mean_psnr(video[:, :, -1], last[:, :, 0])
    middle_db = mean_psnr(video[:, :, 8], last[:, :, 0])
    print(
        f"default model, 4 held-out stills: first frame {first_db:.1f} dB, last {last_db:.1f} dB, middle {middle_db:.1f} dB"
    )
    assert first_db > 27 and last_db > 27
    assert middle_db < last_db - 3  # the clip moves between them, it is not the last still held throughout


def test_cli_animate_with_last(tmp_path, capsys):
    from vidlatent.cli import main
    from vidlatent.data.io import read_video, write_video

    write_video(tmp_path / "a.png", pattern(frames=1)[0])
    write_video(tmp_path / "b.png", pattern(frames=1, phase=2.0)[0])
    write_video(tmp_path / "small.png", pattern(frames=1, size=16)[0])
    out = tmp_path / "morph.gif"
    tiny = ["--model", "tiny", "--steps", "2", "--seed", "0", "-q"]
    assert main(["animate", str(tmp_path / "a.png"), "a ball", "--last", str(tmp_path / "b.png"), "--frames", "9",
                 "-o", str(out), *tiny]) == 0  # fmt: skip
    assert read_video(out)[0].shape == (3, 9, 32, 32)
    assert main(["animate", str(tmp_path / "a.png"), "a ball", "--last", str(tmp_path / "small.png"), "-o",
                 str(out), *tiny]) == 2  # fmt: skip
    assert "small.png is 16x16; give --height and --width" in capsys.readouterr().err
