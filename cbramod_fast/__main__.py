"""``python -m cbramod_fast``: the ``cbramod-fast`` command line (``torchrun -m cbramod_fast`` for DDP)."""

import sys

from .cli import main

sys.exit(main())
