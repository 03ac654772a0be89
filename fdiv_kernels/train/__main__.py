"""``python -m fdiv_kernels.train`` = ``fdiv-train``."""

import sys

from .cli import main

sys.exit(main())
