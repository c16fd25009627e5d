"""An original Wan 2.1 release folder (Wan-Video/Wan2.1 layout: a ``WanModel`` config.json and
diffusion_pytorch_model.safetensors, Wan2.1_VAE.pth, Wan's own T5 checkpoint models_t5_umt5-xxl-enc-bf16.pth and the
tokenizer folder google/umt5-xxl/) loads and converts into a pipeline folder that generates what Wan generates.

The folder is written here from the same tiny random weights as a diffusers Wan folder (tests/wan_folders.py), each
part under its original names; the oracle is diffusers' ``WanPipeline`` on those weights, given Wan's own UniPC
noise levels (which differ from diffusers' own: sampling.SIGMAS) and, since the original VAE file stores no latent
statistics and Wan's only fit 16 channels, the neutral ones the 4-channel tiny VAE then gets."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from wan_folders import wan_t2v_parts

from vidlatent import VideoPipeline
from vidlatent.checkpoint import CheckpointMismatchError
from vidlatent.cli import main
from vidlatent.diffusion.sampling import make_scheduler, set_schedule
from vidlatent.models.dit import from_diffusers_state_dict, to_wan_state_dict
from vidlatent.models.text import (
    WAN_T5_FILE,
    WAN_TOKENIZER,
    HFTextConfig,
    HFTextEncoder,
    load_text_encoder,
    to_wan_t5_state_dict,
    wan_t5_key_map,
)
from vidlatent.models.vae import CausalVAE, export_state_dict, wan_key_map
from vidlatent.pipelines.video import WAN_NEGATIVE_PROMPT

PROMPT, NEGATIVE = "a red circle moving left", "blue square"
SIZE = dict(height=64, width=64, num_frames=9)
LATENT_SHAPE = (1, 4, 3, 8, 8)
SHIFT = 5.0  # Wan's generate.py default for text-to-video

# real names of Wan's T5 encoder's state dict (wan/modules/t5.py: T5Encoder, T5SelfAttention, T5Attention,
# T5FeedForward, T5RelativeEmbedding, T5LayerNorm; umt5_xxl: 24 blocks, shared_pos=False)
REAL_WAN_T5_KEYS = [
    "token_embedding.weight",
    "blocks.0.norm1.weight",
    "blocks.0.attn.q.weight",
    "blocks.0.attn.k.weight",
    "blocks.0.attn.v.weight",
    "blocks.0.attn.o.weight",
    "blocks.0.norm2.weight",
    "blocks.0.ffn.gate.0.weight",
    "blocks.0.ffn.fc1.weight",
    "blocks.0.ffn.fc2.weight",
    "blocks.0.pos_embedding.embedding.weight",
    "blocks.23.pos_embedding.embedding.weight",
    "norm.weight",
]


class WanLevelsUniPC:
    """diffusers' UniPC on the noise levels of Wan's FlowUniPCMultistepScheduler (wan/utils/fm_solvers_unipc.py:
    sigma_max = 1 - 1/1000 held in float32, linspace(sigma_max, 0, steps + 1) without its last, then shifted)."""

    def __new__(cls, shift: float):
        from diffusers import UniPCMultistepScheduler

        class Scheduler(UniPCMultistepScheduler):
            def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
                levels = np.linspace(np.float32(0.999).item(), 0.0, num_inference_steps + 1)[:-1]
                super().set_timesteps(sigmas=levels, device=device)

        return Scheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)


def write_wan_release(folder, parts, tmp):
    """Write ``parts`` (diffusers/transformers modules) as an original Wan 2.1 T2V folder."""
    folder.mkdir(parents=True)
    c = parts["transformer"].config
    config = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "t2v",
              "patch_size": list(c.patch_size), "text_len": 512, "in_dim": c.in_channels,
              "dim": c.num_attention_heads * c.attention_head_dim, "ffn_dim": c.ffn_dim, "freq_dim": c.freq_dim,
              "text_dim": c.text_dim, "out_dim": c.out_channels, "num_heads": c.num_attention_heads,
              "num_layers": c.num_layers, "window_size": [-1, -1], "qk_norm": True,
              "cross_attn_norm": c.cross_attn_norm, "eps": c.eps}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    dit = to_wan_state_dict(from_diffusers_state_dict(parts["transformer"].state_dict()))
    save_file({k: v.contiguous() for k, v in dit.items()}, folder / "diffusion_pytorch_model.safetensors")
    parts["vae"].save_pretrained(tmp / "diffusers_vae")
    vae = CausalVAE.from_pretrained(tmp / "diffusers_vae")
    torch.save({k: v.contiguous() for k, v in export_state_dict(vae, wan_key_map(vae)).items()},
               folder / "Wan2.1_VAE.pth")  # fmt: skip
    t5 = to_wan_t5_state_dict(parts["text_encoder"].state_dict())
    torch.save({k: v.clone() for k, v in t5.items()}, folder / WAN_T5_FILE)
    parts["tokenizer"].save_pretrained(str(folder / WAN_TOKENIZER))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(the original folder, the folder converted by ``vidlatent convert``, diffusers' WanPipeline as Wan)."""
    from diffusers import WanPipeline

    tmp = tmp_path_factory.mktemp("wan-original")
    parts = wan_t2v_parts(seed=0, shift=SHIFT)
    folder = tmp / "Wan2.1-T2V-tiny"
    write_wan_release(folder, parts, tmp)
    assert main(["convert", str(folder), "-o", str(tmp / "converted"), "-q"]) == 0
    parts["vae"].register_to_config(latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    ref = WanPipeline(**{**parts, "scheduler": WanLevelsUniPC(SHIFT)})
    ref.set_progress_bar_config(disable=True)
    return folder, tmp / "converted", ref


def start_noise(seed=0):
    return torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(seed))


def wan_reference(ref, noise, steps=8, guidance=5.0):
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=guidance)
    video = ref(**kw, **SIZE, latents=noise.clone(), output_type="pt").frames * 2 - 1  # (b, t, c, h, w)
    return video.permute(0, 2, 1, 3, 4)


def ours(pipe, noise, steps=8, guidance=5.0):
    return pipe.generate(
        PROMPT, NEGATIVE, steps=steps, guidance=guidance, noise=noise.clone(), progress=False
    )


@pytest.mark.slow
def test_converted_original_folder_generates_what_wan_does(release):
    from diffusers import WanPipeline

    folder, converted, ref = release
    assert {p.name for p in converted.iterdir()} == {"vae", "dit", "text_encoder", "pipeline.json"}
    pipe = VideoPipeline.from_pretrained(converted)
    noise = start_noise()
    video = ours(pipe, noise)
    ref_video = wan_reference(ref, noise)
    assert video.shape == ref_video.shape == (1, 3, 9, 64, 64)
    assert (video.clamp(-1, 1) - ref_video).abs().max() <= 1e-3
    assert ref_video.std() > 0.2  # a real video, not a blank one that would match anything
    # diffusers' own UniPC levels give another video: the check above tells the two apart
    plain = WanPipeline(**{**ref.components, "scheduler": make_scheduler("unipc", SHIFT)})
    plain.set_progress_bar_config(disable=True)
    assert (video.clamp(-1, 1) - wan_reference(plain, noise)).abs().max() > 1e-2
    # the original folder loads directly too, and runs exactly as its conversion
    # (two loads of one set of weights: equal up to how CPU kernels round at other memory alignments)
    torch.testing.assert_close(ours(VideoPipeline.from_pretrained(folder), noise), video, rtol=0, atol=1e-5)


def test_wan_unipc_levels_are_wans():
    """Against numbers printed by Wan's own FlowUniPCMultistepScheduler(shift=1).set_timesteps(n, shift=s)."""
    scheduler = make_scheduler("unipc", 5.0)
    set_schedule(scheduler, "unipc", 4, "wan")
    wan = [0.9997998476028442, 0.9372654557228088, 0.8330553770065308, 0.6246873736381531, 0.0]
    assert scheduler.sigmas.tolist() == wan and scheduler.timesteps.tolist() == [999, 937, 833, 624]
    set_schedule(scheduler, "unipc", 50, "wan")
    assert scheduler.timesteps[-6:].tolist() == [487, 448, 405, 356, 302, 241, 172, 92][-6:]
    set_schedule(scheduler, "unipc", 50, "scheduler")  # diffusers' own levels: 1/1000 higher before the shift
    assert scheduler.timesteps[-3:].tolist() == [244, 175, 96]


def test_wan_defaults(release):
    folder, converted, _ = release
    for src in (folder, converted):
        cfg = VideoPipeline.from_pretrained(src).config
        assert (cfg.sampler, cfg.steps, cfg.guidance, cfg.shift) == ("unipc", 50, 5.0, 5.0)
        assert (cfg.frames, cfg.height, cfg.width, cfg.fps) == (81, 480, 832, 16.0)
        assert (cfg.text_attention, cfg.timesteps, cfg.sigmas) == ("all", "scheduler", "wan")
        assert cfg.negative_prompt == WAN_NEGATIVE_PROMPT
        assert WAN_NEGATIVE_PROMPT.startswith("色调艳丽，过曝，静态") and WAN_NEGATIVE_PROMPT.endswith(
            "倒着走"
        )


def test_t5_key_map_is_wans_and_umt5s():
    import transformers as tf

    mapping = wan_t5_key_map(24)
    assert set(REAL_WAN_T5_KEYS) <= set(mapping) and len(mapping) == 2 + 24 * 10
    cfg = tf.UMT5Config(vocab_size=8, d_model=8, d_kv=2, d_ff=8, num_layers=24, num_heads=4)
    with torch.device("meta"):
        names = set(tf.UMT5EncoderModel(cfg).state_dict())
    assert set(mapping.values()) | {"encoder.embed_tokens.weight"} == names


def test_t5_checkpoint_encodes_as_the_umt5_it_came_from(release):
    folder, _, ref = release
    direct = HFTextEncoder(ref.text_encoder, ref.tokenizer, HFTextConfig(max_length=512, clean="wan"))
    for src in (folder, folder / WAN_T5_FILE):
        enc = load_text_encoder(src)
        assert (enc.max_length, enc.config.clean) == (512, "wan")
        tokens, mask = enc.encode([PROMPT, ""])
        ref_tokens, ref_mask = direct.encode([PROMPT, ""])
        assert torch.equal(mask, ref_mask) and (tokens - ref_tokens).abs().max() <= 1e-5


def test_t5_keys_that_do_not_fit_are_listed(release, tmp_path):
    folder, _, _ = release
    state = torch.load(folder / WAN_T5_FILE, weights_only=True)
    state.pop("blocks.1.ffn.fc1.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / WAN_T5_FILE)
    shutil.copytree(folder / WAN_TOKENIZER, tmp_path / WAN_TOKENIZER)
    with pytest.raises(CheckpointMismatchError) as err:
        load_text_encoder(tmp_path / WAN_T5_FILE)
    assert "missing (1): blocks.1.ffn.fc1.weight" in str(err.value)
    assert "unexpected (1): extra.weight" in str(err.value)


def test_a_missing_tokenizer_is_named(release, tmp_path, capsys):
    folder, _, _ = release
    broken = tmp_path / "no-tokenizer"
    shutil.copytree(folder, broken, ignore=shutil.ignore_patterns("google"))
    message = r"lacks google/umt5-xxl/ \(its tokenizer\); such a folder holds"
    with pytest.raises(FileNotFoundError, match=message):
        VideoPipeline.from_pretrained(broken)
    assert main(["convert", str(broken), "-o", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "lacks google/umt5-xxl/" in err and "Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth" in err
    assert not (tmp_path / "out").exists()


def test_convert_can_link_wans_t5(release, tmp_path):
    folder, _, _ = release
    out = tmp_path / "linked"
    assert main(["convert", str(folder), "-o", str(out), "--link-text-encoder", "-q"]) == 0
    saved = json.loads((out / "text_encoder" / "config.json").read_text())
    assert saved["path"] == str((folder / WAN_T5_FILE).resolve())
    assert not (out / "text_encoder" / "hf").exists()
    tokens, _ = load_text_encoder(out / "text_encoder").encode(PROMPT)
    assert torch.equal(tokens, load_text_encoder(folder).encode(PROMPT)[0])
