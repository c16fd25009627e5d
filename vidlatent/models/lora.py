"""LoRAs at inference for ``VideoDiT``: read every published Wan 2.1 LoRA layout into one form, apply several
named LoRAs at once (each with its own scale), fuse them into the weights and unfuse them again. No peft.

Layouts read. ``<module>`` is a layer in vidlatent, diffusers or original Wan naming (``blocks.0.self_attn.q``,
``blocks.0.attn1.to_q``; ``blocks.0.ffn.0`` = our ``blocks.0.mlp.fc1``), optionally under ``transformer.``,
``base_model.model.``, ``diffusion_model.`` or ``model.diffusion_model.``:

- diffusers / peft: ``<module>.lora_A.weight`` and ``lora_B.weight`` (``lora_A.<adapter>.weight`` too). Alpha
  comes from the file's metadata (diffusers' ``lora_adapter_metadata``, vidlatent's ``alpha``) or a peft
  ``adapter_config.json`` beside the file, else alpha = rank (scale 1), as diffusers reads such files;
  ``lora_B.bias`` is a bias delta scaled like the adapter (peft's ``lora_bias``).
- Kohya / ComfyUI / musubi-tuner: ``<module>.lora_down.weight``, ``lora_up.weight`` and a scalar ``alpha``, and
  the same with the module flattened as ``lora_unet_blocks_0_self_attn_q`` (musubi-tuner, Kohya; VideoX-Fun's
  ``lora_unet__...`` too). An alpha of 0 means alpha = rank (kohya's reading; a warning says so).
  Conv-shaped ``(r, in, 1, 1, 1)`` factors are flattened.
- Full-rank differences, as step-distillation LoRAs ship them (lightx2v, CausVid): ``<module>.diff`` (a delta
  of the weight, on linears, norms or the patch embedding), ``<module>.diff_b`` (of its bias), and deltas of
  the modulation tables: ``blocks.0.modulation.diff``, ``head.modulation.diff`` or lightx2v's
  ``blocks.0.diff_m``.

One normalized form (``parse_lora``): {our target name: ``LoraDelta``}; a target is a layer (its weight and
bias) or a bare parameter (``blocks.0.modulation``). A LoRA loaded at ``scale`` changes a weight by
``scale * (alpha / rank * B @ A + diff)`` and its bias by ``scale * diff_b``. A key that names no layer of
the model, or a tensor of the wrong shape, is an error listing every such key, raised before anything is
applied.

Applying (``load_lora`` ... ``unfuse_lora``): on linear layers a LoRA is a runtime adapter, a forward hook
adding ``scale * (alpha / rank) * B(A(x)) + scale * (x diff^T + diff_b)`` to the layer's output, so scale
changes and unloading are exact and the model's parameters and state dict stay the base model's. Other
targets (norms, modulation tables, the patch embedding) are patched in place from a saved copy of their
original values, recomputed whenever a scale changes. ``fuse_lora`` adds the linear adapters into the weights
(no extra cost per step); ``unfuse_lora`` takes them out again (fp32 weights by subtraction, to ~1e-7;
bf16/fp16 weights from a copy kept on the CPU, exactly).
"""

from __future__ import annotations

import json
import math
import numbers
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from ..checkpoint import CheckpointMismatchError, load_state_dict
from ..checks import nonfinite_names
from .dit import to_diffusers_state_dict, to_wan_state_dict

DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
LORA_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")  # peft's, diffusers' names
ACCEPTED = (
    "accepted: <module>.lora_A/.lora_B.weight (diffusers, peft), <module>.lora_down/.lora_up.weight + .alpha "
    "(Kohya, ComfyUI, musubi-tuner; also lora_unet_<module_with_underscores>), full-rank <module>.diff / "
    ".diff_b / .diff_m (lightx2v, CausVid); <module> in vidlatent, diffusers or original Wan 2.1 naming "
    "(blocks.0.self_attn.q, blocks.0.attn1.to_q), optionally under transformer., base_model.model., "
    "diffusion_model. or model.diffusion_model."
)
_PREFIXES = ("base_model.model.", "transformer.", "model.diffusion_model.", "diffusion_model.")
_KOHYA_PREFIX = "lora_unet_"
_KEY = re.compile(
    r"(?P<module>.+?)\.(?P<kind>lora_(?:A|B|down|up)(?:\.[^.]+)?\.weight|lora_B(?:\.[^.]+)?\.bias"
    r"|alpha|diff|diff_b|diff_m)"
)
# modules that belong to a peft LoRA wrapper (training adapters), not to the model
_WRAPPER_PARTS = {"base_layer", "lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B",
                  "lora_magnitude_vector"}  # fmt: skip


# ---------------------------------------------------------------------------------- the normalized form


@dataclass
class LoraDelta:
    """One target's update from one file: a low-rank pair and/or full-rank differences (each may be None).

    ``down`` A (rank, in) and ``up`` B (out, rank), both 2-D; ``alpha`` sets the pair's scale ``alpha / rank``
    (None: 1). ``diff`` has the shape of the target's weight (or bare parameter); ``diff_b`` of its bias.
    ``keys`` are the file's keys it came from.
    """

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    diff: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None
    keys: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int | None:
        return None if self.down is None else self.down.shape[0]

    @property
    def lora_scale(self) -> float:
        """``alpha / rank`` of the pair (1 without an alpha)."""
        return 1.0 if self.alpha is None or self.down is None else self.alpha / self.down.shape[0]

    def weight_delta(self, shape: torch.Size) -> torch.Tensor | None:
        """The full change of the weight at scale 1, fp32, in ``shape`` (None when only the bias changes)."""
        delta = None
        if self.down is not None:
            delta = (self.up.float() @ self.down.float()).mul_(self.lora_scale).reshape(shape)
        if self.diff is not None:
            diff = self.diff.float().reshape(shape)
            delta = diff.clone() if delta is None else delta.add_(diff)
        return delta

    def forward(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """What this update adds to a linear layer's output for input ``x``."""
        y = torch.zeros((), dtype=x.dtype, device=x.device)
        if self.down is not None:
            y = F.linear(F.linear(x, self.down.to(x)), self.up.to(x)) * (scale * self.lora_scale)
        if self.diff is not None:
            y = y + F.linear(x, self.diff.to(x)) * scale
        if self.diff_b is not None:
            y = y + self.diff_b.to(x) * scale
        return y

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> LoraDelta:
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        return LoraDelta(
            move(self.down), move(self.up), self.alpha, move(self.diff), move(self.diff_b), self.keys
        )


@dataclass
class _Target:
    """Something a LoRA can change: a layer (``weight`` and maybe ``bias``) or a bare parameter."""

    module: nn.Module  # the module a linear's hook is registered on
    weight: nn.Parameter
    bias: nn.Parameter | None
    linear: bool  # an nn.Linear: changed by a runtime adapter; otherwise patched in place
    bare: bool  # a parameter that is not a layer's weight (blocks.0.modulation, head.modulation)


def _targets(dit: nn.Module) -> dict[str, _Target]:
    """Every adaptable layer and bare parameter by our name (seen through peft wrappers to their base layer)."""
    out: dict[str, _Target] = {}
    for name, module in dit.named_modules():
        if _WRAPPER_PARTS & set(name.split(".")):
            continue
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        weight = base._parameters.get("weight")
        if isinstance(weight, nn.Parameter):
            linear = isinstance(base, nn.Linear)
            out[name] = _Target(module, weight, base._parameters.get("bias"), linear, bare=False)
        for pname, p in module._parameters.items():
            if pname not in ("weight", "bias") and isinstance(p, nn.Parameter):
                out[f"{name}.{pname}" if name else pname] = _Target(module, p, None, False, bare=True)
    return out


def _aliases(targets: Mapping[str, _Target]) -> dict[str, str]:
    """{name a file may use: our target name}: ours, original Wan and diffusers names, dotted and with
    underscores (Kohya). The first scheme to claim a name keeps it (none collide in the Wan 2.1 tables)."""
    keys = {(name if t.bare else f"{name}.weight"): name for name, t in targets.items()}
    out: dict[str, str] = {}
    for convert in (dict, to_wan_state_dict, to_diffusers_state_dict):
        for alias_key, key in convert({k: k for k in keys}).items():
            name = keys[key]
            alias = alias_key if targets[name].bare else alias_key.removesuffix(".weight")
            out.setdefault(alias, name)
            out.setdefault(alias.replace(".", "_"), name)
    return out


# ---------------------------------------------------------------------------------------------- reading


def read_lora(src: str | Path | Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA file, folder or state dict -> (tensors, metadata).

    Files: .safetensors (with its metadata), or .pt/.pth/.bin/.ckpt read with ``torch.load(weights_only=True)``.
    A folder holds ``adapter_model.safetensors`` (peft), ``pytorch_lora_weights.safetensors`` (diffusers) or a
    single .safetensors file. A peft ``adapter_config.json`` beside the file adds its ``lora_alpha`` and
    ``alpha_pattern`` to the metadata.
    """
    if isinstance(src, Mapping):
        return dict(src), {}
    path = Path(src)
    if path.is_dir():
        found = [path / n for n in LORA_FILES if (path / n).is_file()] or sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise FileNotFoundError(
                f"{path} holds {len(found) or 'no'} LoRA files; expected one of {', '.join(LORA_FILES)} "
                "or a single .safetensors file"
            )
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file at {path}")
    state = load_state_dict(path)
    metadata: dict[str, str] = {}
    if path.name.endswith(".safetensors"):
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    config = path.parent / "adapter_config.json"
    if config.is_file() and path.stem == "adapter_model":
        peft = json.loads(config.read_text())
        metadata.setdefault("lora_alpha", str(peft.get("lora_alpha")))
        metadata.setdefault("alpha_pattern", json.dumps(peft.get("alpha_pattern") or {}))
    return state, metadata


def _metadata_alphas(metadata: Mapping[str, str]) -> tuple[float | None, dict[str, float]]:
    """The adapter-wide alpha and per-module alpha patterns a file declares (ours, diffusers', peft's)."""
    if "alpha" in metadata:  # vidlatent.train.lora.save_lora
        return float(metadata["alpha"]), {}
    if DIFFUSERS_METADATA_KEY in metadata:
        config = json.loads(metadata[DIFFUSERS_METADATA_KEY])
        alpha = config.get("transformer.lora_alpha", config.get("lora_alpha"))
        patterns = config.get("transformer.alpha_pattern", config.get("alpha_pattern")) or {}
        return (None if alpha is None else float(alpha)), {k: float(v) for k, v in patterns.items()}
    if metadata.get("lora_alpha") not in (None, "None"):  # peft adapter_config.json
        patterns = json.loads(metadata.get("alpha_pattern") or "{}")
        return float(metadata["lora_alpha"]), {k: float(v) for k, v in patterns.items()}
    return None, {}


def _split_key(key: str) -> tuple[str, str] | None:
    """A file key -> (module as the file names it, kind), kind one of down, up, up_bias, alpha, diff, diff_b;
    None when the key is no LoRA tensor name."""
    body = key
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if body.startswith(prefix):
                body, changed = body[len(prefix) :], True
    if body.startswith(_KOHYA_PREFIX):
        body = body[len(_KOHYA_PREFIX) :].lstrip("_")
    match = _KEY.fullmatch(body)
    if match is None:
        return None
    module, kind = match["module"], match["kind"]
    if kind == "diff_m":  # lightx2v's name for a block's (or the head's) modulation delta
        return f"{module}.modulation", "diff"
    if kind.startswith(("lora_A", "lora_down")):
        return module, "down"
    if kind.startswith(("lora_B", "lora_up")):
        return module, "up_bias" if kind.endswith(".bias") else "up"
    return module, kind


# ---------------------------------------------------------------------------------------------- parsing


def parse_lora(
    dit: nn.Module,
    state: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    what: str | None = None,
) -> dict[str, LoraDelta]:
    """Any supported layout -> {our target name: LoraDelta}, every tensor checked against ``dit``.

    Alpha per module: its ``.alpha`` tensor, else the metadata's pattern or adapter-wide alpha, else None.
    Raises CheckpointMismatchError listing every key that names no layer of ``dit`` or is no LoRA tensor,
    every pair missing a half, and every tensor whose shape does not fit (key, shape got, shape needed).
    """
    targets = _targets(dit)
    aliases = _aliases(targets)
    default_alpha, alpha_patterns = _metadata_alphas(metadata or {})
    found: dict[str, dict] = {}
    alias_of: dict[str, str] = {}
    unknown, duplicate = [], []
    for key, value in state.items():
        split = _split_key(key)
        if split is None:
            unknown.append(f"{key} (not a LoRA tensor name)")
            continue
        module, kind = split
        name = aliases.get(module)
        if name is None:
            unknown.append(f"{key} (no layer {module} in this model)")
            continue
        entry = found.setdefault(name, {"keys": []})
        if kind in entry:
            duplicate.append(f"{key} (and {entry['key_of'][kind]})")
            continue
        entry[kind] = value
        entry.setdefault("key_of", {})[kind] = key
        entry["keys"].append(key)
        alias_of.setdefault(name, module)

    incomplete, shapes, out, zero_alphas = [], [], {}, []
    for name, entry in found.items():
        target, keys, key_of = targets[name], entry["keys"], entry["key_of"]
        has_pair = "down" in entry or "up" in entry
        has_diff = any(k in entry for k in ("diff", "diff_b"))
        half_pair = ("down" in entry) != ("up" in entry) or ("up_bias" in entry and not has_pair)
        if half_pair or not (has_pair or has_diff):  # e.g. A without B, or an alpha alone
            incomplete.append(f"{name} (has only {', '.join(keys)})")
            continue
        delta = LoraDelta(keys=keys)
        weight = target.weight
        if has_pair:
            a, b = entry["down"], entry["up"]
            a2 = a.flatten(1) if a.ndim > 2 else a
            b2 = b.flatten(1) if b.ndim > 2 and math.prod(b.shape[2:]) == 1 else b
            in_features = weight[0].numel() if weight.ndim >= 2 else None
            if target.bare or in_features is None:
                shapes.append(
                    f"{name}: a low-rank pair ({key_of['down']}) on a parameter of shape {tuple(weight.shape)}; "
                    "only linear (or patch-embedding) weights take one"
                )
            elif a2.ndim != 2 or a2.shape[1] != in_features:
                shapes.append(
                    f"{name}: A {tuple(a.shape)} ({key_of['down']}), expected (rank, {in_features})"
                )
            elif b2.ndim != 2 or b2.shape[0] != weight.shape[0]:
                shapes.append(
                    f"{name}: B {tuple(b.shape)} ({key_of['up']}), expected ({weight.shape[0]}, rank)"
                )
            elif a2.shape[0] != b2.shape[1]:
                shapes.append(
                    f"{name}: A has rank {a2.shape[0]} but B rank {b2.shape[1]} ({key_of['down']}, {key_of['up']})"
                )
            else:
                delta.down, delta.up = a2, b2
                delta.alpha = _alpha(entry, name, alias_of[name], default_alpha, alpha_patterns, shapes)
                if delta.alpha == 0 and "alpha" in entry:  # kohya's "no alpha": the rank (scale 1)
                    zero_alphas.append(key_of["alpha"])
                    delta.alpha = None
        if "diff" in entry:
            diff = entry["diff"]
            if _same_shape(diff.shape, weight.shape, loose=target.bare):
                delta.diff = diff.reshape(weight.shape)
            else:
                shapes.append(
                    f"{name}: {key_of['diff']} is {tuple(diff.shape)}, expected {tuple(weight.shape)}"
                )
        for kind in ("diff_b", "up_bias"):
            if kind not in entry:
                continue
            bias = entry[kind]
            if target.bias is None:
                shapes.append(f"{name}: {key_of[kind]} changes a bias, but this layer has none")
            elif tuple(bias.shape) != tuple(target.bias.shape):
                shapes.append(
                    f"{name}: {key_of[kind]} is {tuple(bias.shape)}, expected {tuple(target.bias.shape)}"
                )
            else:
                if kind == "up_bias":  # peft's lora_B.bias is scaled with the pair
                    bias = bias.float() * delta.lora_scale
                delta.diff_b = bias if delta.diff_b is None else delta.diff_b.float() + bias.float()
        out[name] = delta
    if not found and not unknown:
        unknown.append("(no tensors)")
    raise_if_mismatch(
        {"unknown keys": unknown, "duplicate keys": duplicate, "incomplete (A and B needed)": incomplete,
         "wrong shape": shapes},
        what or describe(dit),
    )  # fmt: skip
    if zero_alphas:
        more = ", ..." if len(zero_alphas) > 1 else ""
        warnings.warn(
            f"{len(zero_alphas)} LoRA alpha tensor(s) are 0 ({zero_alphas[0]}{more}): read as alpha = rank "
            "(scale 1), as kohya's sd-scripts reads a 0 alpha; diffusers and ComfyUI would apply nothing. Give a "
            "load scale to weaken it",
            stacklevel=3,
        )
    return out


def _same_shape(got: torch.Size, want: torch.Size, loose: bool) -> bool:
    """Equal shapes; for bare parameters, equal once size-1 dimensions are dropped ((1, 6, d) vs (6, d))."""
    if tuple(got) == tuple(want):
        return True
    return loose and [s for s in got if s != 1] == [s for s in want if s != 1]


def _alpha(entry, name, module, default, patterns, errors) -> float | None:
    if "alpha" in entry:
        value = entry["alpha"]
        if value.numel() != 1:
            errors.append(f"{name}: {entry['key_of']['alpha']} is {tuple(value.shape)}, expected a scalar")
            return None
        return float(value.reshape(()).item())
    for pattern, alpha in patterns.items():  # peft matches a pattern against the end of the module's name
        if re.match(rf"(.*\.)?({pattern})$", module):
            return alpha
    return default


def describe(dit: nn.Module) -> str:
    cfg = getattr(dit, "config", None)
    if cfg is None or not hasattr(cfg, "dim"):
        return "this model"
    return f"this VideoDiT (dim {cfg.dim}, ffn_dim {cfg.ffn_dim}, text_dim {cfg.text_dim}, {cfg.num_layers} blocks)"


def raise_if_mismatch(sections: Mapping[str, list[str]], what: str, accepted: bool = True) -> None:
    """Raise one CheckpointMismatchError listing every non-empty section (first 50 items of each)."""
    if not any(sections.values()):
        return
    lines = [f"LoRA weights do not fit {what}:"]
    for title, items in sections.items():
        if items:
            shown = items[:50] + ([f"... and {len(items) - 50} more"] if len(items) > 50 else [])
            lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
    if accepted:
        lines.append(ACCEPTED)
    raise CheckpointMismatchError("\n".join(lines))


# ---------------------------------------------------------------------------------------------- applying


@dataclass
class _Loaded:
    scale: float
    deltas: dict[str, LoraDelta]


class _LoraState:
    """The LoRAs loaded into one model (kept on it as ``_vidlatent_loras``; not a module, not in its state dict)."""

    def __init__(self):
        self.loras: dict[str, _Loaded] = {}
        self.hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self.originals: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # patched targets' values
        self.fused_originals: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # see fuse_lora
        self.fused = False


class _AdapterHook:
    """Forward hook on a linear layer: adds every loaded LoRA's term for it (nothing while they are fused)."""

    def __init__(self, state: _LoraState, name: str):
        self.state, self.name = state, name

    def __call__(self, module, args, output):
        if self.state.fused:
            return output
        x = args[0]
        for lora in self.state.loras.values():
            delta = lora.deltas.get(self.name)
            if delta is not None and lora.scale != 0:
                output = output + delta.forward(x, lora.scale)
        return output


def _state(dit: nn.Module, create: bool = False) -> _LoraState | None:
    state = dit.__dict__.get("_vidlatent_loras")
    if state is None and create:
        state = _LoraState()
        dit.__dict__["_vidlatent_loras"] = state
    return state


def _check_not_fused(state: _LoraState | None, doing: str) -> None:
    if state is not None and state.fused:
        raise ValueError(
            f"cannot {doing} while the LoRAs are fused into the weights; call unfuse_lora() first"
        )


@torch.no_grad()
def _repatch(dit: nn.Module, state: _LoraState, names: Iterable[str]) -> None:
    """Set patched (non-linear) targets to original + the sum of every LoRA's scaled delta."""
    targets = _targets(dit)
    for name in names:
        target = targets[name]
        weight0, bias0 = state.originals[name]
        weight, bias = weight0.float(), None if bias0 is None else bias0.float()
        for lora in state.loras.values():
            delta = lora.deltas.get(name)
            if delta is None:
                continue
            change = delta.weight_delta(weight.shape)
            if change is not None:
                weight = weight + lora.scale * change.to(weight.device)
            if delta.diff_b is not None:
                bias = bias + lora.scale * delta.diff_b.float().to(bias.device)
        target.weight.copy_(weight.to(target.weight.dtype))
        if bias0 is not None:
            target.bias.copy_(bias.to(target.bias.dtype))
        if not any(name in lora.deltas for lora in state.loras.values()):
            del state.originals[name]


def load_lora(
    dit: nn.Module,
    src: str | Path | Mapping[str, torch.Tensor],
    scale: float = 1.0,
    name: str | None = None,
) -> str:
    """Read a LoRA (file, folder or state dict, any layout above) and add it to ``dit`` under ``name``.

    ``name`` defaults to the file's stem (``-2``, ``-3``... appended when taken); returns the name used.
    Everything is checked before anything changes: a key naming no layer, a tensor of the wrong shape, a
    name already loaded, or fused LoRAs raise, leaving ``dit`` as it was. LoRAs add up; their tensors are
    kept on each layer's device and dtype.
    """
    state = _state(dit)
    _check_not_fused(state, "load a LoRA")
    taken = set() if state is None else set(state.loras)
    if name is None:
        stem = "lora" if isinstance(src, Mapping) else Path(src).stem or "lora"
        name, i = stem, 2
        while name in taken:
            name, i = f"{stem}-{i}", i + 1
    elif name in taken:
        raise ValueError(f"a LoRA named {name!r} is already loaded; unload it or choose another name")
    _check_scale(scale)
    tensors, metadata = read_lora(src)
    bad = nonfinite_names(tensors.items())
    if bad:
        where = "the state dict given" if isinstance(src, Mapping) else str(src)
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(
            f"LoRA {where} holds NaN/inf values in {', '.join(bad[:5])}{more}: the file is damaged"
        )
    deltas = parse_lora(dit, tensors, metadata)
    targets = _targets(dit)
    moved = {}
    for target_name, delta in deltas.items():
        weight = targets[target_name].weight
        dtype = weight.dtype if targets[target_name].linear else torch.float32
        moved[target_name] = delta.to(weight.device, dtype)

    state = _state(dit, create=True)
    state.loras[name] = _Loaded(float(scale), moved)
    try:
        patched = []
        for target_name in moved:
            target = targets[target_name]
            if target.linear:
                if target_name not in state.hooks:
                    state.hooks[target_name] = target.module.register_forward_hook(
                        _AdapterHook(state, target_name)
                    )
            else:
                if target_name not in state.originals:
                    bias = None if target.bias is None else target.bias.detach().clone()
                    state.originals[target_name] = (target.weight.detach().clone(), bias)
                patched.append(target_name)
        _repatch(dit, state, patched)
    except BaseException:
        unload_lora(dit, name)
        raise
    return name


def move_loras(dit: nn.Module, device: torch.device | str) -> None:
    """After ``dit.to(device)``: move its loaded LoRAs' factors there too (they are not parameters), so that
    an expert moved between the CPU and an accelerator keeps its LoRAs without a copy per step."""
    state = _state(dit)
    if state is None:
        return
    for loaded in state.loras.values():
        loaded.deltas = {name: delta.to(device) for name, delta in loaded.deltas.items()}


def lora_scales(dit: nn.Module) -> dict[str, float]:
    """{name: scale} of the LoRAs loaded into ``dit``, in loading order."""
    state = _state(dit)
    return {} if state is None else {n: lora.scale for n, lora in state.loras.items()}


def _check_scale(scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"a LoRA's scale must be a finite number; got {scale!r}")


def set_lora_scale(dit: nn.Module, name: str, scale: float) -> None:
    """Change one loaded LoRA's scale (0 turns it off; negative values subtract it)."""
    state = _state(dit)
    _loaded(state, name)
    _check_not_fused(state, "change a LoRA's scale")
    _check_scale(scale)
    state.loras[name].scale = float(scale)
    _repatch(dit, state, [n for n in state.loras[name].deltas if n in state.originals])


def unload_lora(dit: nn.Module, name: str | None = None) -> None:
    """Remove one LoRA (or, with ``name=None``, all): the layers it touched are as before it was loaded."""
    state = _state(dit)
    if state is None or not state.loras:
        if name is not None:
            _loaded(state, name)
        return
    names = list(state.loras) if name is None else [_loaded(state, name)]
    _check_not_fused(state, "unload a LoRA")
    touched = set()
    for n in names:
        touched.update(state.loras.pop(n).deltas)
    still = {t for lora in state.loras.values() for t in lora.deltas}
    for target in touched - still:
        if target in state.hooks:
            state.hooks.pop(target).remove()
    _repatch(dit, state, [t for t in touched if t in state.originals])


def _loaded(state: _LoraState | None, name: str) -> str:
    if state is None or name not in state.loras:
        loaded = ", ".join(state.loras) if state is not None and state.loras else "none"
        raise KeyError(f"no LoRA named {name!r} is loaded (loaded: {loaded})")
    return name


@torch.no_grad()
def _fuse(dit: nn.Module, sign: float, keep: bool) -> None:
    """Add (sign +1) or subtract (-1) every loaded LoRA's linear deltas; with ``keep``, first copy the weights
    that subtraction would not restore exactly (those not in fp32/fp64) to the CPU, or restore them from there."""
    state = _state(dit)
    targets = _targets(dit)
    for target_name in state.hooks:
        target = targets[target_name]
        if sign < 0 and target_name in state.fused_originals:
            weight0, bias0 = state.fused_originals.pop(target_name)
            target.weight.copy_(weight0)
            if bias0 is not None:
                target.bias.copy_(bias0)
            continue
        if sign > 0 and keep and target.weight.dtype not in (torch.float32, torch.float64):
            bias0 = None if target.bias is None else target.bias.detach().to("cpu", copy=True)
            state.fused_originals[target_name] = (target.weight.detach().to("cpu", copy=True), bias0)
        weight = target.weight.float()
        bias = None if target.bias is None else target.bias.float()
        for lora in state.loras.values():
            delta = lora.deltas.get(target_name)
            if delta is None or lora.scale == 0:
                continue
            change = delta.weight_delta(weight.shape)
            if change is not None:
                weight.add_(change, alpha=sign * lora.scale)
            if delta.diff_b is not None:
                bias.add_(delta.diff_b.float(), alpha=sign * lora.scale)
        target.weight.copy_(weight)
        if bias is not None:
            target.bias.copy_(bias)


def fuse_lora(dit: nn.Module, keep_originals: bool = True) -> None:
    """Add every loaded LoRA (at its scale) into the linear weights: the same output without the adapters'
    extra work per step. Loading, unloading and scale changes wait for ``unfuse_lora``. A no-op when fused.

    ``keep_originals``: weights held in bf16/fp16 are first copied to CPU memory, so that ``unfuse_lora``
    restores them exactly (subtracting again would leave a rounding step of the low precision in every
    weight); fp32 weights are restored by subtraction (to ~1e-7). False spares that memory when the LoRAs
    stay fused for good (the CLI).
    """
    state = _state(dit)
    if state is None or not state.loras:
        raise ValueError("no LoRA is loaded; load_lora first")
    if not state.fused:
        _fuse(dit, +1.0, keep_originals)
        state.fused = True


def unfuse_lora(dit: nn.Module) -> None:
    """Take the fused LoRAs out of the weights again (see ``fuse_lora``); they act as runtime adapters again.
    A no-op when nothing is fused."""
    state = _state(dit)
    if state is not None and state.fused:
        _fuse(dit, -1.0, keep=False)
        state.fused = False
