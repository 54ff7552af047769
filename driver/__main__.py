"""``python -m driver``: the ``spu`` command line (see driver/cli.py)."""

import sys

from .cli import main

sys.exit(main())
