"""``python -m gpuxent``: the console script, also under ``torchrun -m gpuxent train ...``."""

import sys

from .cli import main

sys.exit(main())
