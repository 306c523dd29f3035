#!/usr/bin/env python
"""Fit a Bayesian MDN on columns of a CSV file and write the model file.

Example::

    python scripts/train.py --csv data.csv --x waiting --y eruptions --model mdn.safetensors

The same as ``bayes-mdn fit``; run with ``--help`` for every option.
"""

import sys

from bayes_mdn.cli import verb_main

if __name__ == "__main__":
    sys.exit(verb_main("fit", prog="train.py"))
