"""scripts/probe_latents.py: linear probes of colour, shape and motion on pooled latents vs pooled pixels."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import probe_latents  # noqa: E402


def blob(x: float, y: float, t: int = 5, size: int = 16) -> torch.Tensor:
    """One bright square at (x, y) in [-1, 1] on a dark frame, all ``t`` frames alike: (1, 3, t, size, size)."""
    v = -torch.ones(1, 3, t, size, size)
    cx, cy = int((x + 1) / 2 * (size - 4)), int((y + 1) / 2 * (size - 4))
    v[..., cy : cy + 4, cx : cx + 4] = 1.0
    return v


@pytest.mark.parametrize("t", [2, 5, 17])
def test_moments_say_where_the_object_went(t):
    for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1)):
        clip = blob(0, 0, t)
        clip[:, :, -1] = blob(0.8 * dx, 0.8 * dy, 1)[:, :, 0]
        f = probe_latents.pool(clip, moments=True).view(3, 10)  # per channel: 4 stats, x0, y0, then moves
        moved_x, moved_y = f[:, 7], f[:, 9]  # last frame minus first, in x and in y
        assert torch.all(torch.sign(moved_x) == dx) and torch.all(torch.sign(moved_y) == dy), (dx, dy)
    assert probe_latents.pool(blob(0, 0, t), moments=False).shape == (1, 12)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_probe_reads_what_is_linear_and_not_what_is_not(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(400, 12, generator=g)
    readable = x[:, :4].argmax(1)
    assert probe_latents.probe(x, readable, 300, 4) > 0.8
    noise = torch.randint(0, 4, (400,), generator=g)
    assert probe_latents.probe(x, noise, 300, 4) < 0.45


def test_the_script_runs_at_a_tiny_size(tmp_path, capsys):
    out = tmp_path / "probe.json"
    args = ["--clips", "40", "--frames", "5", "--size", "16", "--json", str(out)]
    assert probe_latents.main(args) == 0
    printed = capsys.readouterr().out
    for row in ("latents pooled (64)", "pixels pooled (12)", "latents moments (160)", "pixels moments (30)"):
        assert row in printed
    results = json.loads(out.read_text())
    assert results["clips"] == {"train": 30, "test": 10} and results["latent"] == [16, 2, 2, 2]
    accuracies = [row[t] for row in results["probes"].values() for t in ("colour", "shape", "motion")]
    assert len(accuracies) == 12 and all(0 <= a <= 1 for a in accuracies)
    # colour is the easiest thing to read: some probe gets it well above chance even at this size
    assert max(row["colour"] for row in results["probes"].values()) > 2 * results["chance"]["colour"]
    with pytest.raises(SystemExit):
        probe_latents.main(["--clips", "4", "--train", "1.0"])
