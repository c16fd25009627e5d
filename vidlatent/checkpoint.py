"""Weights in and out: safetensors first, never code execution, and precise errors when keys do not fit."""

from __future__ import annotations

import errno
import functools
import inspect
import json
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class CheckpointMismatchError(ValueError):
    """Raised when a state dict does not fit a model: lists missing, unexpected and mis-shaped keys."""


class ModelLoadError(ValueError):
    """A model file or folder exists but cannot be loaded (truncated, garbage, unsupported); names it."""


def _reason(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def names_source(what: str) -> Callable:
    """Decorator for loaders ``fn(..., src, ...)``: an error while loading an existing file or folder ``src``
    names it (``ModelLoadError: cannot load the <what> at <src>: ...``) unless its message already does.
    A FileNotFoundError (it names what is missing), a key mismatch report and an ImportError (a missing
    optional package) pass as they are."""

    def wrap(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def load(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (FileNotFoundError, CheckpointMismatchError, ModelLoadError, ImportError):
                raise
            except Exception as err:
                src = signature.bind_partial(*args, **kwargs).arguments.get("src")
                if src is None or not os.path.exists(src) or str(src) in str(err):
                    raise
                raise ModelLoadError(f"cannot load the {what} at {src}: {_reason(err)}") from err

        return load

    return wrap


def _torch_load(path: Path):
    """``torch.load`` of tensors only (``weights_only``), memory-mapped; a file in torch's legacy (pre-zip)
    format cannot be mapped and is read whole."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
    return torch.load(str(path), map_location="cpu", weights_only=True)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors, or from .pt/.pth/.bin with ``torch.load(weights_only=True)``.

    A ``*.safetensors.index.json`` (sharded diffusers/transformers checkpoint) loads every shard it names.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    name = path.name
    if name.endswith(".index.json"):
        index = read_json(path)
        if not isinstance(index.get("weight_map"), dict):
            raise ModelLoadError(f"cannot read {path}: it has no weight_map of shards")
        shards = sorted(set(index["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(load_state_dict(path.parent / shard))
        return out
    if name.endswith(".safetensors"):
        try:
            return load_file(str(path))
        except Exception as err:  # SafetensorError: a truncated file, a garbage header
            raise ModelLoadError(
                f"cannot read {path}: truncated or not a safetensors file ({_reason(err)})"
            ) from err
    if name.endswith((".pt", ".pth", ".bin", ".ckpt")):
        try:
            sd = _torch_load(path)
        except pickle.UnpicklingError as err:  # weights_only refused what the pickle would build
            raise ModelLoadError(
                f"cannot read {path}: it holds Python objects besides tensors, which are never loaded (loading "
                f"weights runs no code); save a plain state dict or safetensors ({_reason(err)})"
            ) from err
        except Exception as err:  # RuntimeError (not a zip), EOFError (truncated)
            raise ModelLoadError(
                f"cannot read {path}: truncated or not a torch checkpoint ({_reason(err)})"
            ) from err
        for key in ("state_dict", "model", "module"):
            if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
                sd = sd[key]
        if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ValueError(f"{path} does not hold a flat state dict of tensors")
        return dict(sd)
    raise ValueError(
        f"unsupported checkpoint file {path}: expected .safetensors, .pt, .pth, .bin or .index.json"
    )


def check_state_dict(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "model"
) -> None:
    """Raise CheckpointMismatchError listing every missing, unexpected and mis-shaped key."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {expected[k]}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != expected[k]
    )
    if missing or unexpected or shapes:
        lines = [f"checkpoint does not fit the {what}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if items:
                shown = items[:50] + ([f"... and {len(items) - 50} more"] if len(items) > 50 else [])
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        raise CheckpointMismatchError("\n".join(lines))


def load_into(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "model") -> None:
    """Check keys and shapes, then assign the tensors (works for models built on the meta device)."""
    check_state_dict(model, state_dict, what)
    ref = model.state_dict(keep_vars=True)  # every name, those of tied weights too
    converted = {
        k: v.to(dtype=ref[k].dtype) if ref[k].dtype.is_floating_point else v for k, v in state_dict.items()
    }
    model.load_state_dict(converted, strict=True, assign=True)


def current_umask() -> int:
    """The process umask (read without changing it), for giving temp files the usual permissions."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(err: BaseException) -> bool:
    """Whether an error (or one it was raised from) says the disk or quota is full; writers that are not
    Python's (safetensors, ffmpeg) only say so in their message."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            return True
        text = str(err)
        if "No space left on device" in text or "Disk quota exceeded" in text or "os error 28" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (this one does; another user's counts as running): a temporary named
    after a live writer is in use."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or a number no process has
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def temporary_prefix(name: str) -> str:
    """The start of ``atomic_write``'s temporary names for a target ``name``: ``.<name>.<pid>-``; the writer's
    process id tells a temporary file that a killed run left (``remove_stale_temporaries``) from one in use."""
    return f".{name}.{os.getpid()}-"


# a temporary of target NAME: ".NAME.<pid>-<random>.tmp<suffix>" (atomic_write), ".NAME.<pid>-<random>.old"
# (a folder moved aside), or ".NAME.<random>.tmp<suffix>" (an older vidlatent, before the writer's pid was in it)
_TEMPORARY = re.compile(
    r"\.(?P<target>.+)\.(?:(?P<pid>\d+)-[A-Za-z0-9_]+\.(?:tmp|old)|[A-Za-z0-9_]+\.tmp)(?:\.[^.]*)?"
)


def stale_temporaries(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """The temporary files and folders in ``folder`` that writers of the targets named in ``names`` left when
    they were killed: their process is gone (a name without a process id is an older vidlatent's, so stale
    too). Temporaries of live processes (a run writing there now) are left out. One pass over ``folder``."""
    names = set(names)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    out = []
    for entry in entries:
        match = _TEMPORARY.fullmatch(entry.name)
        if match and match["target"] in names and not (match["pid"] and process_alive(int(match["pid"]))):
            out.append(Path(entry.path))
    return out


def remove_temporaries(paths: Iterable[Path]) -> list[Path]:
    """Remove temporary files and folders (``stale_temporaries``'); returns those removed. One already gone,
    or that cannot be removed, is left: a hidden leftover nobody reads, which must not stop a write."""
    import shutil

    removed = []
    for path in paths:
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporary files and folders that writers of ``path`` left when they were killed (their
    process is gone); returns what was removed. Temporaries of live processes are left alone."""
    path = Path(path)
    return remove_temporaries(stale_temporaries(path.parent, [path.name]))


def files_fingerprint(*paths: str | os.PathLike) -> str:
    """16 hex digits identifying the files under ``paths`` (folders, or single files) without loading them: each
    file's relative name, size and first and last MiB (safetensors headers and the first weights), so another
    model, or the same one retrained, differs. Hidden files (temporaries) are left out. Cheap for an 11 GB
    encoder."""
    import hashlib

    h = hashlib.sha256()
    for path in map(Path, paths):
        if path.is_file():
            files, root = [path], path.parent
        else:
            files = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
            root = path
        for f in files:
            size = f.stat().st_size
            h.update(f"{f.relative_to(root)}:{size}".encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                if size > 2 << 20:
                    fh.seek(-(1 << 20), os.SEEK_END)
                    h.update(fh.read())
    return h.hexdigest()[:16]


def atomic_write(path: str | Path, write, clean_stale: bool = True) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: an interrupted write never leaves a partial file.

    ``tmp_path`` has ``path``'s name, inside a temporary folder beside ``path`` (named after ``path`` and this
    process) that is removed afterwards; so whatever the writer itself puts beside its file (safetensors
    writes through a ``.tmpXXXXXX`` of its own) goes with it, and a killed run's leftovers are one folder
    that the next write of ``path`` removes. A full disk (or quota) raises ``OSError(ENOSPC, ..., path)``
    naming ``path``, whichever library did the writing.

    Finding those leftovers scans ``path``'s folder. A writer of many files into one folder (a latent cache)
    removes every leftover once (``remove_temporaries(stale_temporaries(folder, names))``) and then writes with
    ``clean_stale=False``: a scan per file would make filling a folder of n files cost n^2."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if clean_stale:
        remove_stale_temporaries(path)
    folder = Path(
        tempfile.mkdtemp(prefix=temporary_prefix(path.name), suffix=".tmp" + path.suffix, dir=path.parent)
    )
    tmp = folder / path.name
    try:
        write(str(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())  # as an ordinary new file (some writers make 0600)
        os.replace(tmp, path)
    except BaseException as err:
        if isinstance(err, Exception) and is_disk_full(err):
            raise OSError(errno.ENOSPC, "no space left on device (nothing was written)", str(path)) from err
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def save_folder(folder: str | Path, state_dict: Mapping[str, torch.Tensor], config: dict, kind: str) -> None:
    """Write a vidlatent model folder: ``config.json`` (with ``_vidlatent_kind``) and ``model.safetensors``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    text = json.dumps({"_vidlatent_kind": kind, **config}, indent=2)
    atomic_write(folder / CONFIG_NAME, lambda p: Path(p).write_text(text))


def read_json(path: str | Path) -> dict:
    """A JSON object from a file; ModelLoadError naming the file when it is not one (garbage, truncated)."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"cannot read {path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    except UnicodeDecodeError:
        raise ModelLoadError(f"cannot read {path}: not a text file") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"cannot read {path}: expected a JSON object, found {type(data).__name__}")
    return data


def check_writable(path: str | Path, folder: bool = False) -> Path:
    """Fail before any work when ``path`` cannot be written (a file, or a folder with ``folder``): the type
    of what exists there, and a test file made in the nearest folder that exists. Creates nothing.
    Raises OSError (IsADirectoryError, NotADirectoryError, PermissionError, ...) naming ``path``."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "a broken symbolic link", str(path))
        if folder and not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(path))
        if not folder and path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder; give a file name", str(path))
    base = path if folder and path.is_dir() else path.parent
    while not base.exists():
        if base.is_symlink():
            raise FileNotFoundError(errno.ENOENT, f"{base} is a broken symbolic link", str(path))
        base = base.parent
    if not base.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"cannot be made: {base} is a file", str(path))
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as err:
        raise type(err)(err.errno, f"cannot write in {base} ({err.strerror})", str(path)) from None
    return path


def find_weights(folder: Path) -> Path:
    """The weights file of a model folder: ours, diffusers' (single or sharded), or a lone .safetensors/.pth."""
    names = (
        WEIGHTS_NAME,
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.safetensors.index.json",
        "model.safetensors.index.json",
        "diffusion_pytorch_model.bin",
    )
    for name in names:
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.pth")) + sorted(folder.glob("*.pt"))
    if len(found) == 1:
        return found[0]
    raise FileNotFoundError(
        f"no unique weights file in {folder}: looked for {', '.join(names)} or a single .safetensors/.pth"
        + (f"; found {', '.join(p.name for p in found)}" if found else "")
    )


# ------------------------------------------------------------------------------------------------ sources

SOURCE_KINDS = ("preset", "vidlatent", "file", "diffusers", "wan", "folder")
_MISSING = {  # what each loader says when ``src`` is neither a path, a shipped model nor one of its presets
    "vae": "no VAE at {src!r}: not a file or folder, and not a preset ({presets})",
    "dit": "{src!r} is neither a file, a folder, nor a dit preset ({presets})",
    "text": "no text encoder at {src!r}: not a folder, and not a preset ({presets})",
    "pipeline": "no pipeline at {src!r}: not a folder, and not a preset ({presets})",
    "control": "no control branch at {src!r}: not a folder",
    "image": "no image encoder at {src!r}: not a folder",
}

# The models shipped inside the package (``vidlatent/weights/<name>/``, a pipeline folder). Their names mean their
# trained weights to every loader; the architecture presets they were trained from are named ``<name>-arch``.
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
SHIPPED_MODELS = ("default",)
SHIPPED_PARTS = {  # the subfolder of a shipped pipeline folder that each loader reads
    "pipeline": ".",
    "vae": "vae",
    "dit": "dit",
    "text": "text_encoder",
    "control": "control",
    "image": "image_encoder",
}
_PART_NAMES = {"pipeline": "pipeline", "vae": "VAE", "dit": "denoiser", "text": "text encoder",
               "control": "control branch", "image": "image encoder"}  # fmt: skip


def shipped_model(name: str, kind: str = "pipeline") -> Path:
    """The folder of part ``kind`` (a key of ``SHIPPED_PARTS``) of the shipped model ``name``
    (``SHIPPED_MODELS``): FileNotFoundError saying what is missing when the package lacks it."""
    if name not in SHIPPED_MODELS:
        raise ValueError(f"no shipped model {name!r}; shipped: {', '.join(SHIPPED_MODELS)}")
    root = WEIGHTS_DIR / name
    if not (root / "dit").is_dir():
        raise FileNotFoundError(
            f"the {name} model is not installed (no weights at {root}); reinstall vidlatent, or give a folder "
            f"or a preset ({name}-arch, tiny: random weights)"
        )
    folder = (root / SHIPPED_PARTS[kind]).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"the shipped {name} model has no {_PART_NAMES[kind]} (no {folder})")
    return folder


@dataclass(frozen=True)
class Source:
    """Where a component loads from, told once by ``resolve_source``.

    ``kind``: "preset" (``name`` is a shipped yaml preset; random weights), "vidlatent" (a folder written by
    ``save_pretrained``: config.json with ``_vidlatent_kind``, or a pipeline folder with pipeline.json; also a
    shipped model's part, ``name`` being its name, e.g. "default"), "file"
    (one checkpoint file: safetensors or an original Wan .pth), "diffusers" (a diffusers pipeline root with
    model_index.json), "wan" (an original Wan 2.1 release folder: config.json of a WanModel) or "folder"
    (another folder: a diffusers component or a Hugging Face model; its loader reads its config.json).
    """

    kind: str
    name: str
    path: Path | None = None


def means_shipped_model(src: str | os.PathLike) -> bool:
    """Whether ``src`` stands for a shipped model (``SHIPPED_MODELS``) rather than a path: it is such a name and
    no such path exists, or the path is a folder that holds no model (no config or pipeline file, no part
    folders): a working folder named like the model, e.g. a recipe's output ``default/``, does not hide it (a
    warning says so). A file or a model folder of that name is loaded as the path it is."""
    if str(src) not in SHIPPED_MODELS:
        return False
    path = Path(src)
    if not path.exists():
        return True
    if path.is_file() or _holds_model(path):
        return False
    looked_for = ", ".join([*_MODEL_FILES, *(f"{d}/" for d in _MODEL_PARTS)])
    warnings.warn(
        f"./{src} is a folder that holds no model (none of {looked_for}); loading the shipped model {str(src)!r}",
        stacklevel=3,
    )
    return True


# what makes a folder a model folder to means_shipped_model: a config or pipeline file, or a part's folder
_MODEL_FILES = (CONFIG_NAME, "pipeline.json", "pipeline.yaml", "model_index.json")
_MODEL_PARTS = ("vae", "dit", "transformer", "text_encoder")


def _holds_model(folder: Path) -> bool:
    """Whether ``folder`` holds anything a loader reads (``_MODEL_FILES``, ``_MODEL_PARTS``)."""
    return any((folder / f).is_file() for f in _MODEL_FILES) or any(
        (folder / d).is_dir() for d in _MODEL_PARTS
    )


def named_part(src: str | os.PathLike, kind: str) -> str | os.PathLike | Path:
    """``src`` itself, unless it stands for a shipped model (``means_shipped_model``): then the folder of its
    part ``kind`` (``shipped_model``), for loaders that read folders only (control branch, image encoder)."""
    if means_shipped_model(src):
        return shipped_model(str(src), kind)
    return src


def is_wan_release(folder: Path) -> bool:
    """Whether ``folder`` is an original Wan 2.1 release folder: its config.json is a ``WanModel``'s."""
    if not (folder / CONFIG_NAME).is_file():
        return False
    raw = read_json(folder / CONFIG_NAME)
    wan_model = raw.get("_class_name") == "WanModel" or {"dim", "num_heads"} <= set(raw)
    return wan_model and "_vidlatent_kind" not in raw


def resolve_source(src: str | os.PathLike, kind: str, presets: list[str] | None = None) -> Source:
    """Tell what ``src`` is for a loader of ``kind`` (vae, dit, text, pipeline, control, image): an existing path
    (a file, or a folder of one of the layouts of ``Source``) first, then the name of a shipped model
    (``SHIPPED_MODELS``: its trained part for ``kind``, e.g. ``"default"`` -> ``weights/default/vae``), then a
    preset name (random weights); FileNotFoundError naming the presets (``presets``: the names accepted, default
    the shipped ``configs/<kind>/`` yaml files) and the shipped models when it is none of these."""
    path = Path(src)
    if means_shipped_model(src):
        folder = shipped_model(str(src), kind)
        return Source("vidlatent", str(src), folder)
    if not path.exists():
        if presets is None:
            from .config import list_presets  # configs only: no model code

            presets = list_presets(kind) if kind in ("vae", "dit", "text", "pipeline") else []
        if str(src) in presets:
            return Source("preset", str(src))
        names = ", ".join(p for p in presets if p not in SHIPPED_MODELS) or "none"
        shipped = f"; shipped models (trained weights): {', '.join(SHIPPED_MODELS)}"
        raise FileNotFoundError(_MISSING[kind].format(src=str(src), presets=names) + shipped)
    if path.is_file():
        return Source("file", str(src), path)
    if (path / "model_index.json").is_file():
        return Source("diffusers", str(src), path)
    if is_wan_release(path):
        return Source("wan", str(src), path)
    own = (path / "pipeline.json").is_file() or (path / "pipeline.yaml").is_file()
    if own or ((path / CONFIG_NAME).is_file() and "_vidlatent_kind" in read_json(path / CONFIG_NAME)):
        return Source("vidlatent", str(src), path)
    return Source("folder", str(src), path)


def override_items(overrides: Mapping | Sequence[str] | None) -> dict:
    """``from_pretrained``'s ``overrides`` (a dict of config fields, or ``key=value`` strings) as a dict."""
    if not overrides:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
