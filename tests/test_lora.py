"""LoRA on VideoDiT: zero-start injection, training only adapters, merge/unmerge/remove, save/load in every
layout, loading our diffusers-layout file into diffusers' WanTransformer3DModel, and clear mismatch errors."""

import copy

import pytest
import torch
from diffusers import WanPipeline
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from test_dit import max_rel_diff

from vidlatent.checkpoint import CheckpointMismatchError
from vidlatent.models.dit import VideoDiT
from vidlatent.train.lora import (
    add_lora,
    load_lora,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    remove_lora,
    save_lora,
    unmerge_lora,
)


def run(dit, batch):
    with torch.no_grad():
        return dit(*batch)


def randomize_b(dit, seed=0, adapter="default"):
    """Give every B random values so the adapter visibly changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(dit, adapter)[1::2]:
            p.copy_(0.5 * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


@pytest.fixture
def lora_dit(twins):
    ours = add_lora(copy.deepcopy(twins[0]), rank=4, alpha=8)
    randomize_b(ours)
    return ours


@pytest.mark.slow  # measured over ~4 s on 2 idle cores; run by .ci/run in its slow step
def test_injection_starts_as_identity_and_trains_only_adapters(twins, batch):
    base = twins[0]
    ours = add_lora(copy.deepcopy(base), rank=4, alpha=8)
    assert isinstance(ours, VideoDiT)
    assert torch.equal(run(ours, batch), run(base, batch))
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    layers = {n for n, m in ours.named_modules() if isinstance(m, LoraLayer)}
    assert len(layers) == 2 * 10  # 2 blocks x (self q k v out, cross q k v out, fc1, fc2)
    assert len(trainable) == 2 * len(layers) and all(".lora_A." in n or ".lora_B." in n for n in trainable)

    frozen = {n: p.detach().clone() for n, p in ours.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(lora_parameters(ours), lr=1e-2)
    x, sigma, context = batch
    for _ in range(3):
        loss = (ours(x, sigma, context) - x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (run(ours, batch) - run(base, batch)).abs().max() > 1e-3
    assert all(torch.equal(p, frozen[n]) for n, p in ours.named_parameters() if n in frozen)

    ffn_only = add_lora(copy.deepcopy(base), rank=2, targets=("ffn",))
    names = [n for n, m in ffn_only.named_modules() if isinstance(m, LoraLayer)]
    assert names == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        add_lora(copy.deepcopy(base), targets=("mlp",))
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        add_lora(ffn_only)


def test_merge_unmerge_remove(twins, lora_dit, batch):
    base_out = run(twins[0], batch)
    adapted = run(lora_dit, batch)
    assert (adapted - base_out).abs().max() > 0.1  # the adapter does something

    merge_lora(lora_dit)
    merged = run(lora_dit, batch)
    diff = (merged - adapted).abs().max().item()
    print(f"merged vs adapter output: max abs diff {diff:.2e} (output std {adapted.std():.2f})")
    assert diff < 1e-5

    unmerge_lora(lora_dit)
    assert (run(lora_dit, batch) - adapted).abs().max() < 1e-5
    base_weights = twins[0].state_dict()
    for name, layer in lora_dit.named_modules():
        if isinstance(layer, LoraLayer):
            torch.testing.assert_close(layer.get_base_layer().weight, base_weights[f"{name}.weight"])

    plain = remove_lora(copy.deepcopy(lora_dit))  # adapters dropped: the base model
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert list(plain.state_dict()) == list(base_weights)
    assert (run(plain, batch) - base_out).abs().max() < 1e-5
    baked = remove_lora(lora_dit, merge=True)  # adapters folded in
    assert list(baked.state_dict()) == list(base_weights) and not hasattr(baked, "peft_config")
    assert (run(baked, batch) - adapted).abs().max() < 1e-5


def test_save_load_roundtrip_every_layout(twins, lora_dit, batch, tmp_path):
    adapted = run(lora_dit, batch)
    for layout in ("vidlatent", "diffusers", "wan"):
        path = save_lora(lora_dit, tmp_path / f"{layout}.safetensors", layout=layout)
        with safe_open(str(path), framework="pt") as f:
            meta, keys = f.metadata(), list(f.keys())
        assert meta["layout"] == layout and meta["rank"] == "4"
        assert meta["alpha"] == ("4.0" if layout == "diffusers" else "8.0")  # diffusers: scale folded into B
        assert {
            "vidlatent": "blocks.0.self_attn.q.lora_A.weight",
            "diffusers": "transformer.blocks.0.attn1.to_q.lora_A.weight",
            "wan": "diffusion_model.blocks.0.self_attn.q.lora_down.weight",
        }[layout] in keys
        fresh = load_lora(copy.deepcopy(twins[0]), path)
        diff = (run(fresh, batch) - adapted).abs().max().item()
        assert diff <= (0 if layout != "diffusers" else 1e-5), (layout, diff)
        assert all(".lora_" in n for n, p in fresh.named_parameters() if p.requires_grad)

    # diffusers keys without the "transformer." prefix, and a file of mixed ranks
    sd = {k.removeprefix("transformer."): v for k, v in lora_state_dict(lora_dit, "diffusers").items()}
    fresh = load_lora(copy.deepcopy(twins[0]), sd)
    assert (run(fresh, batch) - adapted).abs().max() <= 1e-5
    sd["blocks.1.ffn.net.2.lora_A.weight"] = sd["blocks.1.ffn.net.2.lora_A.weight"][:2]
    sd["blocks.1.ffn.net.2.lora_B.weight"] = sd["blocks.1.ffn.net.2.lora_B.weight"][:, :2]
    mixed = load_lora(copy.deepcopy(twins[0]), sd)
    assert mixed.blocks[1].mlp.fc2.r["default"] == 2 and mixed.blocks[0].mlp.fc2.r["default"] == 4

    # resuming into an existing adapter copies weights in place (optimizer references stay valid)
    target = add_lora(copy.deepcopy(twins[0]), rank=4, alpha=8)
    params = lora_parameters(target)
    load_lora(target, tmp_path / "vidlatent.safetensors")
    assert torch.equal(run(target, batch), adapted)
    assert all(p is q for p, q in zip(params, lora_parameters(target)))


def test_diffusers_loads_our_lora(cfg, twins, lora_dit, batch, tmp_path):
    ours_out = run(lora_dit, batch)
    x, sigma, context = batch

    ref = copy.deepcopy(twins[1])
    ref.load_lora_adapter(lora_state_dict(lora_dit, "diffusers"), prefix="transformer", adapter_name="ours")
    with torch.no_grad():
        expected = ref(x, 1000 * sigma, context).sample
    diff = max_rel_diff(ours_out, expected)
    print(f"diffusers WanTransformer3DModel + our LoRA vs ours: max |diff| / std = {diff:.2e}")
    assert diff < 1e-4
    with torch.no_grad():
        base = twins[1](x, 1000 * sigma, context).sample
    assert max_rel_diff(base, expected) > 0.05  # the adapter really was applied

    # the saved files through WanLoraLoaderMixin: diffusers layout (with its metadata) and Kohya/Wan layout
    for layout in ("diffusers", "wan"):
        path = save_lora(lora_dit, tmp_path / f"{layout}.safetensors", layout=layout)
        sd, metadata = WanPipeline.lora_state_dict(str(path), return_lora_metadata=True)
        ref = copy.deepcopy(twins[1])
        WanPipeline.load_lora_into_transformer(sd, transformer=ref, metadata=metadata, adapter_name=layout)
        with torch.no_grad():
            got = ref(x, 1000 * sigma, context).sample
        assert max_rel_diff(ours_out, got) < 1e-4, layout


def test_mismatched_files_fail_listing_keys(twins, lora_dit):
    sd = lora_state_dict(lora_dit, "vidlatent")
    bad = dict(sd)
    bad["blocks.7.self_attn.q.lora_A.weight"] = torch.zeros(4, 64)  # no block 7 in the tiny model
    bad["blocks.0.self_attn.q.lora_magnitude"] = torch.zeros(4)
    bad["blocks.0.cross_attn.k.lora_A.weight"] = torch.zeros(4, 63)
    bad["blocks.0.cross_attn.v.lora_B.weight"] = torch.zeros(64, 3)
    del bad["blocks.1.mlp.fc1.lora_B.weight"]
    with pytest.raises(CheckpointMismatchError) as err:
        load_lora(copy.deepcopy(twins[0]), bad)
    message = str(err.value)
    for fragment in (
        "unknown keys (2)",
        "blocks.7.self_attn.q.lora_A.weight",
        "blocks.0.self_attn.q.lora_magnitude",
        "incomplete",
        "blocks.1.mlp.fc1 (has only blocks.1.mlp.fc1.lora_A.weight, blocks.1.mlp.fc1.alpha)",
        "wrong shape (2)",
        "blocks.0.cross_attn.k: A (4, 63)",
        "blocks.0.cross_attn.v: A has rank 4 but B rank 3",
    ):
        assert fragment in message, (fragment, message)

    # into an existing adapter: ranks and the set of modules must match
    other = add_lora(copy.deepcopy(twins[0]), rank=8, targets=("attention",))
    with pytest.raises(CheckpointMismatchError) as err:
        load_lora(other, sd)
    message = str(err.value)
    assert "blocks.0.mlp.fc1 (not in adapter 'default')" in message
    assert "blocks.0.self_attn.q: file rank 4 vs adapter rank 8" in message
    # a second adapter under another name sits beside the first
    load_lora(other, sd, adapter_name="second")
    assert other.blocks[0].self_attn.q.active_adapters == ["default", "second"]
    trainable = {n for n, p in other.named_parameters() if p.requires_grad}
    assert "blocks.0.self_attn.q.lora_A.second.weight" in trainable
    assert "blocks.0.mlp.fc1.base_layer.weight" not in trainable
