"""A pipeline folder assembled from trained parts on disk, without loading them.

``VideoPipeline.save_pretrained`` writes a loaded pipeline; a training recipe instead has exported parts
(``<run>/final/vae``, ``dit``, ``text_encoder``) to put side by side with a ``pipeline.json``. Each part is
copied whole beside its place and swapped in, so an interrupted assembly leaves the old part or none.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..checkpoint import atomic_write

PARTS = ("vae", "dit", "text_encoder")


def copy_into_place(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy folder ``src`` to ``dest`` whole beside it first, then swap it in (an interrupted copy leaves the old
    folder or none, never half a one)."""
    src, dest = Path(src), Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def write_json(path: str | os.PathLike, data: dict) -> None:
    """``data`` as indented JSON with a final newline, written atomically."""
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def assemble_pipeline(
    folder: str | os.PathLike, parts: dict[str, str | os.PathLike], settings: dict, extra: dict | None = None
) -> Path:
    """A pipeline folder at ``folder``: each of ``parts`` (``vae``, ``dit``, ``text_encoder`` -> an exported
    folder) copied in, ``settings`` as its ``pipeline.json`` (``PipelineConfig`` fields), and each of ``extra``
    (file name -> dict) as a JSON file beside it. Fails naming every part that is missing."""
    folder = Path(folder)
    missing = [str(src) for src in parts.values() if not Path(src).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder}: no trained model at {', '.join(missing)}")
    folder.mkdir(parents=True, exist_ok=True)
    for name, src in parts.items():
        copy_into_place(src, folder / name)
    write_json(folder / "pipeline.json", settings)
    for name, data in (extra or {}).items():
        write_json(folder / name, data)
    return folder
