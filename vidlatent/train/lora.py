"""LoRA adapters for ``VideoDiT``: inject (peft), save/load in our, diffusers' and original Wan key layouts,
merge into the base weights and back, remove.

Adapters live in peft ``lora.Linear`` layers that wrap our ``nn.Linear`` modules in place (the model stays a
``VideoDiT``). Every function takes an ``adapter_name`` ("default" unless told), so several adapters can sit
side by side. Layouts of saved files:

- ``"vidlatent"``: ``blocks.0.self_attn.q.lora_A.weight``, ``...lora_B.weight`` and ``...alpha`` (a scalar).
- ``"diffusers"``: ``transformer.blocks.0.attn1.to_q.lora_A.weight`` / ``lora_B.weight``, what diffusers'
  ``WanPipeline.load_lora_weights`` and ``WanTransformer3DModel.load_lora_adapter(sd, prefix="transformer")``
  read. diffusers scales an adapter by 1 when handed a bare state dict, so the scale ``alpha / rank`` is
  folded into ``lora_B`` here (the file then says alpha = rank); the adapter's output is the same either way.
- ``"wan"`` (Kohya / ComfyUI / original Wan names): ``diffusion_model.blocks.0.self_attn.q.lora_down.weight``,
  ``lora_up.weight`` and ``alpha``.

``load_lora`` reads keys with the parser of ``vidlatent.models.lora`` (every published Wan 2.1 layout: these
three, peft, musubi-tuner's ``lora_unet_...``), keeping what a peft adapter can hold: low-rank pairs on linear
layers. To apply LoRAs for inference (full-rank diffs too, several at once with scales, no peft), use
``vidlatent.models.lora`` or ``VideoPipeline.load_lora``. peft is imported lazily (``pip install
vidlatent[lora]``).
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from ..checkpoint import atomic_write
from ..models.dit import VideoDiT, to_diffusers_state_dict, to_wan_state_dict
from ..models.lora import DIFFUSERS_METADATA_KEY, describe, parse_lora, raise_if_mismatch, read_lora

LORA_LAYOUTS = ("vidlatent", "diffusers", "wan")
# the modules each ``targets`` entry of add_lora adapts, in every block
TARGET_GROUPS = {
    "self_attn": tuple(f"self_attn.{p}" for p in ("q", "k", "v", "out")),
    "cross_attn": tuple(f"cross_attn.{p}" for p in ("q", "k", "v", "out")),
    "ffn": ("mlp.fc1", "mlp.fc2"),
}
TARGET_GROUPS["attention"] = TARGET_GROUPS["self_attn"] + TARGET_GROUPS["cross_attn"]


def _peft():
    try:
        import peft
    except ImportError as err:
        raise ImportError("LoRA needs peft: pip install 'vidlatent[lora]' (or pip install peft)") from err
    return peft


# ------------------------------------------------------------------------------------------ helpers


def _lora_layers(dit: nn.Module, adapter_name: str | None = None) -> dict[str, nn.Module]:
    """{module name: peft LoRA layer}, only layers holding ``adapter_name`` when given."""
    from peft.tuners.lora import LoraLayer

    return {
        name: m
        for name, m in dit.named_modules()
        if isinstance(m, LoraLayer) and (adapter_name is None or adapter_name in m.lora_A)
    }


def _linears(dit: nn.Module) -> dict[str, nn.Linear]:
    """Every adaptable linear of the model by its name, seen through LoRA wrappers (their base layer)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, m in dit.named_modules():
        if isinstance(m, LoraLayer):
            out[name] = m.get_base_layer()
        elif isinstance(m, nn.Linear) and not any(
            f".{s}." in f".{name}." for s in ("lora_A", "lora_B", "base_layer")
        ):
            out.setdefault(name, m)
    return out


def _rename_modules(names: Sequence[str], convert) -> dict[str, str]:
    """Module names through a state-dict key converter (which maps ``<module>.weight`` keys)."""
    converted = convert({f"{n}.weight": f"{n}.weight" for n in names})
    return {src.removesuffix(".weight"): dst.removesuffix(".weight") for dst, src in converted.items()}


def _most_common(values: Mapping[str, float]) -> float:
    return Counter(values.values()).most_common(1)[0][0]


def _lora_config(ranks: Mapping[str, int], alphas: Mapping[str, float], dropout: float = 0.0):
    """A LoraConfig adapting exactly the named modules; ranks/alphas that vary go into its patterns."""
    r, alpha = _most_common(ranks), _most_common(alphas)
    return _peft().LoraConfig(
        r=int(r),
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=sorted(ranks),
        rank_pattern={re.escape(n): v for n, v in ranks.items() if v != r},
        alpha_pattern={re.escape(n): v for n, v in alphas.items() if v != alpha},
        init_lora_weights=True,  # A kaiming-uniform, B zero: the adapter starts as a no-op
    )


def _inject(dit: VideoDiT, config, adapter_name: str) -> None:
    if _lora_layers(dit, adapter_name):
        raise ValueError(
            f"this model already has a LoRA adapter {adapter_name!r}; choose another adapter_name"
        )
    if any(layer.merged for layer in _lora_layers(dit).values()):
        raise ValueError("adapters are merged into the weights; call unmerge_lora before adding another")
    active = {name: list(layer.active_adapters) for name, layer in _lora_layers(dit).items()}
    trainable = {name for name, p in dit.named_parameters() if p.requires_grad and ".lora_" in name}
    with warnings.catch_warnings():  # several adapters side by side are intended here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        _peft().inject_adapter_in_model(config, dit, adapter_name=adapter_name)
    for name, layer in _lora_layers(dit, adapter_name).items():  # a new adapter is active beside any others
        layer.set_adapter(sorted({*active.get(name, []), adapter_name}))
    for name, p in dit.named_parameters():  # only the new adapter trains (and adapters that did before)
        new = f".lora_A.{adapter_name}." in name or f".lora_B.{adapter_name}." in name
        p.requires_grad_(new or name in trainable)


# ---------------------------------------------------------------------------------------- injection


def add_lora(
    dit: VideoDiT,
    rank: int = 16,
    alpha: float | None = None,
    targets: Sequence[str] = ("attention", "ffn"),
    dropout: float = 0.0,
    adapter_name: str = "default",
) -> VideoDiT:
    """Wrap the chosen linears of every block in LoRA adapters (peft), freeze everything else; return ``dit``.

    ``targets``: any of "attention" (= "self_attn" + "cross_attn": q, k, v and out projections) and "ffn"
    (``mlp.fc1``, ``mlp.fc2``). An adapter adds ``(alpha / rank) * B(A(x))`` to a layer's output, ``alpha``
    defaulting to ``rank``. B starts at zero, so the model's output is unchanged until training moves it.
    Only the new adapter's A and B require grad afterwards.
    """
    unknown = [t for t in targets if t not in TARGET_GROUPS]
    if unknown or not targets:
        raise ValueError(
            f"unknown LoRA targets {unknown or list(targets)}; choose from {', '.join(TARGET_GROUPS)}"
        )
    if rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank}")
    suffixes = {s for t in targets for s in TARGET_GROUPS[t]}
    names = [f"blocks.{i}.{s}" for i in range(len(dit.blocks)) for s in sorted(suffixes)]
    alpha = float(rank if alpha is None else alpha)
    _inject(dit, _lora_config(dict.fromkeys(names, rank), dict.fromkeys(names, alpha), dropout), adapter_name)
    return dit


def lora_parameters(dit: VideoDiT, adapter_name: str = "default") -> list[nn.Parameter]:
    """The adapter's trainable tensors (every A and B), e.g. for an optimizer."""
    return [
        p
        for layer in _lora_layers(dit, adapter_name).values()
        for p in (layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight)
    ]


# ----------------------------------------------------------------------------------------- weights out


def _adapter(dit: VideoDiT, adapter_name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{our module name: (A, B, alpha)} of one adapter, alpha such that the scale is alpha / rank."""
    _peft()
    layers = _lora_layers(dit, adapter_name)
    if not layers:
        raise ValueError(f"no LoRA adapter {adapter_name!r} in this model; call add_lora or load_lora first")
    out = {}
    for name, layer in layers.items():
        a, b = layer.lora_A[adapter_name].weight.detach(), layer.lora_B[adapter_name].weight.detach()
        out[name] = (a, b, float(layer.scaling[adapter_name]) * a.shape[0])
    return out


def lora_state_dict(
    dit: VideoDiT, layout: str = "diffusers", adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """The adapter's weights only (detached, not copied unless scaled), keyed for ``layout``.

    ``"diffusers"``: ``transformer.<diffusers module>.lora_A.weight`` / ``lora_B.weight``, with
    ``alpha / rank`` folded into B, ready for diffusers'
    ``WanTransformer3DModel.load_lora_adapter(sd, prefix="transformer")``.
    ``"vidlatent"``: ``<our module>.lora_A.weight``, ``lora_B.weight`` and a scalar ``<our module>.alpha``.
    ``"wan"`` (Kohya style): ``diffusion_model.<Wan module>.lora_down.weight``, ``lora_up...``, ``.alpha``.
    """
    if layout not in LORA_LAYOUTS:
        raise ValueError(f"unknown LoRA layout {layout!r}; choose from {', '.join(LORA_LAYOUTS)}")
    adapter = _adapter(dit, adapter_name)
    out: dict[str, torch.Tensor] = {}
    if layout == "diffusers":
        names = _rename_modules(list(adapter), to_diffusers_state_dict)
        for name, (a, b, alpha) in adapter.items():
            scale = alpha / a.shape[0]
            out[f"transformer.{names[name]}.lora_A.weight"] = a
            out[f"transformer.{names[name]}.lora_B.weight"] = b if scale == 1 else b * scale
        return out
    names = _rename_modules(list(adapter), to_wan_state_dict) if layout == "wan" else {n: n for n in adapter}
    prefix, down, up = (
        ("diffusion_model.", "lora_down", "lora_up") if layout == "wan" else ("", "lora_A", "lora_B")
    )
    for name, (a, b, alpha) in adapter.items():
        key = f"{prefix}{names[name]}"
        out[f"{key}.{down}.weight"], out[f"{key}.{up}.weight"] = a, b
        out[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def save_lora(
    dit: VideoDiT, path: str | Path, layout: str = "diffusers", adapter_name: str = "default"
) -> Path:
    """Write the adapter to a .safetensors file atomically (see ``lora_state_dict`` for ``layout``).

    The file's metadata holds ``rank`` and ``alpha`` (as the file's weights are to be read: alpha = rank
    for the diffusers layout, whose B carries the scale) and ``layout``; a diffusers-layout file also holds
    diffusers' own ``lora_adapter_metadata`` (its LoraConfig), so ``WanPipeline.load_lora_weights(path)``
    needs nothing else.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA files are written as .safetensors; got {path.name}")
    state = lora_state_dict(dit, layout, adapter_name)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    adapter = _adapter(dit, adapter_name)
    ranks = {n: a.shape[0] for n, (a, _, _) in adapter.items()}
    alphas = {n: (ranks[n] if layout == "diffusers" else alpha) for n, (_, _, alpha) in adapter.items()}
    metadata = {
        "format": "pt",
        "layout": layout,
        "rank": str(_most_common(ranks)),
        "alpha": str(float(_most_common(alphas))),
        "targets": ",".join(sorted(adapter)),
    }
    if layout == "diffusers":
        names = _rename_modules(list(adapter), to_diffusers_state_dict)
        config = _lora_config(
            {names[n]: r for n, r in ranks.items()}, {names[n]: float(r) for n, r in ranks.items()}
        )
        fields = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "lora_dropout")
        metadata[DIFFUSERS_METADATA_KEY] = json.dumps(
            {f"transformer.{k}": getattr(config, k) for k in fields}, indent=2, sort_keys=True, default=list
        )
    atomic_write(path, lambda p: save_file(tensors, p, metadata=metadata))
    return path


# ------------------------------------------------------------------------------------------- weights in


def parse_lora_state_dict(
    dit: VideoDiT, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Any supported LoRA layout -> {our module name: (A, B, alpha)}, checked against ``dit``'s linears.

    The one parser of ``vidlatent.models.lora`` (every published layout), limited to what a peft adapter can
    hold: low-rank pairs on linear layers (alpha defaulting to the rank). Raises CheckpointMismatchError listing
    keys that name no layer of this model (or are not LoRA weights), modules with only one of A/B, A/B shapes
    that do not fit the module or each other, and full-rank diffs or targets that are not linear layers.
    """
    deltas = parse_lora(dit, state, metadata)
    linears = _linears(dit)
    untrainable = [
        f"{name} ({', '.join(d.keys)})"
        for name, d in deltas.items()
        if name not in linears or d.down is None or d.diff is not None or d.diff_b is not None
    ]
    raise_if_mismatch(
        {
            "not a low-rank pair on a linear layer (vidlatent.models.lora.load_lora applies it at inference)": untrainable
        },
        describe(dit),
    )
    return {name: (d.down, d.up, float(d.rank) if d.alpha is None else d.alpha) for name, d in deltas.items()}


def load_lora(
    dit: VideoDiT,
    src: str | Path | Mapping[str, torch.Tensor],
    adapter_name: str = "default",
) -> VideoDiT:
    """Load a LoRA file (or state dict) in any supported layout into ``dit``; returns ``dit``.

    Without an adapter of that name, one is injected fitting the file (its modules, ranks and alphas), with
    base weights frozen and the new adapter active beside any others. With one (e.g. made by ``add_lora``
    before resuming training), the file must cover exactly its modules with the same ranks; the weights are
    copied in place, so an optimizer built on them stays valid. Alpha comes from per-module ``.alpha``
    tensors, else the file's metadata, else equals the rank (diffusers' convention). Mismatches raise
    CheckpointMismatchError.
    """
    _peft()
    state, metadata = read_lora(src)
    adapter = parse_lora_state_dict(dit, state, metadata)
    existing = _lora_layers(dit, adapter_name)
    if existing:
        missing = sorted(set(existing) - set(adapter))
        extra = sorted(set(adapter) - set(existing))
        ranks = [
            f"{n}: file rank {a.shape[0]} vs adapter rank {existing[n].r[adapter_name]}"
            for n, (a, _, _) in adapter.items()
            if n in existing and a.shape[0] != existing[n].r[adapter_name]
        ]
        sections = {
            "unknown keys": [f"{n} (not in adapter {adapter_name!r})" for n in extra],
            "wrong shape": ranks,
            "missing": missing,
        }
        raise_if_mismatch(sections, "the adapter", accepted=False)
        if any(layer.merged for layer in existing.values()):
            raise ValueError("adapters are merged into the weights; call unmerge_lora before loading")
    else:
        ranks = {n: a.shape[0] for n, (a, _, _) in adapter.items()}
        _inject(dit, _lora_config(ranks, {n: alpha for n, (_, _, alpha) in adapter.items()}), adapter_name)
        existing = _lora_layers(dit, adapter_name)
    with torch.no_grad():
        for name, (a, b, alpha) in adapter.items():
            layer = existing[name]
            layer.lora_A[adapter_name].weight.copy_(a)
            layer.lora_B[adapter_name].weight.copy_(b)
            layer.scaling[adapter_name] = alpha / a.shape[0]
    return dit


# ---------------------------------------------------------------------------------- merge and removal


def merge_lora(dit: VideoDiT, adapter_names: Sequence[str] | None = None) -> VideoDiT:
    """Fold the active adapters (or ``adapter_names``) into the base weights: same output, no adapter cost."""
    _peft()
    layers = _lora_layers(dit)
    if not layers:
        raise ValueError("this model has no LoRA adapters to merge")
    for layer in layers.values():
        layer.merge(adapter_names=None if adapter_names is None else list(adapter_names))
    return dit


def unmerge_lora(dit: VideoDiT) -> VideoDiT:
    """Subtract merged adapters from the base weights again, so they act as separate adapters."""
    _peft()
    for layer in _lora_layers(dit).values():
        if layer.merged:
            layer.unmerge()
    return dit


def remove_lora(dit: VideoDiT, merge: bool = False) -> VideoDiT:
    """Replace every LoRA layer by its plain ``nn.Linear``; returns ``dit`` as a plain VideoDiT.

    ``merge=False`` gives back the base model (merged adapters are subtracted first); ``merge=True`` keeps the
    active adapters' effect folded into the weights (for export). All parameters require grad afterwards,
    as in a freshly built model.
    """
    _peft()
    for name, layer in _lora_layers(dit).items():
        if merge and not layer.merged:
            layer.merge()
        elif not merge and layer.merged:
            layer.unmerge()
        parent, _, child = name.rpartition(".")
        setattr(dit.get_submodule(parent), child, layer.get_base_layer())
    if hasattr(dit, "peft_config"):
        del dit.peft_config
    dit.requires_grad_(True)
    return dit
