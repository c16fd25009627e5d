"""How long a user waits: ``vidlatent generate`` timed in a fresh process, imports and model loading included."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time


def cli_time(model: str | None = None, runs: int = 3, threads: int = 2) -> dict:
    """Wall time of ``vidlatent generate "a red circle moving right" -o out.mp4`` (with ``--model`` when given)
    over ``runs`` fresh processes with ``threads`` CPU threads: ``best_s`` and ``worst_s``."""
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            cmd = ["vidlatent", "generate", "a red circle moving right", "-o", f"{tmp}/out{i}.mp4", "-q"]
            if model:
                cmd += ["--model", model]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            times.append(time.perf_counter() - t0)
    return {"runs": runs, "best_s": min(times), "worst_s": max(times)}
