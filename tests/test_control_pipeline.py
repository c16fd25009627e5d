"""VACE control inputs equal WanVACEPipeline's preparation, and a controlled run on a tiny diffusers VACE folder
equals WanVACEPipeline end to end with the same start noise; bad control inputs name both shapes."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from vace_folders import VACE_LAYERS, wan_vace_root

from vidlatent.models.control import ControlledDiT
from vidlatent.models.text import load_text_encoder
from vidlatent.models.vae import CausalVAE
from vidlatent.pipelines.control import control_latents, fold_mask, sample_control

PROMPT, NEGATIVE = "a red circle moving left", "blue square"
T, H, W = 9, 64, 64
SCALES = [0.8, 1.2]


@pytest.fixture(scope="module", autouse=True)
def _prompt_clean_without_ftfy():
    """diffusers 0.42's VACE pipeline calls ftfy even where it is not installed (its T2V pipeline checks first);
    borrow the T2V clean-up, the same without ftfy (which changes nothing in these ASCII prompts)."""
    from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_vace

    with pytest.MonkeyPatch.context() as mp:
        if not pipeline_wan.is_ftfy_available():
            mp.setattr(pipeline_wan_vace, "prompt_clean", pipeline_wan.prompt_clean)
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("vace") / "Wan-VACE-tiny-Diffusers"
    ref = wan_vace_root(path)
    vae = CausalVAE.from_pretrained(path / "vae").eval()
    model = ControlledDiT.from_pretrained(path).eval()
    text = load_text_encoder(path / "text_encoder", overrides=["clean=wan"])
    return path, ref, vae, model, text


def frames_and_masks(seed=0):
    """A smooth random control video, a moving-box mask (uint8) and a reference image of another size, as
    PIL images (diffusers' input) and tensors (ours: video in [-1, 1], mask in [0, 1])."""
    g = np.random.default_rng(seed)
    coarse = torch.from_numpy(g.uniform(0, 255, (3, T, 8, 8))).float()
    video = torch.nn.functional.interpolate(coarse[None], size=(T, H, W), mode="trilinear").round().byte()[0]
    mask = np.zeros((T, H, W), np.uint8)
    for i in range(T):
        mask[i, 8 + 2 * i : 40 + 2 * i, 12 : 44 + i] = 255
    reference = g.integers(0, 256, (32, 48, 3), dtype=np.uint8)  # 48 wide, 32 high: scaled and padded
    pil_video = [PIL.Image.fromarray(video[:, i].permute(1, 2, 0).numpy()) for i in range(T)]
    pil_mask = [PIL.Image.fromarray(mask[i], mode="L") for i in range(T)]
    ours = dict(
        video=video[None].float() / 127.5 - 1,
        mask=torch.from_numpy(mask)[None, None].float() / 255,
        reference=torch.from_numpy(reference).permute(2, 0, 1)[None].float() / 127.5 - 1,
    )
    return (pil_video, pil_mask, PIL.Image.fromarray(reference)), ours


@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("with_reference", [True, False])
def test_control_latents_equal_wan_vace_preparation(root, with_mask, with_reference):
    _, ref, vae, _, _ = root
    (pil_video, pil_mask, pil_ref), ours = frames_and_masks()
    mask_in, ref_in = (pil_mask if with_mask else None), (pil_ref if with_reference else None)
    video, mask, refs = ref.preprocess_conditions(
        pil_video, mask_in, ref_in, 1, H, W, T, torch.float32, "cpu"
    )
    expected = torch.cat([ref.prepare_video_latents(video, mask, refs), ref.prepare_masks(mask, refs)], dim=1)
    got = control_latents(vae, ours["video"], ours["mask"] if with_mask else None,
                          ours["reference"] if with_reference else None)  # fmt: skip
    assert got.shape == expected.shape == (1, 72, 3 + with_reference, 8, 8)
    assert torch.equal(got[:, 8:], expected[:, 8:])  # the folded mask, exactly
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_the_mask_folds_pixels_of_a_block_into_channels():
    mask = torch.zeros(1, 1, 5, 16, 16)
    mask[0, 0, :, 3, 10] = 1  # block (0, 1), pixel (3, 2) within it
    folded = fold_mask(mask, 2, 8)
    assert folded.shape == (1, 64, 2, 2, 2)
    assert folded.sum() == 2 and torch.all(folded[0, 3 * 8 + 2, :, 0, 1] == 1)


def reference_run(ref, noise, steps, output_type, with_reference=True):
    (pil_video, pil_mask, pil_ref), _ = frames_and_masks()
    return ref(video=pil_video, mask=pil_mask, reference_images=pil_ref if with_reference else None,
               prompt=PROMPT, negative_prompt=NEGATIVE, height=H, width=W, num_frames=T,
               num_inference_steps=steps, guidance_scale=5.0, conditioning_scale=SCALES,
               latents=noise.clone(), output_type=output_type).frames  # fmt: skip


def our_run(root, noise, steps, output_type, with_reference=True, scale=SCALES):
    path, _, vae, model, text = root
    _, ours = frames_and_masks()
    context, _ = text.encode([PROMPT])  # Wan attends to all 512 (zero-padded) tokens: no mask
    negative, _ = text.encode([NEGATIVE])
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    return sample_control(vae, model, context, control=ours["video"], mask=ours["mask"],
                          reference=ours["reference"] if with_reference else None, scale=scale,
                          noise=noise.clone(), negative=negative, guidance=5.0, sampler="unipc", steps=steps,
                          shift=3.0, timesteps="scheduler", scheduler_config=scheduler_config, progress=False,
                          output_type=output_type)  # fmt: skip


@pytest.mark.parametrize("with_reference", [True, False])
def test_controlled_run_equals_wan_vace_pipeline(root, with_reference):
    _, ref, _, model, _ = root
    assert model.control.config.layers == VACE_LAYERS
    noise = torch.randn(1, 4, 3 + with_reference, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = reference_run(ref, noise, 6, "pt", with_reference).permute(0, 2, 1, 3, 4) * 2 - 1
    video = our_run(root, noise, 6, "video", with_reference)
    assert video.shape == expected.shape == (1, 3, T, H, W)
    diff = (video - expected).abs().max().item()
    print(
        f"VACE end-to-end parity (reference={with_reference}): max |ours - diffusers| = {diff:.2e} (pixels in [-1, 1])"
    )
    assert diff <= 1e-3
    assert expected.std() > 0.2
    # without the control's hints (scale 0) the video is another one: the test can fail
    plain = our_run(root, noise, 6, "video", with_reference, scale=0.0)
    assert (plain - expected).abs().max() > 1e-2


@pytest.mark.slow
def test_numpy_output_and_latents(root):
    _, ref, _, _, _ = root
    noise = torch.randn(1, 4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = torch.from_numpy(reference_run(ref, noise, 4, "np")).permute(0, 4, 1, 2, 3) * 2 - 1
    assert (our_run(root, noise, 4, "video") - expected).abs().max() <= 1e-3
    latents = our_run(root, noise, 4, "latent")
    assert latents.shape == (1, 4, 3, 8, 8)  # the reference frame dropped


def test_bad_control_inputs_name_both_shapes(root):
    _, _, vae, model, text = root
    _, ours = frames_and_masks()
    context, _ = text.encode([PROMPT])
    kw = dict(steps=1, progress=False)
    with pytest.raises(ValueError, match=r"control video has 8 frames of 64x64.*1 \+ 4k"):
        sample_control(vae, model, context, control=ours["video"][:, :, :8], **kw)
    with pytest.raises(ValueError, match=r"\(b, 1, t, h, w\) = \(1, 1, 9, 64, 64\); got \(1, 3, 9, 64, 64\)"):
        sample_control(vae, model, context, control=ours["video"], mask=ours["video"], **kw)
    with pytest.raises(ValueError, match=r"= \(1, 4, 3, 8, 8\); got \(1, 4, 5, 8, 8\)"):
        sample_control(vae, model, context, control=ours["video"], noise=torch.randn(1, 4, 5, 8, 8), **kw)
    with pytest.raises(ValueError, match=r"72x64 \(width x height\); its sides must be multiples of 16"):
        sample_control(vae, model, context, control=torch.zeros(1, 3, 9, 64, 72), **kw)
