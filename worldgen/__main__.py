"""`python -m worldgen ...`: the same as the `worldgen` command (for `ray job submit -- python -m worldgen run ...`)."""

import sys

from worldgen.cli import main

sys.exit(main())
