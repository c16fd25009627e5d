"""LoRAs for Wan 2.2 models through the one loader: a two-expert pair (one file per expert) gives what
diffusers gives with ``load_lora_weights(A)`` and ``load_lora_weights(B, load_into_transformer_2=True)``, end to
end; ``--lora`` / ``--lora-2`` on the CLI; a TI2V-5B (48-channel) LoRA on its denoiser; the errors."""

import copy
import dataclasses

import pytest
import torch
from safetensors.torch import save_file
from test_dit import max_rel_diff, pair
from test_lora_inference import block_modules, diffusers_keys, factors, kohya_keys
from test_wan22_pipeline import BOUNDARY, NEGATIVE, PROMPT, as_video, noise, ref_kw
from wan22_folders import saved

from vidlatent import VideoPipeline
from vidlatent.cli import main
from vidlatent.config import DiTConfig, load_config
from vidlatent.data.io import read_video
from vidlatent.models.lora import load_lora


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    return saved(
        tmp_path_factory.mktemp("wan22") / "Wan2.2-T2V-A14B-tiny-Diffusers",
        "WanPipeline",
        latent_channels=16,
        experts=2,
        boundary_ratio=BOUNDARY,
    )


@pytest.fixture(scope="module")
def pair_files(a14b, tmp_path_factory):
    """A LoRA for each expert (diffusers keys for the high-noise one, Kohya/ComfyUI's for the low-noise one)."""
    path, _ = a14b
    pipe = VideoPipeline.from_pretrained(path)
    folder = tmp_path_factory.mktemp("loras")
    modules = block_modules(pipe.dit.config) + ["head.proj"]
    high, low = folder / "high_noise.safetensors", folder / "low_noise.safetensors"
    save_file(diffusers_keys(factors(pipe.dit, modules, seed=21, alphas=False)), str(high))
    save_file(kohya_keys(factors(pipe.dit_2, modules, seed=22, alphas=False)), str(low))
    return high, low


@pytest.mark.slow  # ~3 pipeline runs each side; 177 s measured on the shared (load 13) machine
def test_a_lora_pair_equals_diffusers(a14b, pair_files):
    path, ref = a14b
    high, low = pair_files
    ref = copy.deepcopy(ref)
    ref.load_lora_weights(str(high), adapter_name="high")
    ref.load_lora_weights(str(low), adapter_name="low", load_into_transformer_2=True)
    start = noise(16, 4)
    expected = as_video(ref(**ref_kw(start, guidance_scale=5.0, guidance_scale_2=3.0)).frames)
    pipe = VideoPipeline.from_pretrained(path)
    kw = dict(steps=6, guidance=5.0, guidance_2=3.0, noise=start.clone(), progress=False)
    base = pipe.generate(PROMPT, NEGATIVE, **kw)
    assert pipe.load_lora(high) == "high_noise" and pipe.load_lora(low, expert=2) == "low_noise"
    assert pipe.loras == {"high_noise": 1.0, "low_noise@2": 1.0}
    video = pipe.generate(PROMPT, NEGATIVE, **kw)
    diff = (video.clamp(-1, 1) - expected).abs().max().item()
    print(
        f"LoRA pair on T2V-A14B: max |ours - diffusers| = {diff:.4g} (max |diffusers| {expected.abs().max():.4g})"
    )
    assert diff <= 1e-3
    assert (video - base).abs().max() > 1e-2  # the LoRAs count
    # each file acts on its own expert: the low-noise one off changes the video, scaling by name works
    pipe.set_lora_scale("low_noise@2", 0.0)
    assert (pipe.generate(PROMPT, NEGATIVE, **kw) - video).abs().max() > 1e-3
    pipe.unload_lora()
    assert pipe.loras == {} and torch.equal(pipe.generate(PROMPT, NEGATIVE, **kw), base)
    with pytest.raises(ValueError, match=r"no expert 3 .* accepted: 1 \(the high-noise expert\) or 2"):
        pipe.load_lora(high, expert=3)


@pytest.mark.slow
def test_cli_lora_2(a14b, pair_files, tmp_path):
    path, _ = a14b
    high, low = pair_files
    job = ["generate", PROMPT, "--model", str(path), "--frames", "5", "--height", "32", "--width", "32",
           "--seed", "1", "--steps", "4", "--guidance-2", "2", "-q"]  # fmt: skip
    out = tmp_path / "frames"  # png frames: exact to the 8-bit rounding
    assert main([*job, "-o", str(out), "--lora", str(high), "--lora-2", f"{low}:0.5"]) == 0
    pipe = VideoPipeline.from_pretrained(path)
    pipe.load_lora(high)
    pipe.load_lora(low, 0.5, expert=2)
    video = pipe.generate(
        PROMPT, frames=5, height=32, width=32, seed=1, steps=4, guidance_2=2.0, progress=False
    )
    assert (read_video(out)[0] - video[0].clamp(-1, 1)).abs().max() <= 2 / 255 + 1e-6  # [-1, 1], 8 bits
    plain = tmp_path / "plain"
    assert main([*job, "-o", str(plain), "--lora", str(high)]) == 0
    assert (read_video(plain)[0] - read_video(out)[0]).abs().max() > 4 / 255


def test_a_48_channel_lora_on_the_ti2v_denoiser_equals_diffusers(tmp_path):
    """The same loader reads a LoRA for TI2V-5B's denoiser, checked at per-token timesteps."""
    from diffusers import WanPipeline

    cfg = dataclasses.replace(load_config(DiTConfig, "dit", "tiny"), in_channels=48, out_channels=48)
    dit, ref = pair(cfg, seed=9)
    modules = block_modules(cfg) + ["head.proj", "time_modulation"]
    path = tmp_path / "ti2v.safetensors"
    save_file(diffusers_keys(factors(dit, modules, seed=5, alphas=False)), str(path))
    holder = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=ref)
    holder.load_lora_weights(str(path), adapter_name="x")
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 48, 3, 4, 6, generator=g), torch.randn(1, 7, cfg.text_dim, generator=g)
    sigma = torch.full((1, 3 * 2 * 3), 0.6)
    sigma[:, :6] = 0.0  # the clean first frame of TI2V
    with torch.no_grad():
        base = dit(x, sigma, context)
        load_lora(dit, path)
        expected = ref(x, 1000 * sigma, context).sample
        out = dit(x, sigma, context)
    print(f"TI2V LoRA, per-token timesteps: max relative difference {max_rel_diff(out, expected):.4g}")
    assert max_rel_diff(out, expected) <= 1e-4 and max_rel_diff(base, expected) > 1e-2
