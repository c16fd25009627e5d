"""A control branch beside the denoiser (VACE, Wan 2.1's "all-in-one" control): steer generation by a video.

The branch reads control latents (``pipelines.control`` builds them: a control video's latents with a mask
folded in, and reference images as leading frames) through its own patch embedding, and runs them through
blocks of its own that are denoiser blocks (``DiTBlock``), sharing the denoiser's time modulation, text and
rope. Block 0 first adds the denoiser's own input tokens (through a projection, ``proj_in``); every block's
output goes through a projection (``proj_out``) to a hint, and hint ``j`` is added, times a scale, to the
denoiser's tokens after denoiser block ``config.layers[j]``. Both projections start at zero, so a fresh branch
leaves the denoiser as it was.

``ControlledDiT`` joins a ``VideoDiT`` and a ``ControlBranch`` into the one model the sampling loop calls
(``model(x, sigma, context, context_mask, control=..., control_scale=...)``); the denoiser knows nothing of
control beyond its ``hints`` argument. ``ControlledDiT.from_pretrained`` splits a diffusers
``WanVACETransformer3DModel`` folder or an original VACE checkpoint (``vace_blocks.*``, ``vace_patch_embedding``)
into the two.

Letters: b batch, c channels, t h w latent frames/height/width, n tokens, d width, j hints.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..checkpoint import (
    CONFIG_NAME,
    find_weights,
    load_into,
    load_state_dict,
    named_part,
    names_source,
    override_items,
    read_json,
    save_folder,
)
from ..config import ControlConfig, DiTConfig, config_from_dict, config_to_dict, control_config_for
from .dit import (
    DiTBlock,
    PatchEmbed,
    VideoDiT,
    _cast,
    config_from_diffusers,
    config_from_wan,
    detect_layout,
    from_diffusers_state_dict,
    from_wan_state_dict,
    infer_config,
    init_linears_and_patch,
    to_diffusers_state_dict,
    to_wan_state_dict,
)

CONTROL_KIND = "control"  # ``_vidlatent_kind`` of a saved control branch
VACE_PREFIX = "vace_"  # VACE's own parameters, in diffusers' and in the original layout alike
DIFFUSERS_VACE_LAYERS = [0, 5, 10, 15, 20, 25, 30, 35]  # diffusers' default (the 14B model's)
Scale = float | Sequence[float] | torch.Tensor


class ControlBlock(nn.Module):
    """A denoiser block between two projections: ``proj_in`` (block 0 only) adds the denoiser's input tokens
    to the control tokens, ``proj_out`` turns the block's output into a hint."""

    def __init__(self, cfg: DiTConfig, first: bool):
        super().__init__()
        self.proj_in = nn.Linear(cfg.dim, cfg.dim) if first else None
        self.block = DiTBlock(cfg)
        self.proj_out = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, c, x, text, time_mod, rope, context_mask, image=None):
        """(control tokens, hint) after this block; ``x`` are the denoiser's tokens entering its block 0."""
        if self.proj_in is not None:
            c = self.proj_in(c) + x
        c = self.block(c, text, time_mod, rope, context_mask, image)
        return c, self.proj_out(c)


class ControlBranch(nn.Module):
    """VACE's control branch: control latents -> one hint per entry of ``config.layers``."""

    def __init__(self, config: ControlConfig):
        super().__init__()
        layers = list(config.layers)
        if not layers or len(set(layers)) != len(layers) or min(layers) < 0:
            raise ValueError(f"control layers must be distinct block indices, at least one; got {layers}")
        self.config = config
        self.gradient_checkpointing = config.gradient_checkpointing
        self.patch_embed = PatchEmbed(config.in_channels, config.dim, tuple(config.patch_size))
        block_cfg = config.block_config()
        self.blocks = nn.ModuleList(ControlBlock(block_cfg, first=j == 0) for j in range(len(layers)))
        init_control_weights(self)

    def forward(
        self,
        latents: torch.Tensor,
        scale: torch.Tensor,
        tokens: torch.Tensor,
        text: torch.Tensor,
        time_mod: torch.Tensor,
        rope: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
    ) -> dict[int, torch.Tensor]:
        """``{denoiser block index: hint (b, n, d) * scale}`` for control ``latents`` (b, c, t, h, w) and a
        ``scale`` (b, j); the other arguments are the denoiser's embedded inputs (``VideoDiT.forward``'s
        ``hints``), ``tokens`` those entering its block 0. ``iter_hints`` gives the same one at a time."""
        return dict(self.iter_hints(latents, scale, tokens, text, time_mod, rope, context_mask, image))

    def iter_hints(self, latents, scale, tokens, text, time_mod, rope, context_mask=None, image=None):
        """``forward``'s hints as ``(denoiser block index, hint)`` pairs, each computed when it is asked for: a
        denoiser that draws them as its blocks reach them holds the control stream and one hint, not all of
        them (VACE 1.3B at 81x480x832: 15 hints of 96 MiB in bf16)."""
        c = self.patch_embed(latents.to(self.patch_embed.weight.dtype))
        for j, (layer, block) in enumerate(zip(self.config.layers, self.blocks)):
            args = (c, tokens, text, time_mod, rope, context_mask, image)
            tokens = None  # block 0 alone adds the denoiser's tokens: not kept past it
            if self.gradient_checkpointing and torch.is_grad_enabled():
                c, hint = checkpoint(block, *args, use_reentrant=False)
            else:
                c, hint = block(*args)
            del args
            yield layer, hint * scale[:, j, None, None].to(hint.dtype)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write a vidlatent folder (config.json + model.safetensors) that ``from_pretrained`` reads back; a
        pipeline folder holds its control branch so, in ``control/``."""
        save_folder(folder, self.state_dict(), config_to_dict(self.config), kind=CONTROL_KIND)

    @classmethod
    @names_source("control branch")
    def from_pretrained(
        cls,
        folder: str | Path,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        overrides=None,
    ) -> ControlBranch:
        """Load a folder written by ``save_pretrained``. ``dtype`` defaults to the stored one; modulation tables
        stay fp32. ``overrides``: ``ControlConfig`` fields (a dict or ``key=value`` strings) over the stored
        ones, e.g. ``gradient_checkpointing=true``. A shipped model's name (``"default"``) loads its branch.
        (A VACE checkpoint holds a denoiser too: ``ControlledDiT.from_pretrained`` reads those.)"""
        folder = Path(named_part(folder, "control"))
        meta = read_json(folder / CONFIG_NAME) if (folder / CONFIG_NAME).is_file() else {}
        if meta.get("_vidlatent_kind") != CONTROL_KIND:
            raise ValueError(
                f"{folder} is not a control branch folder: its config.json must say "
                f"_vidlatent_kind {CONTROL_KIND!r} (as ControlBranch.save_pretrained writes it); got "
                f"{meta.get('_vidlatent_kind') or meta.get('_class_name') or 'no config.json'}"
            )
        stored = {k: v for k, v in meta.items() if k != "_vidlatent_kind"}
        config = config_from_dict(ControlConfig, {**stored, **override_items(overrides)})
        state = load_state_dict(find_weights(folder))
        if dtype is None:
            dtype = next((v.dtype for k, v in state.items() if k.endswith("proj_out.weight")), torch.float32)
        with torch.device("meta"):
            branch = cls(config)
        _cast(branch, dtype)
        load_into(branch, state, what=f"ControlBranch ({folder})")
        return branch.to(device)


def init_control_weights(branch: ControlBranch) -> None:
    """Linear layers xavier-uniform with zero bias, the patch embedding too; block modulation tables as the
    denoiser's (gates zero); ``proj_in`` and ``proj_out`` zero, as VACE: a fresh branch adds nothing."""
    d = branch.config.dim
    init_linears_and_patch(branch, branch.patch_embed.weight, branch.patch_embed.bias)
    with torch.no_grad():
        for control_block in branch.blocks:
            modulation = control_block.block.modulation
            modulation.copy_(torch.randn_like(modulation) / d**0.5)
            modulation[:, [2, 5]] = 0.0
            for proj in (control_block.proj_in, control_block.proj_out):
                if proj is not None:
                    proj.weight.zero_()
                    proj.bias.zero_()


def check_fits(control: ControlConfig, dit: DiTConfig) -> None:
    """ValueError unless a branch of config ``control`` can run beside a denoiser of config ``dit``."""
    ours = (control.dim, control.num_heads, control.ffn_dim, list(control.patch_size), control.image_dim)
    theirs = (dit.dim, dit.num_heads, dit.ffn_dim, list(dit.patch_size), dit.image_dim)
    if ours != theirs:
        fields = "(width, heads, ffn width, patch, image_dim)"
        raise ValueError(
            f"the control branch is for a denoiser of {fields} = {ours}; this denoiser has {theirs}"
        )
    if max(control.layers) >= dit.num_layers:
        raise ValueError(
            f"the control branch adds hints after blocks {list(control.layers)}; this denoiser has "
            f"{dit.num_layers} blocks (0 ... {dit.num_layers - 1})"
        )


class ControlledDiT(nn.Module):
    """A denoiser with a control branch: ``model(x, sigma, context, context_mask, control=latents,
    control_scale=scale)`` -> velocity, the denoiser's own keywords (``image``, ``condition``) passed on."""

    def __init__(self, dit: VideoDiT, control: ControlBranch):
        super().__init__()
        check_fits(control.config, dit.config)
        self.dit, self.control = dit, control

    @property
    def config(self) -> DiTConfig:
        return self.dit.config

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        *,
        control: torch.Tensor,
        control_scale: Scale = 1.0,
        **kwargs,
    ) -> torch.Tensor:
        """Velocity for ``x`` (b, c, t, h, w) steered by ``control`` latents (b, control channels, t, h, w).

        ``control_scale``: one float for every hint, one per hint (a list or a (j,) tensor), or one per sample
        and hint (b, j): hint ``j`` is multiplied by it before it is added. Scale 0 gives the denoiser's own
        output exactly.
        """
        b = x.shape[0]
        want = (b, self.control.config.in_channels, *x.shape[2:])
        if control.ndim != 5 or tuple(control.shape) != want:
            raise ValueError(
                f"control latents must be (b, c, t, h, w) = {want} to fit x {tuple(x.shape)}; "
                f"got {tuple(control.shape)}"
            )
        layers = self.control.config.layers
        scale = hint_scales(control_scale, b, len(layers), x.device)
        in_order = list(layers) == sorted(layers)  # drawn as the blocks reach them; else all first
        hints = functools.partial(self.control.iter_hints if in_order else self.control, control, scale)
        return self.dit(x, sigma, context, context_mask, hints=hints, **kwargs)

    # ------------------------------------------------------------------------------------ weights io

    @classmethod
    @names_source("VACE denoiser")
    def from_pretrained(
        cls, src: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> ControlledDiT:
        """Load a diffusers ``WanVACETransformer3DModel`` folder (a pipeline root with ``transformer/`` too) or
        an original VACE checkpoint file or folder, split into a ``VideoDiT`` and a ``ControlBranch``. The
        configs come from config.json (diffusers' or VACE's), else from the tensor shapes (heads = dim / 128,
        hints evenly spaced from block 0, which is true of VACE 1.3B and 14B). ``dtype`` defaults to the
        checkpoint's; modulation tables and the time embedding stay fp32."""
        path = Path(src)
        meta: dict = {}
        if path.is_dir():
            if not (path / CONFIG_NAME).is_file() and (path / "transformer" / CONFIG_NAME).is_file():
                path = path / "transformer"
            meta = read_json(path / CONFIG_NAME) if (path / CONFIG_NAME).is_file() else {}
            path = find_weights(path)
        state = load_state_dict(path)
        dit_state, control_state = split_vace_state_dict(state)
        dit_cfg, control_cfg = vace_configs(meta, dit_state, control_state)
        if dtype is None:
            dtype = max(
                (v.dtype for v in state.values() if v.is_floating_point()),
                key=lambda t: sum(v.numel() for v in state.values() if v.dtype == t),
            )
        with torch.device("meta"):
            dit, control = VideoDiT(dit_cfg), ControlBranch(control_cfg)
        _cast(dit, dtype), _cast(control, dtype)
        load_into(dit, dit_state, what=f"VideoDiT (VACE checkpoint {path})")
        load_into(control, control_state, what=f"ControlBranch (VACE checkpoint {path})")
        return cls(dit, control).to(device)


def hint_scales(scale: Scale, b: int, j: int, device=None) -> torch.Tensor:
    """A float, ``j`` floats or a (b, j) tensor -> (b, j) fp32 scales; ValueError naming both shapes."""
    s = torch.as_tensor(scale, dtype=torch.float32, device=device)
    if s.ndim == 0:
        s = s.expand(j)
    if s.ndim == 1 and s.shape[0] == j:
        s = s.expand(b, j)
    if tuple(s.shape) != (b, j):
        raise ValueError(
            f"control_scale must be one float, {j} floats (one per hint) or (b, hints) = {(b, j)}; "
            f"got shape {tuple(s.shape)}"
        )
    return s


# -------------------------------------------------------------------------------- checkpoint layouts

_WAN_PREFIX = "model.diffusion_model."
_PROJ_NAMES = {"diffusers": ("proj_in", "proj_out"), "wan": ("before_proj", "after_proj")}
_THEIR_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_OUR_BLOCK = re.compile(r"blocks\.(\d+)\.(proj_in|proj_out|block)\.(.+)")
_TRANSLATE = {
    ("diffusers", "in"): from_diffusers_state_dict,
    ("wan", "in"): from_wan_state_dict,
    ("diffusers", "out"): to_diffusers_state_dict,
    ("wan", "out"): to_wan_state_dict,
}


def split_vace_state_dict(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A diffusers or original VACE state dict -> (VideoDiT keys, ControlBranch keys), vidlatent layout."""
    state = {k.removeprefix(_WAN_PREFIX): v for k, v in state.items()}
    layout = detect_layout(state)
    if layout not in _PROJ_NAMES:
        raise ValueError("not a VACE checkpoint: neither diffusers' keys nor the original Wan keys")
    translate = _TRANSLATE[layout, "in"]
    proj_in, proj_out = _PROJ_NAMES[layout]
    ours = {proj_in: "proj_in", proj_out: "proj_out"}
    main, control, block_params = {}, {}, {}
    for key, value in state.items():
        if not key.startswith(VACE_PREFIX):
            main[key] = value
            continue
        key = key.removeprefix(VACE_PREFIX)
        match = _THEIR_BLOCK.fullmatch(key)
        head = match[2].split(".")[0] if match else None
        if head in ours:
            control[f"blocks.{match[1]}.{ours[head]}{match[2][len(head) :]}"] = value
        else:
            block_params[key] = value
    for key, value in translate(block_params).items():
        match = _THEIR_BLOCK.fullmatch(key)
        control[f"blocks.{match[1]}.block.{match[2]}" if match else key] = value
    return translate(main), control


def join_vace_state_dict(
    dit_state: Mapping[str, torch.Tensor], control_state: Mapping[str, torch.Tensor], layout: str = "wan"
) -> dict[str, torch.Tensor]:
    """The inverse of ``split_vace_state_dict``: one state dict in diffusers' (``"diffusers"``) or the
    original VACE (``"wan"``) names."""
    if layout not in _PROJ_NAMES:
        raise ValueError(f"unknown layout {layout!r}; accepted: {', '.join(_PROJ_NAMES)}")
    translate = _TRANSLATE[layout, "out"]
    theirs = dict(zip(("proj_in", "proj_out"), _PROJ_NAMES[layout]))
    out, block_params = dict(translate(dit_state)), {}
    for key, value in control_state.items():
        match = _OUR_BLOCK.fullmatch(key)
        if match and match[2] != "block":
            out[f"{VACE_PREFIX}blocks.{match[1]}.{theirs[match[2]]}.{match[3]}"] = value
        else:
            block_params[f"blocks.{match[1]}.{match[3]}" if match else key] = value
    out.update({VACE_PREFIX + k: v for k, v in translate(block_params).items()})
    return out


def vace_configs(
    meta: Mapping, dit_state: Mapping[str, torch.Tensor], control_state: Mapping[str, torch.Tensor]
) -> tuple[DiTConfig, ControlConfig]:
    """(DiTConfig, ControlConfig) from a diffusers ``WanVACETransformer3DModel`` config.json, an original
    ``VaceWanModel`` one, or (no config) the tensor shapes."""
    if meta.get("_class_name") == "WanVACETransformer3DModel":
        dit = config_from_diffusers(meta)
        layers, in_channels = meta.get("vace_layers", DIFFUSERS_VACE_LAYERS), meta.get("vace_in_channels", 96)
    elif "num_heads" in meta and "dim" in meta:
        dit = config_from_wan({**meta, "model_type": "t2v"})  # VACE is a text-to-video Wan model
        layers = meta.get("vace_layers") or list(range(0, dit.num_layers, 2))
        in_channels = meta.get("vace_in_dim") or dit.in_channels
    else:
        dit = infer_config(dit_state)
        count = len({int(m[1]) for k in control_state if (m := _OUR_BLOCK.fullmatch(k))})
        if not count or dit.num_layers % count:
            raise ValueError(
                f"cannot tell which of the {dit.num_layers} blocks the {count} VACE blocks serve; "
                "load a folder with its config.json"
            )
        layers = list(range(0, dit.num_layers, dit.num_layers // count))
        in_channels = control_state["patch_embed.weight"].shape[1]
    return dit, control_config_for(dit, layers=layers, in_channels=in_channels)
