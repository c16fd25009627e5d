"""One meaning per name: "default" is the shipped model's trained weights to every public loader; the random-weight
architecture presets it was trained from are named ``default-arch*``."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from vidlatent import CausalVAE, VideoDiT
from vidlatent.checkpoint import SHIPPED_MODELS, WEIGHTS_DIR, named_part, resolve_source, shipped_model
from vidlatent.config import DiTConfig, TextConfig, VAEConfig, list_presets, load_config
from vidlatent.models.control import ControlBranch
from vidlatent.models.image import load_image_encoder
from vidlatent.models.text import BuiltinTextEncoder, TextEncoder, load_text_encoder
from vidlatent.pipelines.encode import load_vae


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


LOADERS = {
    "vae": (lambda: CausalVAE.from_pretrained("default"), lambda pipe: pipe.vae),
    "vae (load_vae)": (lambda: load_vae("default")[0], lambda pipe: pipe.vae),
    "dit": (lambda: VideoDiT.from_pretrained("default"), lambda pipe: pipe.dit),
    "text": (lambda: load_text_encoder("default"), lambda pipe: pipe.text_encoder),
    "text (class)": (lambda: BuiltinTextEncoder.from_pretrained("default"), lambda pipe: pipe.text_encoder),
    "text (base class)": (lambda: TextEncoder.from_pretrained("default"), lambda pipe: pipe.text_encoder),
}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_every_loader_s_default_is_the_pipeline_s_part(default_pipe, loader):
    load, part = LOADERS[loader]
    mine, theirs = load(), part(default_pipe)
    assert type(mine) is type(theirs)
    assert mine.config == theirs.config
    assert same_weights(mine, theirs)


def test_a_working_folder_named_default_does_not_hide_the_shipped_model(default_pipe, tmp_path, monkeypatch):
    """A folder ./default that holds no model (a recipe's output, ``train_default.py --out default``, holds run
    folders) is not taken for a model folder: every loader gives the shipped parts and warns once; a folder of
    that name that holds a model is read as the path it is."""
    from vidlatent import VideoPipeline

    monkeypatch.chdir(tmp_path)
    (tmp_path / "default" / "dit-cpu" / "final").mkdir(parents=True)
    for name, (load, part) in LOADERS.items():
        with pytest.warns(UserWarning, match="holds no model") as caught:
            mine = load()
        assert len(caught) == 1, name
        assert same_weights(mine, part(default_pipe)), name
    with pytest.warns(UserWarning, match="holds no model"):
        pipe = VideoPipeline.from_pretrained("default")
    assert same_weights(pipe.dit, default_pipe.dit)
    (tmp_path / "default" / "config.json").write_text("{}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        source = resolve_source("default", "vae")
    assert source.path == Path("default") and source.kind == "folder"


@pytest.mark.parametrize(("kind", "part"), [("control", "control_branch"), ("image", "image_encoder")])
def test_optional_parts_default_is_the_pipeline_s_or_a_clear_error(default_pipe, kind, part):
    """The control branch and the image encoder load the shipped ones where the default model has them; where it
    has none (the pipeline's part is None), the error says so rather than reading a folder named "default"."""
    load = {"control": ControlBranch.from_pretrained, "image": load_image_encoder}[kind]
    theirs = getattr(default_pipe, part)
    if theirs is None:
        with pytest.raises(FileNotFoundError, match="the shipped default model has no"):
            load("default")
    else:
        assert same_weights(load("default"), theirs)


def test_default_outputs_are_the_pipeline_s(default_pipe):
    """Not only equal weights: the same numbers out of the standalone parts, on two sizes and seeds."""
    vae, dit, text = (
        CausalVAE.from_pretrained("default"),
        VideoDiT.from_pretrained("default"),
        load_text_encoder("default"),
    )
    for seed, (t, h) in enumerate([(5, 32), (1, 16)]):
        g = torch.Generator().manual_seed(seed)
        video = torch.rand(1, 3, t, h, h, generator=g) * 2 - 1
        with torch.no_grad():
            torch.testing.assert_close(
                vae.encode(video).mean, default_pipe.vae.encode(video).mean, rtol=0, atol=0
            )
            tokens, mask = text.encode(["a green square moving up"])
            ref_tokens, _ = default_pipe.text_encoder.encode(["a green square moving up"])
            torch.testing.assert_close(tokens, ref_tokens, rtol=0, atol=0)
            z = torch.randn(1, 16, 1 + (t - 1) // 4, h // 8, h // 8, generator=g)
            sigma = torch.rand(1, generator=g)
            out = dit(z, sigma, tokens, mask)
            torch.testing.assert_close(out, default_pipe.dit(z, sigma, tokens, mask), rtol=0, atol=0)


def test_arch_presets_build_the_shipped_layout_with_fresh_weights(default_pipe):
    """``default-arch`` is the random-weight preset of the shipped architecture: same config, other weights."""
    vae = CausalVAE.from_pretrained("default-arch")
    shipped = default_pipe.vae.config
    fresh = load_config(VAEConfig, "vae", "default-arch")
    assert (fresh.base_channels, fresh.channel_mult, fresh.latent_channels) == (
        shipped.base_channels,
        shipped.channel_mult,
        shipped.latent_channels,
    )
    assert vae.state_dict().keys() == default_pipe.vae.state_dict().keys() and not same_weights(
        vae, default_pipe.vae
    )
    dit_cfg = load_config(DiTConfig, "dit", "default-arch")
    for field in ("dim", "num_layers", "num_heads", "patch_size", "ffn_dim", "text_dim"):
        assert getattr(dit_cfg, field) == getattr(default_pipe.dit.config, field), field
    text_cfg = load_config(TextConfig, "text", "default-arch")
    assert text_cfg.vocab == default_pipe.text_encoder.config.vocab
    text = load_text_encoder("default-arch")
    assert not same_weights(text, default_pipe.text_encoder)


def test_no_preset_is_named_like_a_shipped_model():
    """A name means one thing: no yaml preset of any kind is called like a shipped model."""
    for kind in ("vae", "dit", "text", "pipeline"):
        assert not set(list_presets(kind)) & set(SHIPPED_MODELS), kind


def test_the_old_preset_name_says_where_the_architecture_went():
    for cls, kind in ((VAEConfig, "vae"), (DiTConfig, "dit"), (TextConfig, "text")):
        with pytest.raises(ValueError, match="'default-arch'"):
            load_config(cls, kind, "default")


def test_resolver_tells_shipped_names_presets_and_paths(tmp_path, monkeypatch):
    for kind, sub in (("vae", "vae"), ("dit", "dit"), ("text", "text_encoder"), ("pipeline", ".")):
        source = resolve_source("default", kind)
        assert (source.kind, source.name, source.path) == (
            "vidlatent",
            "default",
            (WEIGHTS_DIR / "default" / sub).resolve(),
        )
    assert resolve_source("default-arch", "vae").kind == "preset"
    assert resolve_source("tiny", "dit").kind == "preset"
    with pytest.raises(FileNotFoundError, match="shipped models \\(trained weights\\): default"):
        resolve_source("nope", "text")
    # an existing folder called "default" in the working directory that holds a model is that folder, as every
    # path comes first (one that holds none: test_a_working_folder_named_default_does_not_hide_the_shipped_model)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default" / "vae").mkdir(parents=True)
    assert resolve_source("default", "vae").path.resolve() == (tmp_path / "default").resolve()
    assert named_part("default", "control") == "default"
    with pytest.raises(ValueError, match="no shipped model 'nope'"):
        shipped_model("nope")


def test_a_missing_part_of_a_shipped_model_is_named(tmp_path, monkeypatch):
    import vidlatent.checkpoint as checkpoint

    (tmp_path / "default" / "dit").mkdir(parents=True)
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="the shipped default model has no VAE"):
        CausalVAE.from_pretrained("default")
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="the default model is not installed"):
        VideoDiT.from_pretrained("default")
