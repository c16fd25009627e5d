"""LoRA training of the tiny denoiser: only adapter weights move, resume is exact, the exported adapter
(diffusers layout) loads with ``load_lora`` onto the exported base and reproduces the trained model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from media import pattern
from safetensors.torch import load_file

from vidlatent.config import DiTConfig, load_config
from vidlatent.data.io import write_video
from vidlatent.models.dit import VideoDiT
from vidlatent.pipelines.encode import encode_clips
from vidlatent.train import Trainer, load_train_config
from vidlatent.train.lora import load_lora

LORA = [
    "lora_rank=4",
    "lora_alpha=8",
    "train_text_encoder=false",
    "lr=1e-2",
    "ema_decay=0.9",
    "caption_dropout=0.3",
    "checkpoint_every=2",
    "steps=4",
    "progress=false",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_vae) -> Path:
    d = tmp_path_factory.mktemp("lora")
    clips = [d / "a.mp4", d / "b.mp4"]
    for f, phase in zip(clips, (0.0, 1.0)):
        write_video(f, pattern(9, phase=phase), fps=8)
        f.with_suffix(".txt").write_text(f"clip {f.stem}\n")
    encode_clips(clips, d / "latents", tiny_vae, progress=False, num_workers=0)
    # a "pretrained" base: a fresh preset's zero-initialized head and gates would pass no adapter a gradient
    torch.manual_seed(0)
    dit = VideoDiT(load_config(DiTConfig, "dit", "tiny", overrides=["in_channels=4", "out_channels=4"]))
    with torch.no_grad():  # as trained weights would be: no zero gates, modulation or head
        for p in dit.parameters():
            p.normal_(0, 0.05) if p.ndim >= 2 else p.add_(torch.randn_like(p), alpha=0.05)
    dit.save_pretrained(d / "base")
    return d


def config(data, output, *overrides):
    args = [f"data={data / 'latents'}", f"dit={data / 'base'}", f"output={output}", *LORA, *overrides]
    return load_train_config("tiny", overrides=args)


def test_lora_trains_only_adapters_resumes_and_exports(data, tmp_path):
    trainer = Trainer(config(data, tmp_path / "whole"))
    assert trainer.params and all(".lora_" in k for k in trainer.params)
    base = {k: v.clone() for k, v in trainer.dit.state_dict().items() if ".lora_" not in k}
    lora_b = {k: p.detach().clone() for k, p in trainer.params.items() if "lora_B" in k}
    text = {k: v.clone() for k, v in trainer.text_encoder.state_dict().items()}
    expected = trainer.train()
    assert len(expected) == 4
    after = trainer.dit.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # frozen base
    assert all(torch.equal(trainer.text_encoder.state_dict()[k], v) for k, v in text.items())
    assert all(not torch.equal(trainer.params[k], v) for k, v in lora_b.items())  # B moved from zero
    ckpt = load_file(tmp_path / "whole" / "checkpoints" / "step-0000004" / "model.safetensors")
    assert set(ckpt) == set(trainer.params)  # checkpoints hold the adapter only

    first = Trainer(config(data, tmp_path / "split"))
    head = first.train(until=2)
    second = Trainer(config(data, tmp_path / "split", "resume=auto"))
    tail = second.train()
    assert head + tail == pytest.approx(expected, abs=1e-6)
    resumed = load_file(tmp_path / "split" / "checkpoints" / "step-0000004" / "ema.safetensors")
    whole = load_file(tmp_path / "whole" / "checkpoints" / "step-0000004" / "ema.safetensors")
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], atol=1e-6, rtol=0)

    final = tmp_path / "whole" / "final"
    assert (final / "lora.safetensors").is_file() and (final / "text_encoder").is_dir()
    assert not (final / "dit").exists()  # the base is the folder the run started from
    keys = load_file(final / "lora.safetensors")
    assert all(k.startswith("transformer.") for k in keys)  # diffusers layout
    dit = load_lora(VideoDiT.from_pretrained(data / "base"), final / "lora.safetensors").eval()
    z = trainer.dataset[0][0][None]
    context, mask = trainer.text_encoder.encode(["clip a"])
    sigma = torch.tensor([0.6])
    with torch.no_grad(), trainer.ema_weights():
        trainer.dit.eval()
        want = trainer.dit(z, sigma, context, mask)
        got = dit(z, sigma, context, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(
        got, VideoDiT.from_pretrained(data / "base")(z, sigma, context, mask), atol=1e-4
    )
