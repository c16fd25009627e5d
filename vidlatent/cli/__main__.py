"""``python -m vidlatent.cli`` (as torchrun runs it) is the ``vidlatent`` command."""

import sys

from . import main

sys.exit(main())
