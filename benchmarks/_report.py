"""What the benchmarks share: the machine they ran on (the timing benchmarks ``steps``,
``speed``, ``numpyro_speed``, ``streaming``), the mean and standard error of repeated
measurements, and writing a result as ``<out>.json`` and ``<out>.md``."""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def machine() -> dict:
    """Machine, torch version and load average when a run starts."""
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s)",
        "torch": torch.__version__,
        "load_at_start": round(os.getloadavg()[0], 2),
    }


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error, sd (ddof 1) / sqrt(n); the error is nan for one value."""
    a = np.asarray(values, dtype=float)
    se = float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else math.nan
    return float(a.mean()), se


def emit(result: dict, text: str, out: Path | None, *, echo: bool = True) -> None:
    """Print the report (unless ``echo`` is False); with ``out``, also write ``<out>.json``
    (the result) and ``<out>.md`` (the report)."""
    if echo:
        print(text)
    if out is not None:
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        out.with_suffix(".md").write_text(text)
