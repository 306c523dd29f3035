"""Small shared helpers: device resolution, seeded RNG scopes, Pyro settings scope."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pyro
import torch

__all__ = ["pyro_scope", "resolve_device", "seeded"]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; other values are checked."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(
            f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}"
        ) from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for, but CUDA is not available here")
    return resolved


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device | None = None) -> Iterator[None]:
    """Run a block with torch's RNG seeded, leaving the caller's RNG state untouched.

    ``seed=None`` draws fresh randomness from the global generator (no fork).
    """
    if seed is None:
        yield
        return
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def pyro_scope(validate: bool = False) -> Iterator[None]:
    """Module-local parameters (never the global param store) and, by default, Pyro's
    argument validation off: inputs are validated once at the public boundary."""
    with pyro.settings.context(module_local_params=True), pyro.validation_enabled(validate):
        yield
