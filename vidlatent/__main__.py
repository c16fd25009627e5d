"""``python -m vidlatent`` is the ``vidlatent`` command (as ``python -m vidlatent.cli``, which torchrun runs)."""

import sys

from .cli import main

sys.exit(main())
