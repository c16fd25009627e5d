"""LoRAs at inference (vidlatent.models.lora): every published Wan 2.1 layout, written here from random factors,
gives the output diffusers gives for the same file; several LoRAs with scales; fuse / unfuse; full-rank
diffs; clear errors that leave the model untouched; the pipeline methods and ``--lora`` on the CLI."""

import copy
import json
import warnings

import pytest
import torch
from diffusers import WanPipeline
from safetensors.torch import save_file
from test_dit import max_rel_diff

from vidlatent.checkpoint import CheckpointMismatchError
from vidlatent.cli import main, parse_lora_spec
from vidlatent.data.io import read_video
from vidlatent.models.dit import to_diffusers_state_dict, to_wan_state_dict
from vidlatent.models.lora import (
    fuse_lora,
    load_lora,
    lora_scales,
    parse_lora,
    set_lora_scale,
    unfuse_lora,
    unload_lora,
)
from vidlatent.pipelines import VideoPipeline

RANK = 4
BLOCK_LINEARS = [f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in ("q", "k", "v", "out")] + [
    "mlp.fc1",
    "mlp.fc2",
]
TOP_LINEARS = ["text_embed.fc1", "text_embed.fc2", "time_embed.fc1", "time_modulation", "head.proj"]


def run(dit, batch):
    with torch.no_grad():
        return dit(*batch)


def run_ref(ref, batch):
    x, sigma, context = batch
    with torch.no_grad():
        return ref(x, 1000 * sigma, context).sample


def block_modules(cfg):
    return [f"blocks.{i}.{s}" for i in range(cfg.num_layers) for s in BLOCK_LINEARS]


def factors(dit, modules, seed, alphas=True):
    """{our module: (A, B, alpha)}: random factors of rank 4 big enough to move the output visibly; alphas
    vary per module (None: no alpha, scale 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, name in enumerate(modules):
        layer = dit.get_submodule(name)
        a = torch.randn(RANK, layer.in_features, generator=g) / layer.in_features**0.5
        b = 0.5 * torch.randn(layer.out_features, RANK, generator=g) / RANK**0.5
        out[name] = (a, b, float(2 + i % 5) if alphas else None)
    return out


def renamed(names, convert):
    """Our module names -> another scheme's (through the checkpoint key maps)."""
    return {src.removesuffix(".weight"): dst.removesuffix(".weight")
            for dst, src in convert({f"{n}.weight": f"{n}.weight" for n in names}).items()}  # fmt: skip


def kohya_keys(pairs, prefix="diffusion_model.", flatten=False, down="lora_down", up="lora_up"):
    """Original-Wan names: diffusion_model.blocks.0.self_attn.q.lora_down.weight (or lora_unet_blocks_0_...)."""
    wan = renamed(pairs, to_wan_state_dict)
    sd = {}
    for name, (a, b, alpha) in pairs.items():
        module = wan[name].replace(".", "_") if flatten else wan[name]
        sd[f"{prefix}{module}.{down}.weight"], sd[f"{prefix}{module}.{up}.weight"] = a, b
        if alpha is not None:
            sd[f"{prefix}{module}.alpha"] = torch.tensor(alpha)
    return sd


def diffusers_keys(pairs, prefix="transformer.", adapter=""):
    names = renamed(pairs, to_diffusers_state_dict)
    sd = {}
    for name, (a, b, _) in pairs.items():
        sd[f"{prefix}{names[name]}.lora_A{adapter}.weight"] = a
        sd[f"{prefix}{names[name]}.lora_B{adapter}.weight"] = b
    return sd


def diffusers_pipe(ref, files):
    """A WanPipeline around a copy of diffusers' model with the LoRA files loaded by load_lora_weights."""
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=copy.deepcopy(ref)
    )
    for i, path in enumerate(files):
        pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
    return pipe


def diffusers_out(pipe, scales, batch):
    pipe.set_adapters([f"l{i}" for i in range(len(scales))], list(scales))
    return run_ref(pipe.transformer, batch)


def diffusers_with(ref, files, scales, batch):
    return diffusers_out(diffusers_pipe(ref, files), scales, batch)


def ours_with(dit, files, scales, batch):
    dit = copy.deepcopy(dit)
    for path, scale in zip(files, scales):
        load_lora(dit, path, scale=scale)
    return run(dit, batch), dit


# --------------------------------------------------------------------------------------- the layouts


def layout_file(name, dit, cfg, tmp_path):
    """Write one published layout from random factors; returns its path."""
    blocks = block_modules(cfg)
    path = tmp_path / f"{name}.safetensors"
    metadata = None
    if name == "diffusers":  # WanPipeline.save_lora_weights' layout; alphas in diffusers' metadata
        pairs = factors(dit, blocks, seed=1)
        sd = diffusers_keys(pairs)
        config = {"r": RANK, "lora_alpha": 8.0, "alpha_pattern": {"blocks.1.ffn.net.2": 2.0},
                  "target_modules": sorted(renamed(pairs, to_diffusers_state_dict).values())}  # fmt: skip
        metadata = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    elif name == "wan_lora_A":  # original Wan names with peft's A/B (DiffSynth-style), alphas per module
        sd = kohya_keys(factors(dit, blocks, seed=2), down="lora_A", up="lora_B")
    elif name == "kohya":  # ComfyUI / Kohya: lora_down / lora_up / alpha; top-level linears without alpha
        sd = kohya_keys(factors(dit, blocks, seed=3))
        sd.update(kohya_keys(factors(dit, TOP_LINEARS, seed=4, alphas=False)))
    elif name == "musubi":  # musubi-tuner: lora_unet_blocks_0_self_attn_q.lora_down.weight + alpha
        sd = kohya_keys(factors(dit, blocks, seed=5), prefix="lora_unet_", flatten=True)
    elif name == "lightx2v":  # step distillation: pairs + diff_b on linears, (zero) .diff on norms
        g = torch.Generator().manual_seed(6)
        pairs = factors(dit, blocks + ["head.proj"], seed=7)
        sd = kohya_keys({n: p for n, p in pairs.items() if n != "head.proj"})
        sd.update(kohya_keys({"head.proj": (*pairs["head.proj"][:2], None)}))
        for ours_name, module in renamed(pairs, to_wan_state_dict).items():
            n = dit.get_submodule(ours_name).out_features
            sd[f"diffusion_model.{module}.diff_b"] = 0.3 * torch.randn(n, generator=g)
        for i in range(cfg.num_layers):
            for norm in (
                "norm3",
                "self_attn.norm_q",
                "self_attn.norm_k",
                "cross_attn.norm_q",
                "cross_attn.norm_k",
            ):
                sd[f"diffusion_model.blocks.{i}.{norm}.diff"] = torch.zeros(cfg.dim)
            sd[f"diffusion_model.blocks.{i}.norm3.diff_b"] = torch.zeros(cfg.dim)
    else:
        raise ValueError(name)
    save_file(sd, str(path), metadata=metadata)
    return path


LAYOUTS = ("diffusers", "wan_lora_A", "kohya", "musubi", "lightx2v")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_matches_diffusers(layout, cfg, twins, batch, tmp_path):
    ours, ref = twins
    path = layout_file(layout, ours, cfg, tmp_path)
    got, _ = ours_with(ours, [path], [0.8], batch)
    expected = diffusers_with(ref, [path], [0.8], batch)
    diff = max_rel_diff(got, expected)
    moved = max_rel_diff(run(ours, batch), expected)
    print(
        f"{layout}: ours vs diffusers load_lora_weights max|diff|/std = {diff:.2e} (LoRA moved it {moved:.2f})"
    )
    assert moved > 0.05  # the LoRA visibly changes the output
    assert diff <= 1e-4


# ------------------------------------------------------------------------------ full-rank differences


def full_rank_file(dit, cfg, path, seed=8):
    """Full-rank deltas as step-distillation LoRAs ship them, on linears, biases, norms, modulation tables and
    the patch embedding. Returns {our parameter: delta} (diffusers drops .diff weights, so these are checked
    against the base weights plus the deltas instead)."""
    g = torch.Generator().manual_seed(seed)
    params = dict(dit.named_parameters())
    names = ["blocks.0.self_attn.q.weight", "blocks.1.mlp.fc1.weight", "blocks.0.cross_attn.out.bias",
             "blocks.0.cross_norm.weight", "blocks.0.cross_norm.bias", "blocks.1.self_attn.q_norm.weight",
             "blocks.0.modulation", "blocks.1.modulation", "head.modulation", "patch_embed.weight",
             "patch_embed.bias", "time_modulation.bias"]  # fmt: skip
    deltas = {n: 0.2 * params[n].detach().std() * torch.randn(params[n].shape, generator=g) for n in names}
    sd = {}
    for wan_key, key in to_wan_state_dict({k: k for k in deltas}).items():
        if key == "blocks.0.modulation":
            file_key = "blocks.0.diff_m"  # lightx2v's spelling
        elif wan_key.endswith(".weight"):
            file_key = wan_key.removesuffix(".weight") + ".diff"
        elif wan_key.endswith(".bias"):
            file_key = wan_key.removesuffix(".bias") + ".diff_b"
        else:
            file_key = wan_key + ".diff"
        sd[f"diffusion_model.{file_key}"] = deltas[key].squeeze(0) if "modulation" in key else deltas[key]
    save_file(sd, str(path))
    return deltas


def test_full_rank_diffs_equal_patched_weights(cfg, twins, batch, tmp_path):
    ours = twins[0]
    deltas = full_rank_file(ours, cfg, tmp_path / "distill.safetensors")
    reference = copy.deepcopy(ours)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name in deltas:
                p.add_(0.6 * deltas[name])
    got, dit = ours_with(ours, [tmp_path / "distill.safetensors"], [0.6], batch)
    expected = run(reference, batch)
    diff, moved = max_rel_diff(got, expected), max_rel_diff(run(ours, batch), expected)
    print(f"full-rank .diff/.diff_b/.diff_m vs base + deltas: {diff:.2e} (moved {moved:.2f})")
    assert moved > 0.05 and diff <= 1e-5
    assert list(dit.state_dict()) == list(ours.state_dict())  # no new parameters or buffers
    set_lora_scale(dit, "distill", 0.0)  # exactly the base model again
    assert torch.equal(run(dit, batch), run(ours, batch))
    assert all(torch.equal(p, q) for p, q in zip(dit.parameters(), ours.parameters()))


# ------------------------------------------------------------------- several at once, fuse and unfuse


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # diffusers holding several adapters
def test_several_loras_with_scales_match_diffusers(cfg, twins, batch, tmp_path):
    ours, ref = twins
    files = [layout_file(n, ours, cfg, tmp_path) for n in ("kohya", "musubi", "diffusers")]
    scales = [0.7, -0.4, 1.2]
    got, dit = ours_with(ours, files, scales, batch)
    assert lora_scales(dit) == dict(zip(("kohya", "musubi", "diffusers"), scales))
    pipe = diffusers_pipe(ref, files)
    diff = max_rel_diff(got, diffusers_out(pipe, scales, batch))
    set_lora_scale(dit, "kohya", 0.3)
    rescaled = max_rel_diff(run(dit, batch), diffusers_out(pipe, [0.3, -0.4, 1.2], batch))
    print(f"three LoRAs vs diffusers set_adapters: {diff:.2e}; after a scale change {rescaled:.2e}")
    assert diff <= 1e-4 and rescaled <= 1e-4
    single = max_rel_diff(got, ours_with(ours, files[:1], scales[:1], batch)[0])
    assert single > 0.05  # the others count


def test_fuse_unfuse_unload(cfg, twins, batch, tmp_path):
    ours = twins[0]
    base = {k: v.clone() for k, v in ours.state_dict().items()}
    full_rank_file(ours, cfg, tmp_path / "distill.safetensors")
    files = [layout_file("kohya", ours, cfg, tmp_path), tmp_path / "distill.safetensors"]
    adapted, dit = ours_with(ours, files, [0.7, 0.5], batch)

    fuse_lora(dit)
    fused = run(dit, batch)
    print(f"fused vs runtime adapters: {max_rel_diff(fused, adapted):.2e}")
    assert max_rel_diff(fused, adapted) <= 1e-5
    assert (dit.blocks[0].self_attn.q.weight - base["blocks.0.self_attn.q.weight"]).abs().max() > 0.01
    fuse_lora(dit)  # a no-op when fused
    assert torch.equal(run(dit, batch), fused)
    for call in (lambda: load_lora(dit, files[0], name="x"), lambda: set_lora_scale(dit, "kohya", 1.0),
                 lambda: unload_lora(dit)):  # fmt: skip
        with pytest.raises(ValueError, match="unfuse_lora"):
            call()

    unfuse_lora(dit)
    assert max_rel_diff(run(dit, batch), adapted) <= 1e-5
    worst = max(
        (
            (dit.get_submodule(n).weight - base[f"{n}.weight"]).abs().max() / base[f"{n}.weight"].abs().max()
        ).item()
        for n in block_modules(cfg)
    )
    print(f"unfused linear weights vs base: max relative {worst:.1e}")
    assert worst <= 1e-6

    unload_lora(dit, "kohya")
    assert max_rel_diff(run(dit, batch), ours_with(ours, files[1:], [0.5], batch)[0]) <= 1e-5
    unload_lora(dit)
    assert lora_scales(dit) == {} and not any(m._forward_hooks for m in dit.modules())
    for k, v in dit.state_dict().items():
        assert (v - base[k]).abs().max() <= 1e-6 * base[k].abs().max(), k
    assert max_rel_diff(run(dit, batch), run(ours, batch)) <= 1e-5

    # bf16 weights: subtracting would leave a bf16 rounding step in each; unfuse restores a CPU copy exactly
    half = copy.deepcopy(ours).to(torch.bfloat16)
    base16 = {k: v.clone() for k, v in half.state_dict().items()}
    load_lora(half, files[0], scale=0.7)
    fuse_lora(half)
    assert not torch.equal(half.blocks[0].mlp.fc1.weight, base16["blocks.0.mlp.fc1.weight"])
    unfuse_lora(half)
    unload_lora(half)
    assert all(torch.equal(v, base16[k]) for k, v in half.state_dict().items())


# ---------------------------------------------------------------------------------------- bad input


def test_bad_files_fail_listing_keys_and_change_nothing(cfg, twins, batch, tmp_path):
    ours = twins[0]
    dit = copy.deepcopy(ours)
    good = layout_file("kohya", ours, cfg, tmp_path)
    assert load_lora(dit, good, scale=0.5) == "kohya"
    before = run(dit, batch)
    weights = {k: v.clone() for k, v in dit.state_dict().items()}

    sd = kohya_keys(factors(ours, block_modules(cfg), seed=9))
    sd["diffusion_model.blocks.7.self_attn.q.lora_down.weight"] = torch.zeros(RANK, cfg.dim)  # no block 7
    sd["diffusion_model.blocks.0.self_attn.q.lora_mid.weight"] = torch.zeros(RANK, RANK)  # LoCon: not read
    sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(RANK, 8)  # text encoder
    with pytest.raises(CheckpointMismatchError) as err:
        load_lora(dit, sd)
    message = str(err.value)
    for fragment in ("unknown keys (3)", "diffusion_model.blocks.7.self_attn.q.lora_down.weight (no layer",
                     "diffusion_model.blocks.0.self_attn.q.lora_mid.weight (not a LoRA tensor name)",
                     "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", "accepted: "):  # fmt: skip
        assert fragment in message, (fragment, message)

    wide = 1536  # a LoRA for Wan 2.1 1.3B
    bad = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(RANK, wide),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(wide, RANK),
        "diffusion_model.blocks.0.norm3.diff": torch.zeros(wide),
        "diffusion_model.blocks.1.ffn.0.lora_down.weight": torch.zeros(RANK, cfg.dim),
        "diffusion_model.head.modulation.lora_down.weight": torch.zeros(RANK, cfg.dim),  # a table: diffs only
        "diffusion_model.head.modulation.lora_up.weight": torch.zeros(2, RANK),
    }
    with pytest.raises(CheckpointMismatchError) as err:
        load_lora(dit, bad)
    message = str(err.value)
    print(message)
    for fragment in ("this VideoDiT (dim 64", "wrong shape (3)",
        "head.modulation: a low-rank pair (diffusion_model.head.modulation.lora_down.weight) on a parameter",
                     "blocks.0.self_attn.q: A (4, 1536) (diffusion_model.blocks.0.self_attn.q.lora_down.weight), "
                     "expected (rank, 64)", "diffusion_model.blocks.0.norm3.diff is (1536,), expected (64,)",
                     "incomplete (A and B needed) (1): blocks.1.mlp.fc1"):  # fmt: skip
        assert fragment in message, (fragment, message)

    with pytest.raises(ValueError, match="already loaded"):
        load_lora(dit, good, name="kohya")
    damaged = kohya_keys(factors(ours, block_modules(cfg), seed=10))
    damaged["diffusion_model.blocks.0.self_attn.q.lora_up.weight"][0, 0] = float("nan")
    with pytest.raises(
        ValueError, match="holds NaN/inf values in diffusion_model.blocks.0.self_attn.q.lora_up"
    ):
        load_lora(dit, damaged)
    for scale in (float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="a LoRA's scale must be a finite number"):
            load_lora(dit, good, scale=scale, name="other")
        with pytest.raises(ValueError, match="a LoRA's scale must be a finite number"):
            set_lora_scale(dit, "kohya", scale)
    with pytest.raises(KeyError, match="loaded: kohya"):
        unload_lora(dit, "nope")
    assert lora_scales(dit) == {"kohya": 0.5}  # nothing half-applied: the first LoRA alone, as before
    assert torch.equal(run(dit, batch), before)
    assert all(torch.equal(v, weights[k]) for k, v in dit.state_dict().items())
    assert load_lora(dit, good) == "kohya-2"  # a free default name


def test_parse_reads_prefixes_and_peft_folders(cfg, twins, batch, tmp_path):
    """peft's saved folder (base_model.model. keys, adapter_config.json alpha) and bare / .default. keys give
    diffusers' load_lora_adapter result on the same tensors."""
    ours, ref = twins
    pairs = factors(ours, block_modules(cfg) + ["head.proj"], seed=10)
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file(diffusers_keys(pairs, prefix="base_model.model."), str(folder / "adapter_model.safetensors"))
    targets = sorted(renamed(pairs, to_diffusers_state_dict).values())
    (folder / "adapter_config.json").write_text(
        json.dumps({"r": RANK, "lora_alpha": 6, "target_modules": targets})
    )
    bare = diffusers_keys(pairs, prefix="", adapter=".default")
    for src, metadata in ((folder, {"r": RANK, "lora_alpha": 6, "target_modules": targets}), (bare, None)):
        got, _ = ours_with(ours, [src], [1.0], batch)
        expected_model = copy.deepcopy(ref)
        plain = diffusers_keys(pairs, prefix="")
        expected_model.load_lora_adapter(plain, prefix=None, metadata=metadata, adapter_name="x")
        diff = max_rel_diff(got, run_ref(expected_model, batch))
        print(f"peft {'folder' if metadata else 'bare keys'}: {diff:.2e}")
        assert diff <= 1e-4
    deltas = parse_lora(ours, bare)
    assert deltas["blocks.0.self_attn.out"].alpha is None and deltas["head.proj"].rank == RANK


def test_a_zero_kohya_alpha_is_the_rank_with_a_warning(twins):
    """kohya's sd-scripts reads an alpha of 0 as alpha = rank; such a file changes the model as one without
    alphas does, and a warning names the tensors (a LoRA that silently did nothing was the old result)."""
    ours, _ = twins
    sd = kohya_keys(factors(ours, ["blocks.0.self_attn.q", "blocks.1.mlp.fc1"], seed=12))
    alphas = sorted(k for k in sd if k.endswith(".alpha"))
    assert len(alphas) == 2
    zeros = {**sd, **{k: torch.tensor(0.0) for k in alphas}}
    with pytest.warns(UserWarning, match=r"2 LoRA alpha tensor\(s\) are 0 \(diffusion_model\.blocks\.0\."):
        deltas = parse_lora(ours, zeros)
    assert [d.lora_scale for d in deltas.values()] == [1.0, 1.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a non-zero alpha: no warning, alpha / rank as before
        one_two = {**sd, alphas[0]: torch.tensor(4.0), alphas[1]: torch.tensor(2.0)}
        assert sorted(d.lora_scale for d in parse_lora(ours, one_two).values()) == [0.5, 1.0]


# ----------------------------------------------------------------------------------- pipeline and CLI


def test_pipeline_methods(tmp_path):
    pipe = VideoPipeline.from_pretrained("tiny")
    path = tmp_path / "style.safetensors"
    save_file(
        kohya_keys(factors(pipe.dit, block_modules(pipe.dit.config) + ["head.proj"], seed=11)), str(path)
    )
    kw = dict(frames=1, steps=2, seed=0, output_type="latent", progress=False)
    base = pipe.generate("a ball", **kw)
    assert pipe.load_lora(path, scale=0.8) == "style" and pipe.loras == {"style": 0.8}
    adapted = pipe.generate("a ball", **kw)
    assert (adapted - base).abs().max() > 0.05
    pipe.set_lora_scale("style", 0.0)  # off, exactly
    assert torch.equal(pipe.generate("a ball", **kw), base)
    pipe.set_lora_scale("style", 0.8)
    assert torch.equal(pipe.generate("a ball", **kw), adapted)
    pipe.fuse_lora()
    assert max_rel_diff(pipe.generate("a ball", **kw), adapted) <= 1e-4
    pipe.unfuse_lora()  # weights back to rounding
    assert max_rel_diff(pipe.generate("a ball", **kw), adapted) <= 1e-4
    pipe.unload_lora()
    assert pipe.loras == {} and max_rel_diff(pipe.generate("a ball", **kw), base) <= 1e-4


def test_lora_spec(tmp_path):
    assert parse_lora_spec("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora_spec("style.safetensors:0.5") == ("style.safetensors", 0.5)
    assert parse_lora_spec("a/b.safetensors:-1e-1") == ("a/b.safetensors", -0.1)
    assert parse_lora_spec(r"C:\loras\x.safetensors") == (r"C:\loras\x.safetensors", 1.0)
    assert parse_lora_spec(r"C:\loras\x.safetensors:2") == (r"C:\loras\x.safetensors", 2.0)
    assert parse_lora_spec("x.safetensors:nan") == ("x.safetensors:nan", 1.0)
    style = tmp_path / "style.safetensors"
    style.write_bytes(b"")
    for tail in ("abc", "nan", "inf"):  # the file exists: what follows it was meant as a scale
        with pytest.raises(ValueError, match=f"style.safetensors:{tail}: '{tail}' is not a scale"):
            parse_lora_spec(f"{style}:{tail}")


def test_cli_lora_on_tiny(tmp_path, capsys):
    pipe = VideoPipeline.from_pretrained("tiny")
    modules = block_modules(pipe.dit.config) + ["head.proj"]
    save_file(kohya_keys(factors(pipe.dit, modules, seed=12)), str(tmp_path / "a.safetensors"))
    save_file(kohya_keys(factors(pipe.dit, modules, seed=13), prefix="lora_unet_", flatten=True),
              str(tmp_path / "b.safetensors"))  # fmt: skip
    job = ["generate", "a red ball", "--model", "tiny", "--frames", "1", "--seed", "1", "-q", "steps=2"]
    outputs = {}
    for tag, loras in (
        ("none", []),
        ("zero", ["a.safetensors:0"]),
        ("two", ["a.safetensors:0.8", "b.safetensors"]),
    ):
        args = [x for spec in loras for x in ("--lora", str(tmp_path / spec))]
        assert main([*job, "-o", str(tmp_path / f"{tag}.png"), *args]) == 0
        outputs[tag] = read_video(tmp_path / f"{tag}.png")[0]
    assert torch.equal(outputs["zero"], outputs["none"])  # scale 0 parsed as a scale, and exact
    assert (outputs["two"] - outputs["none"]).abs().max() > 0.05

    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(RANK, 1536),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(1536, RANK)},
              str(tmp_path / "wide.safetensors"))  # fmt: skip
    capsys.readouterr()
    assert main([*job, "-o", str(tmp_path / "x.png"), "--lora", str(tmp_path / "wide.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vidlatent generate: error: LoRA weights do not fit") and "(4, 1536)" in err
    assert (
        main([*job, "-o", str(tmp_path / "x.png"), "--lora", str(tmp_path / "missing.safetensors:0.5")]) == 2
    )
    assert "no such file" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
