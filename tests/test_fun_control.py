"""Wan2.1-Fun Control (a Wan transformer of 3c input channels): a diffusers-layout folder loads as a pipeline whose
``control`` job joins the control video's latents to the noisy ones on channels, as VideoX-Fun's
``WanFunControlPipeline`` does. diffusers has no Fun-Control pipeline, so the check is against that layout: the
exact tensor entering the patch embedding (noise, then the control's normalized latents, then the first frame's
in latent frame 0 and zeros after) and the CLIP tokens beside it, computed here from diffusers' VAE and the
transformers CLIP model of the folder. Then ``vidlatent control`` end to end, and the errors."""

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_lora_inference import block_modules, factors, kohya_keys
from wan_folders import CLIP_DIM, CLIP_TOKENS, FUN_LATENT_CHANNELS, wan_fun_control_root

from vidlatent.cli import main
from vidlatent.data.io import read_video, write_video
from vidlatent.models.dit import VideoDiT, to_wan_state_dict
from vidlatent.pipelines import VideoPipeline

PROMPT, NEGATIVE = "a red circle moving left", "blue square"
T, H, W = 9, 64, 64
C = FUN_LATENT_CHANNELS


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("fun") / "Wan-Fun-Control-tiny-Diffusers"
    return path, wan_fun_control_root(path)


@pytest.fixture(scope="module")
def pipe(root):
    return VideoPipeline.from_pretrained(root[0])


def control_video(seed=0) -> torch.Tensor:
    """A smooth random video (1, 3, T, H, W) in [-1, 1] on 8-bit levels (what a file gives)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, T, 8, 8, generator=g) * 255
    return F.interpolate(coarse, size=(T, H, W), mode="trilinear").round() / 127.5 - 1


def still(h=H, w=W, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (3, h, w), generator=g).float() / 127.5 - 1).clamp(-1, 1)


def noise(seed=0) -> torch.Tensor:
    return torch.randn(1, C, 1 + (T - 1) // 4, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


def run(pipe, start, **kw):
    kw = {"steps": 2, "guidance": 1.0, "progress": False, "output_type": "latent", **kw}
    return pipe.control(PROMPT, kw.pop("control", control_video()), noise=start.clone(), **kw)


def captured_inputs(pipe, **kw):
    """Every tensor that entered the denoiser's patch embedding and image embedder during a one-step run."""
    seen = {"patch": [], "image": []}
    hooks = [
        pipe.dit.patch_embed.register_forward_pre_hook(lambda m, a: seen["patch"].append(a[0].clone())),
        pipe.dit.image_embed.register_forward_pre_hook(lambda m, a: seen["image"].append(a[0].clone())),
    ]
    try:
        run(pipe, kw.pop("start"), steps=1, **kw)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def normalized_latents(vae, video):
    """diffusers' VAE: posterior mode, then (z - latents_mean) / latents_std, as VideoX-Fun's Wan VAE encodes."""
    z = vae.encode(video).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    return (z - mean) / std


def clip_tokens(parts, image):
    """The folder's transformers CLIP: penultimate hidden states of an image (3, h, w) in [-1, 1]."""
    pixels = ((image + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    batch = parts["image_processor"](images=[pixels], return_tensors="pt")
    out = parts["image_encoder"](pixel_values=batch["pixel_values"], output_hidden_states=True)
    return out.hidden_states[-2]


def test_a_fun_control_folder_loads_as_fun_control(pipe):
    assert pipe.denoiser_input == "fun_control" and pipe.control_branch is None
    assert pipe.dit.config.in_channels == 3 * C and pipe.dit.config.image_dim == CLIP_DIM
    assert pipe.config.sampler == "unipc" and pipe.config.timesteps == "scheduler"


@torch.no_grad()
def test_the_denoiser_input_is_fun_controls_layout(pipe, root):
    """[noise | control latents | first-frame latents in frame 0, zeros after] on channels, and the first
    frame's CLIP tokens; under guidance both halves get the same."""
    parts, video, first, start = root[1], control_video(), still(), noise()
    seen = captured_inputs(
        pipe, control=video, reference=first, start=start, guidance=3.0, negative_prompt=NEGATIVE
    )
    (x_in,), (tokens,) = seen["patch"], seen["image"]
    assert x_in.shape == (2, 3 * C, 3, H // 8, W // 8) and tokens.shape == (2, CLIP_TOKENS, CLIP_DIM)
    control = normalized_latents(parts["vae"], video)
    first_latent = normalized_latents(parts["vae"], first[None, :, None])
    for row in range(2):  # the conditioned half and the unconditioned one
        assert torch.equal(x_in[row, :C], start[0])  # the first step's input is the start noise itself
        torch.testing.assert_close(x_in[row, C : 2 * C], control[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(x_in[row, 2 * C :, :1], first_latent[0], rtol=1e-4, atol=1e-4)
        assert not x_in[row, 2 * C :, 1:].any()
        torch.testing.assert_close(tokens[row], clip_tokens(parts, first)[0], rtol=1e-4, atol=1e-4)
    assert control.abs().mean() > 0.1 and first_latent.abs().mean() > 0.1  # real latents, not near zero


@torch.no_grad()
def test_without_a_reference_the_first_frame_and_the_clip_tokens_are_zero(pipe, root):
    video, start = control_video(2), noise(2)
    seen = captured_inputs(pipe, control=video, start=start)
    (x_in,), (tokens,) = seen["patch"], seen["image"]
    torch.testing.assert_close(
        x_in[0, C : 2 * C], normalized_latents(root[1]["vae"], video)[0], rtol=1e-4, atol=1e-4
    )
    assert not x_in[0, 2 * C :].any() and tokens.shape == (1, CLIP_TOKENS, CLIP_DIM) and not tokens.any()


@torch.no_grad()
def test_a_one_frame_output_keeps_the_first_frame_latents_zero(pipe, root):
    """VideoX-Fun puts the first frame in only when the output has more than one latent frame; its CLIP tokens
    are given either way."""
    parts, first = root[1], still()
    image = control_video()[:, :, :1]
    seen = captured_inputs(pipe, control=image, reference=first, start=noise()[:, :, :1])
    (x_in,), (tokens,) = seen["patch"], seen["image"]
    assert x_in.shape == (1, 3 * C, 1, H // 8, W // 8) and not x_in[0, 2 * C :].any()
    torch.testing.assert_close(tokens[0], clip_tokens(parts, first)[0], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_a_reference_of_another_size_is_stretched_for_its_latents(pipe, root):
    """The latents are those of the image stretched to the output size; the CLIP tokens those of the image."""
    parts, small = root[1], still(40, 56, seed=3)
    seen = captured_inputs(pipe, reference=small, start=noise())
    stretched = F.interpolate(small[None], size=(H, W), mode="bilinear", antialias=True, align_corners=False)
    expected = normalized_latents(parts["vae"], stretched.clamp(small.min(), small.max())[:, :, None])
    torch.testing.assert_close(seen["patch"][0][0, 2 * C :, :1], expected[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(seen["image"][0][0], clip_tokens(parts, small)[0], rtol=1e-4, atol=1e-4)


def test_control_reference_lora_and_negative_each_move_the_output(pipe, tmp_path):
    start = noise(4)
    base = run(pipe, start)
    assert base.shape == (1, C, 3, H // 8, W // 8)
    assert torch.equal(run(pipe, start), base)  # deterministic: the checks below can fail
    assert (run(pipe, start, control=control_video(5)) - base).abs().max() > 1e-2
    assert (run(pipe, start, reference=still()) - base).abs().max() > 1e-2
    # the tiny model's text moves its velocity little (guidance 3 moved these latents by 9e-3)
    assert (run(pipe, start, guidance=3.0, negative_prompt=NEGATIVE) - base).abs().max() > 1e-3
    path = tmp_path / "style.safetensors"
    save_file(kohya_keys(factors(pipe.dit, block_modules(pipe.dit.config), seed=3)), str(path))
    pipe.load_lora(path)
    try:
        assert (run(pipe, start) - base).abs().max() > 1e-2
    finally:
        pipe.unload_lora()


def test_a_folder_of_ours_keeps_it_fun_control(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "ours")
    again = VideoPipeline.from_pretrained(tmp_path / "ours")
    assert again.denoiser_input == "fun_control" and again.image_encoder is not None
    start = noise(7)
    # not bitwise: loaded tensors sit at other memory alignments, and CPU kernels then round differently
    torch.testing.assert_close(
        run(again, start, reference=still()), run(pipe, start, reference=still()), rtol=0, atol=1e-5
    )


def test_original_wan_keys_load_the_same_denoiser(pipe, tmp_path):
    """alibaba-pai ships the transformer under original Wan key names: read as the same denoiser."""
    save_file(to_wan_state_dict(pipe.dit.state_dict()), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    dit = VideoDiT.from_pretrained(tmp_path / "diffusion_pytorch_model.safetensors", config=pipe.dit.config)
    other = VideoPipeline(pipe.vae, dit.eval(), pipe.text_encoder, pipe.config, pipe.image_encoder)
    start = noise(6)
    # not bitwise, as above: the loaded weights sit at other memory alignments
    torch.testing.assert_close(
        run(other, start, reference=still()), run(pipe, start, reference=still()), rtol=0, atol=1e-5
    )


def test_errors(pipe, tmp_path):
    video, kw = control_video(), dict(steps=1, progress=False)
    with pytest.raises(ValueError, match=r"takes no mask .*drop mask \(--mask\)"):
        pipe.control(PROMPT, video, mask=torch.ones(H, W), **kw)
    with pytest.raises(ValueError, match=r"takes no control scale .*drop scale \(--scale\); got 0.5"):
        pipe.control(PROMPT, video, scale=0.5, **kw)
    with pytest.raises(ValueError, match=r"takes one reference image \(the first frame to show\); got 2"):
        pipe.control(PROMPT, video, reference=[still(), still()], **kw)
    with pytest.raises(ValueError, match=r"9 frames of 64x64 .* asked for is 5 frames of 64x64"):
        pipe.control(PROMPT, video, frames=5, **kw)
    with pytest.raises(ValueError, match=r"frames must be 1 \+ 4k"):
        pipe.control(PROMPT, video[:, :, :8], **kw)
    with pytest.raises(ValueError, match=r"multiples of 16 and 16 .*got 64x56"):
        pipe.control(PROMPT, video[..., :56, :], **kw)
    with pytest.raises(ValueError, match=r"a Wan Fun-Control one .*use control\(prompt, control=video"):
        pipe.generate(PROMPT, frames=T, height=H, width=W, **kw)
    with pytest.raises(ValueError, match=r"does not run on this pipeline's denoiser, a Wan Fun-Control one"):
        pipe.animate(still()[:, None], PROMPT, T, **kw)
    with pytest.raises(ValueError, match=r"Wan Fun-Control: .*takes no control branch \(VACE\)"):
        pipe.load_control(tmp_path)


def test_fun_v11_checkpoints_and_original_folders_say_what_loads(pipe, tmp_path):
    state = to_wan_state_dict(pipe.dit.state_dict())
    state["ref_conv.weight"] = torch.zeros(pipe.dit.config.dim, C, 2, 2)
    save_file(state, str(tmp_path / "v11.safetensors"))
    with pytest.raises(ValueError, match=r"Wan2.1-Fun V1.1 model: ref_conv .*V1.0 Control .*loads"):
        VideoDiT.from_pretrained(tmp_path / "v11.safetensors", config=pipe.dit.config)
    folder = tmp_path / "Wan2.1-Fun-1.3B-Control"
    folder.mkdir()
    (folder / "config.json").write_text(
        '{"model_type": "i2v", "dim": 1536, "num_heads": 12, "in_dim": 48, "out_dim": 16}'
    )
    with pytest.raises(ValueError, match=r"original Wan2.1-Fun Control \(in_dim 48\) folder: its CLIP"):
        VideoPipeline.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------ CLI


def write_inputs(folder):
    video = control_video()[0]
    write_video(folder / "control.gif", video, fps=8)
    PIL.Image.fromarray(((still() + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()).save(
        folder / "ref.png"
    )
    PIL.Image.fromarray(np.full((H, W), 255, np.uint8)).save(folder / "mask.png")


def test_cli_control(root, tmp_path, capsys):
    write_inputs(tmp_path)
    args = ["control", str(tmp_path / "control.gif"), PROMPT, "--model", str(root[0]), "--seed", "1",
            "--steps", "2", "-q", "--reference", str(tmp_path / "ref.png"), "-o", str(tmp_path / "out.gif")]  # fmt: skip
    assert main(args) == 0
    video, _ = read_video(tmp_path / "out.gif")
    assert video.shape == (3, T, H, W)
    assert "seed 1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mask", "mask.png"], "takes no mask"),
        (["--scale", "0.5"], "takes no control scale"),
        (["--reference", "ref.png", "--reference", "ref.png"], "takes one reference image"),
        (["--control-branch", "."], "takes no control branch"),
    ],
)
def test_cli_errors_are_one_line(root, tmp_path, capsys, extra, message):
    write_inputs(tmp_path)
    extra = [str(tmp_path / x) if x.endswith(".png") or x == "." else x for x in extra]
    args = ["control", str(tmp_path / "control.gif"), PROMPT, "--model", str(root[0]), "--steps", "1", "-q"]
    assert main([*args, "-o", str(tmp_path / "out.gif"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vidlatent control: error:"), err
    assert message in err, err
    assert not (tmp_path / "out.gif").exists()
