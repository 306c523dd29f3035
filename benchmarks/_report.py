"""What the timing benchmarks (``steps``, ``speed``, ``numpyro_speed``, ``streaming``) share:
the machine they ran on, and writing a result as ``<out>.json`` and ``<out>.md``."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


def machine() -> dict:
    """Machine, torch version and load average when a run starts."""
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s)",
        "torch": torch.__version__,
        "load_at_start": round(os.getloadavg()[0], 2),
    }


def emit(result: dict, text: str, out: Path | None, *, echo: bool = True) -> None:
    """Print the report (unless ``echo`` is False); with ``out``, also write ``<out>.json``
    (the result) and ``<out>.md`` (the report)."""
    if echo:
        print(text)
    if out is not None:
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        out.with_suffix(".md").write_text(text)
