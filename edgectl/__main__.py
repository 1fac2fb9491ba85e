"""`python -m edgectl`: the same as the `edgectl` command."""

import sys

from .cli import main

sys.exit(main())
