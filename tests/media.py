"""Procedural test media shared by test files (test helpers live under tests/, never in the library)."""

import torch


def pattern(frames: int, h: int = 32, w: int = 32, phase: float = 0.0) -> torch.Tensor:
    """A smooth moving colour pattern (3, t, h, w) in [-0.8, 0.8]: survives h264 well."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    out = [
        torch.stack(
            [torch.sin(3 * xx + 0.3 * i + phase), torch.cos(2 * yy - 0.2 * i), torch.sin(4 * xx * yy)]
        )
        for i in range(frames)
    ]
    return 0.8 * torch.stack(out, 1)
