"""How the torchrun test workers (``*_worker.py``) end once their outputs are written.

``leave_and_exit``: leave the process group at a barrier (``runtime.parallel.leave``), say so on stdout (a
failing test shows the workers' output, so it tells a rank that stopped before this point from one that
stopped after it) and exit at once. ``os._exit`` skips the interpreter's teardown, in which torch's gloo
threads have been seen to abort a rank now and then ("terminate called without an active exception") after
every output was written: that is not what these tests check. The CLI leaves its group the same way and then
exits normally (tests/test_distributed.py, tests/test_cli_encode.py run it under torchrun).
"""

from __future__ import annotations

import os
import sys

from vidlatent.runtime import parallel


def leave_and_exit(rank: int) -> None:
    parallel.leave()
    print(f"rank {rank}: outputs written, process group left", flush=True)
    sys.stderr.flush()
    os._exit(0)
