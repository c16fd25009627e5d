"""Context-parallel sampling: every denoiser call of a job spread over the ranks of a ``torchrun`` run.

Two ways to split one call, combined on a grid of ``cfg x sequence`` ranks (``world = cfg * sequence``):

* **sequence** (Ulysses, Jacobs et al. 2023): each rank of a sequence group holds a contiguous share of the
  video tokens from the patch embedding to the head. Everything per token (projections, norms, the MLP,
  cross-attention to the text, which every rank holds whole) runs on the share alone; self-attention trades
  token shares for head shares with one all-to-all, attends over the whole sequence for ``heads / sequence``
  heads, and trades back with a second one. Rotary positions are sliced from the whole grid's, so every token
  turns by its global position. A token count that does not divide is padded at the end; the padded keys are
  masked out of attention and the padded outputs dropped. The head count must divide ``sequence``.
* **cfg**: with classifier-free guidance the sampling loop calls the denoiser on ``[cond; uncond]`` as one
  batch; with ``cfg=True`` the first half runs on one sequence group and the second on the other, and the
  halves are joined by an all-gather. A batch that does not split in two (no guidance), or a call with a
  control branch's hints (they hold the whole batch), runs whole on both groups.

Every rank ends a call holding the whole output, so the sampler and hooks run as in one process and the
result equals the single-process one (within float rounding; measured in tests/test_context_parallel.py).

The VAE decode (``ContextParallel.decode``, which ``VideoPipeline.decode`` calls under context parallel) is
shared too when it tiles: the spatial tiles of the single-process tiled decode are dealt out round-robin over
all ranks, each round's tiles all-gathered, and every rank blends them in the single-process order, so the
video is the single-process tiled decode's (tests/test_context_parallel_vae.py). A decode that does not tile
runs whole on every rank. A job without a seed takes rank 0's fresh one (``broadcast_seed``), so every rank
samples the same video.

Letters: b batch, n tokens (l: one rank's share), k heads, e head dim, w ranks of a group, f features.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange

from ..models.layers import attention

__all__ = [
    "ContextParallel",
    "active",
    "broadcast_seed",
    "context_parallel",
    "disable",
    "is_main",
    "join",
    "launched",
    "split_tiled_decode",
]


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched() -> bool:
    """Whether this process is one of several that torchrun started (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device=None) -> torch.device:
    """Join torchrun's process group (gloo on the CPU, nccl on CUDA) and return this rank's device:
    ``device``, else ``cuda:<LOCAL_RANK>`` where CUDA is available, else the CPU."""
    from ..train.distributed import setup

    return setup(device)[1]


def leave(wait: bool = True) -> None:
    """Leave the default process group, if this process is in one (nothing otherwise).

    ``wait``: first wait at a barrier for every rank, so that no rank closes its connections while another still
    sends on them; a rank stopping on an error passes ``wait=False`` and leaves at once (its peers may never
    reach the barrier; torchrun stops them). Leaving explicitly matters: a gloo group left for the interpreter's
    exit to tear down can abort the process ("terminate called without an active exception")."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def is_main() -> bool:
    """Whether this process writes outputs: rank 0, or the only process."""
    return _world()[0] == 0


def broadcast_seed(seed: int) -> int:
    """Rank 0's ``seed`` on every rank (each rank may have drawn its own fresh one); ``seed`` alone otherwise."""
    if _world()[1] == 1:
        return seed
    box = [seed]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class ContextParallel:
    """One rank's part in spreading a denoiser call (see the module docstring). Made by ``context_parallel``;
    ``VideoDiT.forward`` calls ``forward``, ``split`` and ``gather``, its self-attention calls ``attend``."""

    def __init__(self, num_heads: int, cfg: bool = False):
        rank, world = _world()
        if world == 1:
            raise ValueError("context-parallel sampling needs a process group of 2 or more ranks (torchrun)")
        self.cfg = 2 if cfg else 1
        if world % self.cfg:
            raise ValueError(f"cfg parallel splits the ranks in two groups; world size {world} is odd")
        self.sequence = world // self.cfg
        if num_heads % self.sequence:
            raise ValueError(
                f"sequence parallel splits attention heads across {self.sequence} ranks; the denoiser's "
                f"{num_heads} heads do not divide: use a world size whose sequence part divides {num_heads}"
                f"{' (with cfg parallel: world = 2 x sequence)' if cfg else ''}"
            )
        self.part, self.index = divmod(rank, self.sequence)  # which cfg half, which token share
        self.sequence_group = self.cfg_group = None
        if self.cfg > 1:  # every rank makes every group, in the same order
            for j in range(self.cfg):
                group = dist.new_group(list(range(j * self.sequence, (j + 1) * self.sequence)))
                self.sequence_group = group if j == self.part else self.sequence_group
            for i in range(self.sequence):
                group = dist.new_group([i + j * self.sequence for j in range(self.cfg)])
                self.cfg_group = group if i == self.index else self.cfg_group
        self.tokens = 0  # the real token count of the call under way (set by ``split``; padding lies past it)

    # ------------------------------------------------------------------------- the batch (cfg halves)

    def forward(self, inner, x: torch.Tensor, *args, hints=None, **kwargs) -> torch.Tensor:
        """``inner(x, *args, hints=hints, **kwargs)`` on this rank's half of the batch, the halves all-gathered.
        Tensors whose first size is the batch's are split; others (a 0-dim sigma) go to both halves."""
        b = x.shape[0]
        if self.cfg == 1 or b % self.cfg or hints is not None:
            return inner(x, *args, hints=hints, **kwargs)

        def half(v):
            return (
                v.chunk(self.cfg)[self.part]
                if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == b
                else v
            )

        out = inner(half(x), *map(half, args), hints=hints, **{k: half(v) for k, v in kwargs.items()})
        parts = [torch.empty_like(out) for _ in range(self.cfg)]
        dist.all_gather(parts, out.contiguous(), group=self.cfg_group)
        return torch.cat(parts)

    # ------------------------------------------------------------------------- the tokens (sequence)

    def _share(self, v: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's contiguous share of ``v`` along ``dim`` (of size ``self.tokens``), zero-padded first."""
        pad = -self.tokens % self.sequence
        if pad:
            widths = [0, 0] * (v.ndim - 1 - dim) + [0, pad]
            v = F.pad(v, widths)
        return v.chunk(self.sequence, dim=dim)[self.index]

    def split(self, tokens: torch.Tensor, rope: torch.Tensor, time_emb: torch.Tensor, time_mod: torch.Tensor):
        """This rank's share of the tokens (b n f), of their rotations (n e/2 2) and, where noise levels are
        per token, of the time embedding (b n f) and modulation (b n s f)."""
        self.tokens = tokens.shape[1]
        per_token = time_mod.ndim == 4
        return (
            self._share(tokens, 1),
            self._share(rope, 0),
            self._share(time_emb, 1) if per_token else time_emb,
            self._share(time_mod, 1) if per_token else time_mod,
        )

    def split_tokens(self, v: torch.Tensor) -> torch.Tensor:
        """This rank's share of a per-token tensor (b n f), e.g. a control hint."""
        return self._share(v, 1)

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """The whole sequence (b n f) from every rank's share, padding dropped."""
        if self.sequence == 1:
            return out
        parts = [torch.empty_like(out) for _ in range(self.sequence)]
        dist.all_gather(parts, out.contiguous(), group=self.sequence_group)
        return torch.cat(parts, dim=1)[:, : self.tokens]

    def _all_to_all(self, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(v)
        dist.all_to_all_single(out, v, group=self.sequence_group)
        return out

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
        """Self-attention of this rank's token share ``(b k l e)`` over the whole sequence: an all-to-all to
        ``(b k/w n e)``, attention (padded keys masked), and an all-to-all back."""
        if self.sequence == 1:
            return attention(q, k, v, backend=backend)
        w = self.sequence
        q, k, v = (
            rearrange(self._all_to_all(rearrange(z, "b (w k) l e -> w b k l e", w=w).contiguous()),
                      "w b k l e -> b k (w l) e")
            for z in (q, k, v)
        )  # fmt: skip
        n = q.shape[2]
        mask = None
        if n != self.tokens:
            mask = (torch.arange(n, device=q.device) < self.tokens).expand(q.shape[0], n)
        out = attention(q, k, v, mask=mask, backend=backend)
        out = self._all_to_all(rearrange(out, "b k (w l) e -> w b k l e", w=w).contiguous())
        return rearrange(out, "w b k l e -> b (w k) l e")

    # ------------------------------------------------------------------------- the VAE decode

    def decode(self, vae, z: torch.Tensor) -> torch.Tensor:
        """``vae.decode(z)`` with its spatial tiles shared among all ranks (``split_tiled_decode``) where the
        VAE tiles this size (``config.auto_tile_above``); whole on every rank where it does not."""
        sf = vae.spatial_factor
        if vae._use_tiling(None, z.shape[-2] * sf, z.shape[-1] * sf):
            return split_tiled_decode(vae, z)
        return vae.decode(z)


# ----------------------------------------------------------------------------- the VAE decode, split by tiles


def split_tiled_decode(vae, z: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """``vae.decode(z, chunk_size, tile=True)`` on every rank, each rank decoding a share of the tiles.

    The tiles are the single-process ones (``config.tile_size`` / ``tile_overlap``); tile i goes to rank
    ``i % world``. Round r decodes tiles ``r * world .. r * world + world - 1`` (one per rank; a rank past the
    last tile sends zeros) and all-gathers them, so a rank holds ``world`` tiles and the canvas at a time.
    Every rank blends the tiles in the single-process order with the same weights, so the result is that
    decode's, whatever the tile count and world size. Without a process group: ``vae.decode`` itself.
    """
    from ..models.vae import _ramp, _tile_starts

    rank, world = _world()
    if world == 1:
        return vae.decode(z, chunk_size, tile=True)
    vae._check_latents(z)
    z = z.to(device=vae.device, dtype=vae.dtype)
    chunk = vae.config.chunk_size if chunk_size is None else chunk_size
    sf = vae.spatial_factor
    tile = max(1, vae.config.tile_size // sf)  # the sizes of CausalVAE.decode's tiling, in latent pixels
    overlap = min(tile - 1, vae.config.tile_overlap // sf)
    h, w = z.shape[-2:]
    stride = tile - overlap
    ys, xs = _tile_starts(h, tile, stride), _tile_starts(w, tile, stride)
    starts = [(y0, x0) for y0 in ys for x0 in xs]
    o_overlap = overlap * sf
    out = weights = shape = None
    for first in range(0, len(starts), world):
        mine = first + rank
        piece = None
        if mine < len(starts):
            y0, x0 = starts[mine]
            piece = vae._decode_pixels(z[..., y0 : y0 + tile, x0 : x0 + tile], chunk)
        if shape is None:  # every tile has one shape (the last start is size - tile); rank 0 always has one
            box = [tuple(piece.shape) if rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            shape = box[0]
            out = z.new_zeros((*shape[:3], h * sf, w * sf))
            weights = z.new_zeros((h * sf, w * sf))
        parts = [z.new_empty(shape) for _ in range(world)]
        dist.all_gather(parts, piece.contiguous() if piece is not None else z.new_zeros(shape))
        for (y0, x0), piece in zip(starts[first : first + world], parts):
            ph, pw = piece.shape[-2:]
            oy, ox = y0 * sf, x0 * sf
            wy = _ramp(ph, min(o_overlap, ph), y0 > 0, y0 + tile < h)
            wx = _ramp(pw, min(o_overlap, pw), x0 > 0, x0 + tile < w)
            mask = (wy[:, None] * wx[None, :]).to(piece)
            out[..., oy : oy + ph, ox : ox + pw] += piece * mask
            weights[oy : oy + ph, ox : ox + pw] += mask
    return (out / weights).clamp(-1.0, 1.0)


def active(pipe) -> ContextParallel | None:
    """The ``ContextParallel`` a pipeline's denoiser runs under, or None."""
    return getattr(getattr(pipe, "dit", None), "context_parallel", None)


def context_parallel(pipe_or_model, cfg: bool = False) -> ContextParallel:
    """Spread every denoiser call of a pipeline (its ``dit`` and ``dit_2``) or of one ``VideoDiT`` over the ranks
    of the initialized default process group (``train.distributed.setup`` joins torchrun's). ``cfg``: guidance's
    two halves on two rank groups. ValueError when the heads or ranks do not divide (see ``ContextParallel``)."""
    from ..models.dit import VideoDiT

    models = (
        [pipe_or_model] if isinstance(pipe_or_model, VideoDiT) else [pipe_or_model.dit, pipe_or_model.dit_2]
    )
    models = [m for m in models if m is not None]
    cp = ContextParallel(models[0].config.num_heads, cfg=cfg)
    for model in models:
        model.context_parallel = cp
        for block in model.blocks:
            block.self_attn.exchange = cp.attend
    return cp


def disable(pipe_or_model) -> None:
    """Undo ``context_parallel``: the denoisers run whole on each rank again."""
    from ..models.dit import VideoDiT

    models = (
        [pipe_or_model] if isinstance(pipe_or_model, VideoDiT) else [pipe_or_model.dit, pipe_or_model.dit_2]
    )
    for model in (m for m in models if m is not None):
        model.context_parallel = None
        for block in model.blocks:
            block.self_attn.exchange = None
