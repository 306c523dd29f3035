"""``python -m benchmarks.real_data``: see ``cli.main``."""

import sys

from .cli import main

sys.exit(main())
