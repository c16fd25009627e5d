"""Where each weight lives during a run: offload of a pipeline's parts (``"model"``) or of the denoiser's blocks
(``"blocks"``). One ``Placement`` per pipeline decides it; nothing else moves weights.

Every weight has one host tensor, the one read at load (pinned once when the accelerator is CUDA, so copies to
it overlap compute). A part on the accelerator holds copies made from those host tensors; leaving the
accelerator only drops the copies (inference never changes a weight), so no weight is ever copied back and
the host holds each weight once.

* ``"model"``: the text encoder, the image encoder, the denoiser (with its control branch) and the VAE are each
  on the accelerator only while they run: entering one sends the previous one back.
* ``"blocks"``: the same for the encoders and the VAE, which also gathers its decoded frames on the host as
  its time chunks come out (``CausalVAE.decode(out_device=)``), so the accelerator holds one chunk's
  activations. The denoiser's small parts (embedders, head, control branch) are there while it runs and its
  blocks stream through: while block i runs, blocks i+1 .. i+resident-1 are copied on a side stream, so at
  most ``resident`` blocks are on the accelerator at once (the next step's first blocks are prefetched while
  the last ones run).

Outputs are those of the plain run on the same device: the same weights, the same kernels, in the same order.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

OFFLOAD_MODES = ("none", "model", "blocks")
VAE_ENTRIES = ("encode", "decode", "encode_step", "decode_step")  # every CausalVAE call that runs weights
Transfer = Callable[[torch.Tensor, torch.device], torch.Tensor]


def copy_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The accelerator copy of a host tensor (asynchronous from pinned memory)."""
    return tensor.to(device, non_blocking=True)


class WeightGroup:
    """Weights that move together (a part, or one denoiser block): their host tensors, and while loaded the
    accelerator copies that the modules' parameters and buffers point at."""

    def __init__(self, name: str, modules: Iterable[nn.Module], skip: Iterable[nn.Module] = (), pin=False):
        self.name, self.loaded, self.loads = name, False, 0
        self.modules, self.skip, self.pin = list(modules), list(skip), pin
        self.slots: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter or buffer, its host tensor)
        self._known: set[int] = set()
        self._event, self._copies = None, []
        self.scan()

    def scan(self) -> None:
        """Take in weights the modules gained since (a LoRA's adapters); those of ``skip`` modules move apart."""
        skip = {id(t) for m in self.skip for t in (*m.parameters(), *m.buffers())}
        for module in self.modules:
            for t in (*module.parameters(), *module.buffers()):
                if id(t) in self._known or id(t) in skip:
                    continue
                self._known.add(id(t))
                if (
                    t.device.type != "cpu"
                ):  # a part handed over on the accelerator: its host copy is made once
                    t.data = t.data.to("cpu")
                if self.pin and not t.data.is_pinned():
                    t.data = t.data.pin_memory()  # the pinned tensor replaces the loaded one: one host copy
                self.slots.append((t, t.data))

    @property
    def nbytes(self) -> int:
        return sum(host.numel() * host.element_size() for _, host in self.slots)

    def load(self, device: torch.device, transfer: Transfer, stream=None) -> None:
        """Start copying to ``device`` (on ``stream`` when given: ``ready`` makes the current stream wait)."""
        if self.loaded:
            return
        self.scan()
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            self._copies = [transfer(host, device) for _, host in self.slots]
            if stream is not None:
                self._event = torch.cuda.Event()
                self._event.record(stream)
        for (t, _), copy in zip(self.slots, self._copies):
            t.data = copy
        self.loaded, self.loads = True, self.loads + 1

    def ready(self) -> None:
        """Before the weights are used: the current stream waits for their copy, and owns the copies' memory
        until its work on them is done (so a later prefetch cannot reuse it early)."""
        if self._event is not None:
            current = torch.cuda.current_stream()
            current.wait_event(self._event)
            for copy in self._copies:
                copy.record_stream(current)
            self._event = None
        self._copies = []

    def release(self) -> None:
        """Point the weights back at their host tensors; the accelerator copies are dropped."""
        if not self.loaded:
            return
        self.ready()
        for t, host in self.slots:
            t.data = host
        self.loaded = False


class Placement:
    """The one place that decides where a pipeline's weights live (see the module docstring).

    ``parts``: {name: modules that move together}; ``entries``: {name: (module, method names)} whose calls
    bring that part to the accelerator; ``blocks``: the denoiser's blocks to stream (``"blocks"`` mode).
    ``transfer`` makes an accelerator copy of a host tensor (tests pass a counting CPU copy for a fake
    accelerator). ``log``: when set, every block's entry appends ``(block, sorted resident blocks)``.

    Weights changed in place (``fuse_lora``) must be changed on the host, where parts wait between jobs
    (``offload_all`` sends them all there). Parameters added later are taken in when their part next moves;
    unfused LoRA factors (``models.lora`` keeps them outside the modules) are not moved.
    """

    def __init__(
        self,
        mode: str,
        device: torch.device | str,
        parts: dict[str, list[nn.Module]],
        entries: dict[str, list[tuple[nn.Module, tuple[str, ...]]]],
        blocks: nn.ModuleList | None = None,
        resident: int = 2,
        transfer: Transfer = copy_to,
        gather: dict[str, tuple[str, ...]] | None = None,
    ):
        if mode not in OFFLOAD_MODES[1:]:
            raise ValueError(f"unknown offload {mode!r}; accepted: {', '.join(OFFLOAD_MODES)}")
        if resident < 1:
            raise ValueError(f"resident must be >= 1 (blocks on the accelerator at once); got {resident}")
        self.mode, self.device, self.transfer = mode, torch.device(device), transfer
        self.host = torch.device("cpu")
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda and mode == "blocks" else None
        skip = list(blocks or [])
        self.parts = {name: WeightGroup(name, mods, skip, pin=cuda) for name, mods in parts.items() if mods}
        self.blocks = [WeightGroup(f"block {i}", [b], pin=cuda) for i, b in enumerate(blocks or [])]
        self.resident = min(resident, max(1, len(self.blocks)))
        self.active: str | None = None
        self.log: list | None = None
        self.max_resident = 0
        me = weakref.ref(self)  # hooks hold the placement weakly: dropping the pipeline frees everything
        gather = gather or {}
        for name, calls in entries.items():
            for module, methods in calls:
                if isinstance(module, nn.Module) and methods == ("forward",):
                    module.register_forward_pre_hook(functools.partial(_pre_hook, me, name))
                    continue
                for method in methods:
                    original = getattr(module, method)
                    setattr(module, method, _entry(me, name, original, method in gather.get(name, ())))
        for i, block in enumerate(blocks or []):
            block.register_forward_pre_hook(functools.partial(_block_before, me, i))
            block.register_forward_hook(functools.partial(_block_after, me, i))
        for group in self.parts.values():  # everything starts on the host
            group.release()

    def activate(self, name: str) -> None:
        """Bring part ``name`` to the accelerator, sending the part there before it back to the host."""
        if self.active == name:
            return
        if self.active is not None:
            self.parts[self.active].release()
            for block in self.blocks:
                block.release()
        group = self.parts.get(name)
        if group is not None:
            group.load(self.device, self.transfer)
            group.ready()
        self.active = name

    def offload_all(self) -> None:
        """Send every part and block back to the host (e.g. before handing the accelerator to other work)."""
        for group in [*self.parts.values(), *self.blocks]:
            group.release()
        self.active = None

    def block_before(self, i: int) -> None:
        """Block ``i`` is about to run: its weights there (waiting for a prefetch), the next ones on their way."""
        block = self.blocks[i]
        block.load(self.device, self.transfer)
        block.ready()
        n = len(self.blocks)
        for j in range(i + 1, i + self.resident):
            self.blocks[j % n].load(self.device, self.transfer, self.stream)
        resident = [k for k, b in enumerate(self.blocks) if b.loaded]
        self.max_resident = max(self.max_resident, len(resident))
        if self.log is not None:
            self.log.append((i, resident))

    def block_after(self, i: int) -> None:
        """Block ``i`` has run: its copies go (the current stream still owns their memory until it is done)."""
        self.blocks[i].release()

    @property
    def loads(self) -> dict[str, int]:
        """How often each part and block was copied to the accelerator."""
        return {g.name: g.loads for g in [*self.parts.values(), *self.blocks]}


def _pre_hook(ref, name, module, args):
    placement = ref()
    if placement is not None:
        placement.activate(name)


def _block_before(ref, i, module, args):
    placement = ref()
    if placement is not None:
        placement.block_before(i)


def _block_after(ref, i, module, args, output):
    placement = ref()
    if placement is not None:
        placement.block_after(i)


def _entry(ref, name: str, method, gather: bool):
    """``method`` wrapped: its part is brought to the accelerator first; ``gather``: outputs collected on the
    host as they are made (``out_device``), where the caller did not choose."""

    @functools.wraps(method)
    def call(*args, **kwargs):
        placement = ref()
        if placement is not None:
            placement.activate(name)
            if gather:
                kwargs.setdefault("out_device", placement.host)
        return method(*args, **kwargs)

    return call


def pipeline_placement(pipe, mode: str, device, resident: int = 2, transfer: Transfer = copy_to) -> Placement:
    """The placement of a ``VideoPipeline``'s parts for ``mode`` (``"model"`` or ``"blocks"``) on ``device``.

    Parts: the text encoder (its ``encode``), the image encoder (its ``encode``), the denoiser with its control
    branch (their forward), the VAE (``encode``/``decode`` and their streaming steps). In ``"blocks"`` mode the
    denoiser's blocks stream (``resident`` at once) and the VAE gathers decoded frames on the host.
    """
    dit_2 = getattr(pipe, "dit_2", None)  # Wan 2.2 A14B's second expert moves with the first ("model" only)
    denoiser = [m for m in (pipe.dit, dit_2, pipe.control_branch) if m is not None]
    parts = {
        "text_encoder": [pipe.text_encoder],
        "image_encoder": [pipe.image_encoder] if pipe.image_encoder is not None else [],
        "denoiser": denoiser,
        "vae": [pipe.vae],
    }
    entries = {
        "text_encoder": [(pipe.text_encoder, ("encode",))],
        "image_encoder": [(pipe.image_encoder, ("encode",))] if pipe.image_encoder is not None else [],
        "denoiser": [(m, ("forward",)) for m in denoiser],
        "vae": [(pipe.vae, VAE_ENTRIES)],
    }
    blocks = pipe.dit.blocks if mode == "blocks" else None
    gather = {"vae": ("decode",)} if mode == "blocks" else None
    return Placement(mode, device, parts, entries, blocks, resident, transfer, gather)
