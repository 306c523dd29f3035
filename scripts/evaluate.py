#!/usr/bin/env python
"""Score a model file on a held-out CSV file: metrics.json and figures in --out.

Example::

    python scripts/evaluate.py --model mdn.safetensors --csv test.csv --x waiting \\
        --y eruptions --out report/

The same as ``bayes-mdn evaluate``; run with ``--help`` for every option.
"""

import sys

from bayes_mdn.cli import verb_main

if __name__ == "__main__":
    sys.exit(verb_main("evaluate", prog="evaluate.py"))
