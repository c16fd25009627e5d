"""Offload (``vidlatent.runtime.offload``): outputs equal the plain run, and weights are where the placement says.

There is no accelerator here, so the tests place onto a fake one: the CPU, with a transfer that clones (a
real copy, so a weight read from the host instead of its copy is told apart by its storage) and counts.
"""

from __future__ import annotations

import copy
import gc
import os
import warnings

import pytest
import torch
from safetensors.torch import save_file

from vidlatent import VideoPipeline
from vidlatent.runtime import OFFLOAD_MODES, pipeline_placement

JOB = dict(frames=5, height=32, width=32, steps=3, guidance=3.0, progress=False)


def clone(tensor, device):
    return tensor.clone()


@pytest.fixture(scope="module")
def tiny():
    return VideoPipeline.from_pretrained("tiny")


def placed(pipe, mode, resident=2):
    pipe = copy.deepcopy(pipe)
    pipe.weights_placement = pipeline_placement(pipe, mode, "cpu", resident=resident, transfer=clone)
    return pipe


def on_accelerator(group) -> bool:
    """Whether every weight of a group points at its copy (not at its host tensor)."""
    return all(t.data_ptr() != host.data_ptr() for t, host in group.slots)


def on_host(group) -> bool:
    return all(t.data_ptr() == host.data_ptr() for t, host in group.slots)


@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("mode", ["model", "blocks"])
def test_offload_equals_plain_run(tiny, mode, seed):
    want = tiny.generate(["a red circle", "a blue square"], seed=seed, **JOB)
    pipe = placed(tiny, mode)
    got = pipe.generate(["a red circle", "a blue square"], seed=seed, **JOB)
    assert torch.equal(got, want)
    loads = pipe.weights_placement.loads
    assert loads["denoiser"] == 1 and loads["vae"] == 1  # each part goes once per job, not once per step
    assert loads["text_encoder"] == 1


def test_model_offload_one_part_at_a_time(tiny):
    pipe = placed(tiny, "model")
    parts = pipe.weights_placement.parts
    seen = []

    def spy(module, args):
        seen.append({name: on_accelerator(g) for name, g in parts.items()})

    pipe.dit.register_forward_pre_hook(spy)
    video = pipe.generate("a red circle", seed=1, **JOB)
    assert len(seen) == JOB["steps"]
    assert all(s == {"text_encoder": False, "denoiser": True, "vae": False} for s in seen)
    assert on_accelerator(parts["vae"]) and on_host(parts["denoiser"]) and on_host(parts["text_encoder"])
    assert torch.equal(pipe.encode(video), tiny.encode(video))  # encode brings the VAE too, and is the same
    assert pipe.device == torch.device("cpu")


@pytest.mark.parametrize("resident", [1, 2, 3])
def test_blocks_stream_with_a_bounded_number_resident(resident):
    pipe = VideoPipeline.from_pretrained("tiny", overrides=None)
    pipe.dit.blocks.extend(copy.deepcopy(pipe.dit.blocks))  # 4 blocks
    plain = copy.deepcopy(pipe)
    pipe = placed(pipe, "blocks", resident)
    placement, n = pipe.weights_placement, 4
    placement.log = []
    inside = []
    for i, block in enumerate(pipe.dit.blocks):  # registered after the placement's hooks: runs after them
        block.register_forward_pre_hook(lambda m, a, i=i: inside.append(on_accelerator(placement.blocks[i])))
    got = pipe.generate("a red circle", seed=2, **JOB)
    assert torch.equal(got, plain.generate("a red circle", seed=2, **JOB))
    steps = JOB["steps"]
    assert len(placement.log) == steps * n and all(inside)
    for i, resident_now in placement.log:
        assert resident_now == sorted((i + k) % n for k in range(resident))
    assert placement.max_resident == resident
    # block j < resident - 1 is prefetched once more at the end of the last step (then dropped for the VAE)
    for j in range(n):
        assert placement.loads[f"block {j}"] == steps + (j < resident - 1)
    assert all(on_host(b) for b in placement.blocks) and on_host(placement.parts["denoiser"])


def test_blocks_gathers_decoded_frames_on_the_host(tiny):
    pipe = placed(tiny, "blocks")
    z = tiny.generate("a red circle", seed=0, output_type="latent", **JOB)
    assert torch.equal(pipe.decode(z), tiny.decode(z))


def test_offload_without_accelerator_runs_plainly(tiny):
    want = tiny.generate("a red circle", seed=4, **JOB)
    with pytest.warns(UserWarning, match="needs an accelerator") as caught:
        pipe = VideoPipeline.from_pretrained("tiny", device="cpu", offload="blocks")
    assert len(caught) == 1 and len(str(caught[0].message).splitlines()) == 1
    assert pipe.weights_placement is None
    assert torch.equal(pipe.generate("a red circle", seed=4, **JOB), want)


@pytest.mark.parametrize("bad", ["disk", "Model", ""])
def test_unknown_offload_is_one_line(bad):
    with pytest.raises(ValueError, match="accepted: none, model, blocks") as err:
        VideoPipeline.from_pretrained("tiny", offload=bad)
    assert len(str(err.value).splitlines()) == 1
    assert set(OFFLOAD_MODES) == {"none", "model", "blocks"}


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
@pytest.mark.parametrize("mode", ["model", "blocks"])
def test_repeated_pipelines_do_not_grow_rss(mode):
    """The default model loaded, placed, run and dropped 6 times: RSS after the last within 10% of after the
    first (each pipeline holds ~28 MB of weights, so a leak of one would show)."""
    sizes = []
    for _ in range(6):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = VideoPipeline.from_pretrained("default")
        pipe.weights_placement = pipeline_placement(pipe, mode, "cpu", transfer=clone)
        pipe.generate("a red circle", frames=1, height=16, width=16, steps=1, progress=False, seed=0)
        del pipe
        gc.collect()
        sizes.append(rss())
    assert sizes[-1] <= 1.10 * sizes[0], [f"{s / 2**20:.0f} MiB" for s in sizes]


@pytest.mark.parametrize("mode", ["model", "blocks"])
def test_lora_fused_after_placement_is_what_runs(tiny, mode, tmp_path):
    """Fusing writes into the host weights (the parts wait there between jobs), which the next copies carry."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for name in ("blocks.0.self_attn.q", "blocks.1.cross_attn.v"):  # the same names in Wan's layout
        layer = tiny.dit.get_submodule(name)
        state[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(4, layer.in_features, generator=g)
        state[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(layer.out_features, 4, generator=g) / 4
    save_file(state, tmp_path / "style.safetensors")
    plain, pipe = copy.deepcopy(tiny), placed(tiny, mode)
    before = pipe.generate("a red circle", seed=5, **JOB)
    for p in (plain, pipe):
        p.load_lora(tmp_path / "style.safetensors")
        p.fuse_lora()
    got = pipe.generate("a red circle", seed=5, **JOB)
    assert torch.equal(got, plain.generate("a red circle", seed=5, **JOB)) and not torch.equal(got, before)
