"""fp8 weight storage (``vidlatent.runtime.fp8``): what is stored in fp8, its bytes, its error, its errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from vidlatent import VideoPipeline
from vidlatent.config import DiTConfig, load_config
from vidlatent.models.dit import VideoDiT, _cast
from vidlatent.runtime import Float8Linear, parameter_bytes, quantize
from vidlatent.runtime.offload import pipeline_placement

JOB = dict(frames=5, height=32, width=32, steps=3, guidance=3.0, progress=False)


def random_dit(seed: int, layers: int = 2, dim: int = 64) -> VideoDiT:
    cfg = load_config(DiTConfig, "dit", "tiny", overrides=[f"num_layers={layers}", f"dim={dim}"])
    torch.manual_seed(seed)
    model = VideoDiT(cfg).eval()
    with torch.no_grad():  # non-zero gates and head, so the blocks and the head reach the output
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def inputs(model: VideoDiT, seed: int, b: int = 2):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(b, cfg.in_channels, 3, 8, 8, generator=g)
    return x, torch.rand(b, generator=g), torch.randn(b, 7, cfg.text_dim, generator=g)


def test_only_block_linears_are_stored_in_fp8():
    model = random_dit(0)
    before = {n: (p.dtype, p.data_ptr()) for n, p in model.named_parameters()}
    count = quantize(model)
    linears = [m for b in model.blocks for m in b.modules() if isinstance(m, Float8Linear)]
    assert count == len(linears) == 2 * 10  # q k v out of both attentions, fc1 fc2 of the feed-forward
    assert not any(type(m) is nn.Linear for b in model.blocks for m in b.modules())
    for m in linears:
        assert m.weight_fp8.dtype == torch.float8_e4m3fn and m.weight_scale.dtype == torch.float32
    after = {n: (p.dtype, p.data_ptr()) for n, p in model.named_parameters()}
    # every parameter left (embedders, time modulation, head, norms, modulation tables, biases) is untouched
    assert all(after[n] == before[n] for n in after)
    in_blocks = [n for n in after if n.startswith("blocks.")]
    assert in_blocks and all(n.endswith((".bias", "modulation")) or "norm" in n for n in in_blocks)
    assert type(model.time_modulation) is nn.Linear and type(model.head.proj) is nn.Linear


@pytest.mark.parametrize("preset", ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b"])
def test_parameter_bytes_about_halved_vs_bf16(preset):
    with torch.device("meta"):
        model = _cast(VideoDiT(load_config(DiTConfig, "dit", preset)), torch.bfloat16)
    bf16 = parameter_bytes(model)
    quantize(model)
    assert (
        0.50 < parameter_bytes(model) / bf16 < 0.53
    )  # the fp32 tables, embedders and head stay as they were


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_close_to_unquantized(seed, dtype):
    ref = _cast(random_dit(seed, dim=64 + 32 * seed), dtype)
    q = copy.deepcopy(ref)
    quantize(q)
    args = inputs(ref, seed)
    with torch.no_grad():
        a, b = ref(*args).float(), q(*args).float()
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel < 0.06, rel  # e4m3 rounds each weight by up to 1/16 of itself


@pytest.mark.parametrize("seed", [0, 5])
def test_per_channel_beats_per_tensor_on_unequal_rows(seed):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(64, 32)
    with torch.no_grad():  # rows whose sizes span 3 decades, as trained layers' rows differ
        linear.weight.copy_(torch.randn(32, 64, generator=g) * torch.logspace(-3, 0, 32)[:, None])
    w = linear.weight.detach()
    err = {per: (Float8Linear(linear, per).dequantized(torch.float32) - w).norm() / w.norm()
           for per in ("channel", "tensor")}  # fmt: skip
    assert err["channel"] < err["tensor"] and err["channel"] < 0.04


def test_pipeline_fp8_and_offload_compose():
    plain = VideoPipeline.from_pretrained("tiny")
    pipe = VideoPipeline.from_pretrained("tiny", weights_dtype="fp8")
    want = plain.generate("a red circle", seed=0, **JOB)
    got = pipe.generate("a red circle", seed=0, **JOB)
    assert torch.isfinite(got).all() and 0 < (got - want).abs().max() < 0.2
    placed = copy.deepcopy(pipe)
    placed.weights_placement = pipeline_placement(placed, "blocks", "cpu", transfer=lambda t, d: t.clone())
    assert torch.equal(placed.generate("a red circle", seed=0, **JOB), got)  # fp8 buffers stream too


def test_saving_fp8_weights_fails_before_writing_anything(tmp_path):
    """A checkpoint of fp8 blocks would hold weight_fp8 / weight_scale in place of weight, which no loader reads:
    saving says so and writes nothing; the same pipeline without fp8 saves and loads back."""
    pipe = VideoPipeline.from_pretrained("tiny", weights_dtype="fp8")
    with pytest.raises(
        ValueError, match=r"stored as fp8 \(\d+ linear layers, e.g. blocks\.0\..*without weights_dtype"
    ):
        pipe.save_pretrained(tmp_path / "fp8")
    assert not (tmp_path / "fp8").exists()
    with pytest.raises(ValueError, match="stored as fp8"):
        pipe.dit.save_pretrained(tmp_path / "dit")
    VideoPipeline.from_pretrained("tiny").save_pretrained(tmp_path / "plain")
    assert VideoPipeline.from_pretrained(tmp_path / "plain").dit.check_saveable() is None


def test_unknown_weights_dtype_is_one_line():
    with pytest.raises(ValueError, match="accepted: None") as err:
        VideoPipeline.from_pretrained("tiny", weights_dtype="int4")
    assert len(str(err.value).splitlines()) == 1


def test_torch_without_float8_is_one_line(monkeypatch):
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(RuntimeError, match=r"needs torch.float8_e4m3fn .* this torch \S+ has none") as err:
        VideoPipeline.from_pretrained("tiny", weights_dtype="fp8")
    assert len(str(err.value).splitlines()) == 1
