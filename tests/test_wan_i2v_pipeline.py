"""Wan 2.1 I2V / FLF2V folders run through ``animate`` give what diffusers' ``WanImageToVideoPipeline`` gives (same
weights, stills, prompts, steps, guidance and start noise), with and without a last image; the folder's image
encoder travels with the pipeline; the errors for jobs and folders that do not fit."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from wan_folders import wan_i2v_root

from vidlatent import VideoPipeline
from vidlatent.cli import main
from vidlatent.models.image import load_image_encoder

PROMPT, NEGATIVE = "a red circle moving left", "blue square"
FRAMES, SIZE = 9, 64
LATENT_SHAPE = (1, 4, 3, 8, 8)


@pytest.fixture(scope="module", autouse=True)
def _prompt_clean_without_ftfy():
    """diffusers 0.42's I2V pipeline calls ftfy even where it is not installed (its T2V pipeline checks first);
    borrow the T2V clean-up, which is the same without ftfy (and ftfy changes nothing in these ASCII prompts)."""
    from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_i2v

    with pytest.MonkeyPatch.context() as mp:
        if not pipeline_wan.is_ftfy_available():
            mp.setattr(pipeline_wan_i2v, "prompt_clean", pipeline_wan.prompt_clean)
        yield


@pytest.fixture(
    scope="module", params=[False, pytest.param(True, marks=pytest.mark.slow)], ids=["i2v", "flf2v"]
)
def root(request, tmp_path_factory):
    flf = request.param
    path = tmp_path_factory.mktemp("wan") / f"Wan-{'FLF2V' if flf else 'I2V'}-tiny-Diffusers"
    return path, wan_i2v_root(path, flf=flf), flf


@pytest.fixture(scope="module")
def stills(tmp_path_factory):
    """Two 64 x 64 PNG stills (smooth colour fields with a disk), read by both pipelines from the same files."""
    folder = tmp_path_factory.mktemp("stills")
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    paths = []
    for i, (cx, cy) in enumerate(((0.3, 0.4), (0.7, 0.6))):
        disk = ((x - cx) ** 2 + (y - cy) ** 2 < 0.03)[..., None]
        field = np.stack([x, y, 1 - x * (i + 1) / 2], axis=-1)
        pixels = np.where(disk, [0.9, 0.1, 0.2 + 0.5 * i], field)
        paths.append(folder / f"still{i}.png")
        Image.fromarray((pixels * 255).round().astype(np.uint8)).save(paths[-1])
    return paths


def start_noise(seed=0):
    return torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(seed))


def reference(ref, first, last, noise, steps=6, guidance=5.0):
    """diffusers' WanImageToVideoPipeline: video in [-1, 1] as (b, c, t, h, w)."""
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=guidance,
              height=SIZE, width=SIZE, num_frames=FRAMES, latents=noise.clone(), output_type="pt")  # fmt: skip
    last = None if last is None else Image.open(last)
    video = ref(image=Image.open(first), last_image=last, **kw).frames * 2 - 1  # (b, t, c, h, w)
    return video.permute(0, 2, 1, 3, 4)


def ours(pipe, first, last, noise, steps=6, guidance=5.0):
    return pipe.animate(first, PROMPT, FRAMES, NEGATIVE, last_image=last, steps=steps, guidance=guidance,
                        noise=noise.clone(), progress=False)  # fmt: skip


def test_animate_equals_wan_image_to_video_pipeline(root, stills):
    """I2V with the first frame, FLF2V with the first and the last (the pairs diffusers' pipeline runs)."""
    path, ref, flf = root
    pipe = VideoPipeline.from_pretrained(path)
    assert (pipe.config.text_attention, pipe.config.timesteps) == ("all", "scheduler")
    last = stills[1] if flf else None
    noise = start_noise()
    expected = reference(ref, stills[0], last, noise)
    video = ours(pipe, stills[0], last, noise)
    diff = (video.clamp(-1, 1) - expected).abs().max().item()
    print(f"{'FLF2V first+last' if flf else 'I2V first'}: max |ours - diffusers| = {diff:.1e}")
    assert video.shape == expected.shape == (1, 3, FRAMES, SIZE, SIZE)
    assert diff <= 1e-3
    assert expected.std() > 0.2  # a real video, not a blank one that would match anything


@pytest.mark.slow
def test_i2v_model_with_a_last_image(root, stills):
    """An I2V model given a last image too: the condition latents and mask hold both stills, and the CLIP tokens
    of both are joined as FLF2V takes them (without its position embedding). diffusers' pipeline cannot run this
    pair (its I2V transformer refuses two stills' tokens), so there is no reference: it runs, and the last
    image changes the video."""
    path, _, flf = root
    if flf:
        pytest.skip("the I2V model's case")
    pipe = VideoPipeline.from_pretrained(path)
    noise = start_noise(3)
    one, two = (ours(pipe, stills[0], last, noise, steps=2, guidance=1.0) for last in (None, stills[1]))
    assert (one - two).abs().max() > 1e-2


def test_image_tokens_and_condition_latents_each_matter(root, stills):
    """Without the CLIP tokens or with a blank condition the video changes: the parity above can fail."""
    path, ref, flf = root
    if not flf:
        pytest.skip("one model kind is enough: both take the same two inputs")
    pipe = VideoPipeline.from_pretrained(path)
    noise = start_noise(1)
    video = ours(pipe, stills[0], stills[1], noise, steps=2, guidance=1.0)
    encode = pipe.image_encoder.encode
    try:
        pipe.image_encoder.encode = lambda images: torch.zeros_like(encode(images))
        assert (ours(pipe, stills[0], stills[1], noise, steps=2, guidance=1.0) - video).abs().max() > 1e-2
    finally:
        pipe.image_encoder.encode = encode
    blank = ours(pipe, torch.zeros(3, SIZE, SIZE), stills[1], noise, steps=2, guidance=1.0)
    assert (blank - video).abs().max() > 1e-2


@pytest.mark.slow
def test_pipeline_folder_carries_the_image_encoder(root, stills, tmp_path):
    path, _, flf = root
    pipe = VideoPipeline.from_pretrained(path)
    assert (
        main(["convert", str(path), "-o", str(tmp_path / "converted"), "-q"]) == 0
    )  # save_pretrained inside
    names = {p.name for p in (tmp_path / "converted").iterdir()}
    assert names == {"vae", "dit", "text_encoder", "image_encoder", "pipeline.json"}
    again = VideoPipeline.from_pretrained(tmp_path / "converted")
    assert again.dit.config == pipe.dit.config and again.image_encoder.dim == pipe.image_encoder.dim
    noise = start_noise(2)
    # not bitwise: loaded tensors sit at other memory alignments, and CPU kernels then round differently
    torch.testing.assert_close(ours(again, stills[0], stills[1], noise, steps=2, guidance=1.0),
                               ours(pipe, stills[0], stills[1], noise, steps=2, guidance=1.0), rtol=0, atol=1e-5)  # fmt: skip
    # a folder that lost its image encoder says what it needs
    shutil.rmtree(tmp_path / "converted" / "image_encoder")
    with pytest.raises(
        FileNotFoundError, match=r"image-conditioned denoiser .* but no image_encoder/.*CLIP vision"
    ):
        VideoPipeline.from_pretrained(tmp_path / "converted")


def test_jobs_that_do_not_fit_the_model_are_refused(root, stills):
    path, _, flf = root
    pipe = VideoPipeline.from_pretrained(path)
    kw = dict(frames=FRAMES, height=SIZE, width=SIZE, steps=1, progress=False)
    with pytest.raises(ValueError, match=r"needs a text-to-video denoiser.*use animate\(image, prompt\)"):
        pipe.generate(PROMPT, **kw)
    with pytest.raises(ValueError, match=r"needs a text-to-video denoiser"):
        pipe.edit(torch.zeros(3, FRAMES, SIZE, SIZE), PROMPT, source_prompt="x", steps=1, progress=False)
    if flf:
        with pytest.raises(ValueError, match=r"first-last-frame model .*give last_image too.*--last IMAGE"):
            pipe.animate(stills[0], PROMPT, FRAMES, steps=1, progress=False)
    with pytest.raises(
        ValueError, match=r"needs an image encoder, a CLIP vision model with tokens of width 24"
    ):
        VideoPipeline(pipe.vae, pipe.dit, pipe.text_encoder, pipe.config)


def test_a_text_to_video_pipeline_takes_no_image_encoder(root):
    tiny = VideoPipeline.from_pretrained("tiny")
    encoder = load_image_encoder(root[0])
    with pytest.raises(ValueError, match=r"text-to-video .*takes no image encoder; animate conditions it"):
        VideoPipeline(tiny.vae, tiny.dit, tiny.text_encoder, tiny.config, encoder)


def test_an_original_wan_i2v_folder_says_what_to_use(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "i2v", "dim": 5120, "num_heads": 40, "in_dim": 36}')
    with pytest.raises(
        ValueError, match=r"original Wan 2.1 i2v folder: its CLIP checkpoint .* is not read here"
    ):
        VideoPipeline.from_pretrained(tmp_path)
