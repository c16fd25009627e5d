"""The attention kernel as a checked named choice, and regional compilation (``vidlatent.runtime.kernels``)."""

from __future__ import annotations

import copy

import pytest
import torch

from vidlatent import VideoPipeline
from vidlatent.models.layers import ATTENTION_BACKENDS
from vidlatent.runtime import check_attention, compile_blocks, installed_packages, working_backends

JOB = dict(frames=5, height=32, width=32, steps=2, guidance=3.0, progress=False)


@pytest.fixture(scope="module")
def tiny():
    return VideoPipeline.from_pretrained("tiny")


def test_the_choices_include_the_optional_packages():
    assert set(ATTENTION_BACKENDS) == {"sdpa", "cudnn", "flash", "efficient", "math", "flash_attn", "sage"}


@pytest.mark.parametrize("head_dim", [32, 64])
def test_cpu_backends_work_and_the_others_say_what_does(head_dim):
    works = working_backends("cpu", torch.float32, head_dim)
    assert {"sdpa", "math"} <= set(works) and "cudnn" not in works
    for backend in set(ATTENTION_BACKENDS) - set(works):
        with pytest.raises(ValueError, match=f"attention '{backend}' cannot run on cpu") as err:
            check_attention(backend, "cpu", torch.float32, head_dim)
        msg = str(err.value)
        assert len(msg.splitlines()) == 1 and f"works here: {', '.join(works)}" in msg
        assert f"optional packages installed: {', '.join(installed_packages()) or 'none'}" in msg
    for backend in works:
        assert check_attention(backend, "cpu", torch.float32, head_dim) == backend


def test_missing_package_is_named():
    if "flash_attn" in installed_packages():
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ValueError, match=r"\(the flash_attn package is not installed\)"):
        check_attention("flash_attn", "cpu", torch.float32, 64)


def test_unknown_attention_is_one_line():
    with pytest.raises(ValueError, match="unknown attention 'fast'; accepted: sdpa, cudnn") as err:
        VideoPipeline.from_pretrained("tiny", attention="fast")
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize("backend", ["math", "flash"])
def test_pipeline_attention_choice(tiny, backend):
    if backend not in working_backends("cpu", torch.float32, tiny.dit.head_dim):
        pytest.skip(f"{backend} does not run on this CPU")
    pipe = VideoPipeline.from_pretrained("tiny", attention=backend)
    assert {m.backend for m in pipe.dit.modules() if hasattr(m, "backend")} == {backend}
    want = tiny.generate("a red circle", seed=0, **JOB)
    assert torch.allclose(pipe.generate("a red circle", seed=0, **JOB), want, atol=1e-4)


@pytest.mark.slow
def test_compile_blocks_traces_the_block_once_and_matches_eager(tiny):
    torch._dynamo.reset()
    dit = copy.deepcopy(tiny.dit)
    dit.blocks.extend(copy.deepcopy(dit.blocks))  # 4 blocks, one compiled graph
    eager = copy.deepcopy(dit)
    assert compile_blocks(dit) == 4
    from torch._dynamo.utils import counters

    counters.clear()
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, dit.config.in_channels, 2, 8, 8, generator=g)
        args = (x, torch.rand(2, generator=g), torch.randn(2, 5, dit.config.text_dim, generator=g))
        with torch.no_grad():
            torch.testing.assert_close(dit(*args), eager(*args), atol=1e-5, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1
