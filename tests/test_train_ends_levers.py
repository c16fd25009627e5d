"""Memory and speed levers of a training step: gradient checkpointing per block (DiT, LoRA, control branch),
bf16 autocast over fp32 master weights, the optimizer choice (8-bit AdamW through bitsandbytes), the step's
peak memory, tokens/s and TFLOP/s in metrics.jsonl, and torch.compile with LoRA and under DDP."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from media import pattern

from vidlatent.config import DiTConfig, control_config_for, load_config
from vidlatent.data.io import write_video
from vidlatent.models.control import ControlBranch, ControlledDiT
from vidlatent.models.dit import VideoDiT
from vidlatent.pipelines.encode import encode_clips
from vidlatent.train import Trainer, load_train_config, optim
from vidlatent.train.lora import add_lora


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_vae) -> Path:
    """Two captioned 9-frame clips' latents (one bucket) and a 5-frame one."""
    d = tmp_path_factory.mktemp("levers")
    clips = []
    for i, frames in enumerate((9, 9, 5)):
        f = d / f"c{i}.mp4"
        write_video(f, pattern(frames, phase=float(i)), fps=8)
        f.with_suffix(".txt").write_text(f"clip {i}\n")
        clips.append(f)
    assert len(encode_clips(clips, d / "latents", tiny_vae, progress=False, num_workers=0).done) == 3
    return d / "latents"


def options(data: Path, output: Path, *more: str) -> list[str]:
    return [f"data={data}", f"output={output}", "progress=false", "device=cpu", "steps=2", *more]


# ------------------------------------------------------------------------------ gradient checkpointing


def seeded_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn at random (zero-initialised gates and projections would hide gradients)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def grads_with_and_without_checkpointing(model, blocks, inputs: dict) -> tuple[list, list, list[int]]:
    """The trainable parameters' gradients of a sum of the output, without and with checkpointing, and how
    many times the blocks started a forward in each (checkpointing reruns each block in the backward)."""
    calls = [0]
    hooks = [b.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for b in blocks]
    out, counts = [], []
    for on in (False, True):
        for holder in {id(m): m for m in model.modules() if hasattr(m, "gradient_checkpointing")}.values():
            holder.gradient_checkpointing = on
        model.zero_grad(set_to_none=True)
        calls[0] = 0
        y = model(**inputs).float()
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(5))).sum().backward()
        out.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        counts.append(calls[0])
    for h in hooks:
        h.remove()
    return out[0], out[1], counts


def dit_inputs(cfg: DiTConfig, shape: tuple[int, int, int], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    t, h, w = shape
    return {
        "x": torch.randn(2, cfg.in_channels, t, h, w, generator=g),
        "sigma": torch.rand(2, generator=g),
        "context": torch.randn(2, 6, cfg.text_dim, generator=g),
    }


@pytest.mark.parametrize("kind", ["dit", "lora", "control"])
@pytest.mark.parametrize("seed, shape", [(0, (3, 8, 8)), (1, (1, 4, 12))])
def test_gradient_checkpointing_gives_the_same_gradients(kind, seed, shape):
    cfg = load_config(DiTConfig, "dit", "tiny", overrides=["num_layers=3"])
    torch.manual_seed(seed)
    dit = seeded_(VideoDiT(cfg), seed)
    model, blocks, inputs = dit, list(dit.blocks), dit_inputs(cfg, shape, seed)
    if kind == "lora":
        add_lora(dit, rank=4)
        seeded_(dit, seed)  # B too, so the adapters' gradients are not zero
        for name, p in dit.named_parameters():
            p.requires_grad_("lora_" in name)
    if kind == "control":
        branch = seeded_(ControlBranch(control_config_for(cfg, layers=[0, 2], in_channels=8)), seed + 1)
        dit.requires_grad_(False)
        model, blocks = ControlledDiT(dit, branch), [*dit.blocks, *branch.blocks]
        g = torch.Generator().manual_seed(seed + 2)
        inputs["control"] = torch.randn(2, 8, *shape, generator=g)
    plain, checkpointed, calls = grads_with_and_without_checkpointing(model, blocks, inputs)
    # checkpointing really reran the blocks, each one the backward passes through: all but the frozen
    # denoiser's block 0 under a control branch (nothing before it trains)
    rerun = len(blocks) - (kind == "control")
    assert calls == [len(blocks), len(blocks) + rerun]
    assert len(plain) == len(checkpointed) > 0
    scale = max(g.abs().max().item() for g in plain)
    assert scale > 0
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6 * scale)


# ------------------------------------------------------------------------------ precision and optimizer


def test_bf16_autocasts_the_step_over_fp32_master_weights(data, tmp_path):
    """``mixed_precision=bf16``: the blocks compute in bf16; weights, gradients and AdamW moments stay fp32."""
    trainer = Trainer(
        load_train_config("tiny", overrides=options(data, tmp_path / "run", "mixed_precision=bf16"))
    )
    seen = []
    hook = trainer.dit.blocks[0].mlp.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer.train_step()
    hook.remove()
    assert seen == [torch.bfloat16]
    params = list(trainer.params.values())
    assert params and all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params)
    states = [s for p in params for s in trainer.optimizer.state[p].values() if s.dim()]
    assert states and all(s.dtype == torch.float32 for s in states)


def test_optimizer_choice_and_a_clear_error_without_bitsandbytes(data, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'; accepted: adamw, adamw8bit"):
        load_train_config("tiny", overrides=options(data, tmp_path / "a", "optimizer=sgd"))
    monkeypatch.setattr(optim.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="adamw8bit needs bitsandbytes, which is not installed"):
        load_train_config("tiny", overrides=options(data, tmp_path / "a", "optimizer=adamw8bit"))


def test_adamw8bit_is_bitsandbytes_optimizer_and_resumes(data, tmp_path, monkeypatch):
    """With a stand-in ``bitsandbytes`` module (the real one needs a CUDA GPU), the trainer builds its
    ``AdamW8bit`` with the run's settings, steps with it, and resumes its state from a checkpoint."""
    built = []

    class AdamW8bit(torch.optim.AdamW):
        def __init__(self, params, **kw):
            built.append(kw)
            super().__init__(params, **kw)

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=AdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    monkeypatch.setattr(optim.importlib.util, "find_spec", lambda name: object())
    run = options(data, tmp_path / "run", "optimizer=adamw8bit", "lr=3e-3", "steps=4", "checkpoint_every=2")
    whole = Trainer(load_train_config("tiny", overrides=run))
    assert isinstance(whole.optimizer, AdamW8bit) and not whole.fused
    assert built[0] == {"lr": 3e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    expected = whole.train()
    split = options(
        data, tmp_path / "split", "optimizer=adamw8bit", "lr=3e-3", "steps=4", "checkpoint_every=2"
    )
    head = Trainer(load_train_config("tiny", overrides=split)).train(until=2)
    tail = Trainer(load_train_config("tiny", overrides=[*split, "resume=auto"])).train()
    assert head + tail == pytest.approx(expected, abs=1e-6)


def test_metrics_report_peak_memory_tokens_and_tflops(data, tmp_path):
    Trainer(load_train_config("tiny", overrides=options(data, tmp_path / "run", "steps=3"))).train()
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for r in rows:
        assert 0.05 < r["peak_mem_gib"] < 64  # the CPU: the process's peak RSS (at least torch itself)
        assert r["tokens_per_s"] > 0 and r["tflop_s"] > 0
    assert [r["peak_mem_gib"] for r in rows] == sorted(r["peak_mem_gib"] for r in rows)  # a peak never falls


# ------------------------------------------------------------------------------ compile


needs_compiler = pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on a CPU needs g++")


@pytest.mark.slow
@needs_compiler
def test_compiled_blocks_train_a_lora_like_eager_ones(data, tmp_path):
    lora = ["lora_rank=4", "lora_alpha=8", "lr=3e-3", "steps=3"]
    torch._dynamo.reset()
    plain = Trainer(load_train_config("tiny", overrides=options(data, tmp_path / "a", *lora))).train()
    torch._dynamo.utils.counters.clear()
    run = options(data, tmp_path / "b", *lora, "compile=true")
    compiled = Trainer(load_train_config("tiny", overrides=run))
    got = compiled.train()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the blocks really ran compiled
    assert got == pytest.approx(plain, rel=1e-4)
    assert (tmp_path / "b" / "final" / "lora.safetensors").is_file()


@pytest.mark.slow
@needs_compiler
def test_compiled_blocks_under_ddp_train_like_one_eager_process(data, tmp_path):
    from test_distributed import losses, torchrun

    run = ["steps=3", "lr=1e-3", "caption_dropout=0.5", "progress=false", "device=cpu"]
    one = Trainer(load_train_config("tiny", overrides=[f"data={data}", f"output={tmp_path / 'one'}",
                                                       "batch_size=2", *run]))  # fmt: skip
    expected = one.train()
    torchrun(f"data={data}", f"output={tmp_path / 'ddp'}", "batch_size=1", "compile=true", *run)
    assert losses(tmp_path / "ddp") == pytest.approx(expected, rel=1e-4)
