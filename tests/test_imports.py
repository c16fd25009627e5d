"""Import direction: the leaves stay leaves (checkpoint.py and metrics.py import no models), and the old
import paths of moved names still work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def loaded_after(module: str) -> set[str]:
    """The vidlatent modules in sys.modules after importing ``module`` in a fresh interpreter."""
    code = f"import sys, {module}; print(' '.join(m for m in sys.modules if m.startswith('vidlatent')))"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("module", ["vidlatent.checkpoint", "vidlatent.metrics", "vidlatent.data.paths"])
def test_leaves_import_no_models(module):
    loaded = loaded_after(module)
    assert module in loaded
    assert not {m for m in loaded if m.startswith(("vidlatent.models", "vidlatent.pipelines"))}, loaded


def test_old_paths_of_moved_names():
    from vidlatent import data, metrics
    from vidlatent.data import latents, paths
    from vidlatent.pipelines import batch, encode

    for name in ("encode_clips", "decode_latents", "latent_stats", "write_stats", "reconstruct", "load_vae"):
        assert getattr(encode, name) is getattr(batch, name)
    for name in ("load_latents", "read_latent_metadata", "latent_name", "vae_fingerprint", "FORMAT"):
        assert getattr(encode, name) is getattr(latents, name)
    assert encode.expand_paths is paths.expand_paths and encode.shard is paths.shard
    assert encode.psnr is metrics.psnr and encode.ssim_map is metrics.ssim_map
    assert data.io is not None
