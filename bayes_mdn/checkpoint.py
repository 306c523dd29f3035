"""Checkpoints of the training loops.

What every loop (one fit, the stacked ensemble, the streamed fit) writes and resumes
from: the trained module's, optimizer's and scheduler's states, the random state and the
loop's own bookkeeping, in an atomic checksummed archive. On resume a checkpoint is
checked, before its tensors are read, to come from the same settings, the same parameter
structure, the same constants and the same data, and every difference is named.
:func:`checkpoint_identity` is the part of an estimator's settings a checkpoint records.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ._archive import ModelFileError, TensorSpec, read_archive, write_archive
from .config import FitConfig, FitHistory

if TYPE_CHECKING:
    from .fit import ParameterAverage

__all__ = ["CHECKPOINT_VERSION", "check_checkpoint_args", "checkpoint_identity"]

#: Layout of checkpoint files; 2 added the model identity and the data's dtype and shapes.
CHECKPOINT_VERSION = 2
_CHECKPOINT_KIND = "checkpoint"
# Settings that leave every number of a fit unchanged, so a resume may change them.
# compile: the compiled step computes the eager step's numbers (up to float rounding).
_RESUME_FREE = ("progress", "jit", "compile")  # jit: deprecated, does nothing
# Estimator arguments that are bookkeeping, not part of what is fitted.
# n_jobs: members fitted in worker processes give the numbers of an in-process fit;
# devices: a data-parallel fit follows the one-process objective (bayes_mdn.streaming).
_IDENTITY_FREE = (
    "progress",
    "checkpoint",
    "checkpoint_every",
    "resume",
    "num_threads",
    "n_jobs",
    "devices",
    "jit",
    "compile",
    # The NUTS run that may follow the SVI loop changes nothing in it.
    "nuts",
    "num_chains",
    "nuts_warmup",
    "nuts_samples",
    "max_tree_depth",
)


def checkpoint_identity(params: Mapping[str, object]) -> dict[str, object]:
    """The ``identity`` of :func:`~bayes_mdn.fit.fit_svi` for an estimator with these
    constructor arguments: all of them but the bookkeeping ones (progress, checkpoint,
    checkpoint_every, resume, num_threads, n_jobs, devices, compile), the deprecated ``jit`` and
    the NUTS settings (which change nothing in the SVI loop), so that an argument added
    later is part of a checkpoint's identity without being listed anywhere.

    Examples
    --------
    >>> sorted(checkpoint_identity({"hidden": (8,), "progress": True, "resume": True}))
    ['hidden']
    """
    return {k: v for k, v in params.items() if k not in _IDENTITY_FREE}


def _plain(value: object) -> object:
    """``value`` as the JSON-like form in which it is stored and compared: tuples become
    lists (so ``hidden=(8,)`` and ``[8]`` agree), paths strings, NumPy and torch scalars
    numbers, anything else its ``repr``."""
    if isinstance(value, float) and math.isnan(value):
        return "nan"  # a checkpoint never stores NaN; as text it still compares
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "shape", None) in ((), torch.Size()):
        return _plain(item())
    return repr(value)


def check_checkpoint_args(checkpoint: object, checkpoint_every: object, resume: object) -> None:
    """Eager checks of the checkpoint arguments of :func:`~bayes_mdn.fit.fit_svi`."""
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(
            f"checkpoint must be None, a str or os.PathLike, got {type(checkpoint).__name__}"
        )
    if (
        not isinstance(checkpoint_every, int)
        or isinstance(checkpoint_every, bool)
        or checkpoint_every < 1
    ):
        raise ValueError(f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be True or False, got {resume!r}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint file to resume from, got checkpoint=None")


def _data_identity(x: Tensor, y: Tensor) -> dict[str, object]:
    """dtype, shapes and fingerprint of the data, so that a checkpoint is never resumed
    on other data, and a change of dtype or size is named as such."""
    h = hashlib.sha256()
    for t in (x, y):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return {
        "dtype": str(x.dtype),
        "shapes": [list(x.shape), list(y.shape)],
        "digest": h.hexdigest(),
    }


def _resume_config(config: FitConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in _RESUME_FREE}


def _write_checkpoint(
    path: str | os.PathLike[str],
    next_epoch: int,
    config: FitConfig,
    identity: object,
    data: dict[str, object],
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    history: FitHistory,
    best_state: dict,
    best_score: float,
    stale: int,
    device: torch.device,
    average: ParameterAverage,
) -> None:
    _write_loop_state(
        path,
        next_epoch,
        config,
        identity,
        data,
        (loss_fn, optimizer, scheduler),
        device,
        {
            "history": history.to_dict(),
            "best_state": dict(best_state),
            "best_score": best_score,
            "stale": stale,
            "average": average.state_dict(),
        },
    )


def _write_loop_state(
    path: str | os.PathLike[str],
    next_epoch: int,
    config: FitConfig,
    identity: object,
    data: dict[str, object],
    trained: tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler],
    device: torch.device,
    extra: dict[str, object],
) -> None:
    """Write a checkpoint of a training loop (one fit, a stacked ensemble or a streamed
    fit): what every loop resumes from, the trained module's, optimizer's and scheduler's
    states and the random state, plus the loop's own bookkeeping in ``extra``."""
    loss_fn, optimizer, scheduler = trained
    # The random state inside the loop's seeded scope: the next epoch's shuffle and
    # particle draws continue from exactly here after a resume.
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    write_archive(
        path,
        _CHECKPOINT_KIND,
        CHECKPOINT_VERSION,
        {
            "config": _resume_config(config),
            "identity": identity,
            "data": data,
            "epoch": next_epoch,
            "state": dict(loss_fn.state_dict()),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng,
            **extra,
        },
    )


def _read_checkpoint(
    path: str | os.PathLike[str],
    config: FitConfig,
    identity: object,
    data: dict[str, object],
    loss_fn: nn.Module,
) -> dict:
    """Read a checkpoint after checking, before its tensors are read, that it was written
    by this fit: same settings, same structure, same data; then that its constants
    (buffers) agree. Raises ``ValueError`` naming every difference."""
    where = repr(os.fspath(path))
    live = loss_fn.state_dict()

    def check(saved: dict) -> None:
        if not isinstance(saved, dict) or not all(
            isinstance(saved.get(k), dict) for k in ("config", "data", "state", "best_state")
        ):
            raise ModelFileError(f"{where} is not a checkpoint this bayes_mdn can resume")
        problems = _setting_differences(saved, config, identity)
        if not problems:
            problems = _structure_differences(saved["state"], live)
        data_problem = None
        old = saved["data"]
        if old.get("dtype") != data["dtype"]:
            if not problems:
                problems.append(f"data dtype: checkpoint {old.get('dtype')}, now {data['dtype']}")
        elif old.get("shapes") != data["shapes"]:
            data_problem = (
                f"x and y of shapes {_shapes(old.get('shapes'))}, now {_shapes(data['shapes'])}"
            )
        elif old.get("digest") != data["digest"]:
            data_problem = "x or y differ"
        if problems:
            also = f" and for other data ({data_problem})" if data_problem else ""
            raise ValueError(
                f"cannot resume from {where}: it was written with other settings "
                f"({'; '.join(problems)}){also}; resume with the same settings or start a "
                "new checkpoint"
            )
        if data_problem:
            raise ValueError(
                f"cannot resume from {where}: it was written for other data ({data_problem}); "
                "resume with the same data or start a new checkpoint"
            )
        if _structure_differences(saved["best_state"], live):
            raise ModelFileError(f"{where} is corrupted: its best state does not fit the model")

    saved = read_archive(path, _CHECKPOINT_KIND, CHECKPOINT_VERSION, check=check)
    constants = [
        name
        for name, _ in loss_fn.named_buffers()
        if name in live and not torch.equal(saved["state"][name], live[name].detach().cpu())
    ]
    if constants:
        detail = "; ".join(
            f"{name}: checkpoint {_brief(saved['state'][name])}, now {_brief(live[name])}"
            for name in constants
        )
        raise ValueError(
            f"cannot resume from {where}: its model has other constants ({detail}), as from "
            "another prior scale or standardization; resume with the same model or start a "
            "new checkpoint"
        )
    return saved


def _setting_differences(saved: dict, config: FitConfig, identity: object) -> list[str]:
    """'name: checkpoint old, now new' for each loop setting or identity entry that differs
    (the identity only when this fit passes one)."""
    old = {k: v for k, v in dict(saved["config"]).items() if k not in _RESUME_FREE}
    now = _resume_config(config)
    if identity is not None:
        saved_identity = saved.get("identity")
        saved_identity = saved_identity if isinstance(saved_identity, dict) else {}
        # Settings that stopped being part of the identity (a checkpoint of an older
        # version holds the NUTS settings) are not compared.
        old = {k: v for k, v in saved_identity.items() if k not in _IDENTITY_FREE} | old
        now = dict(identity) | now  # type: ignore[call-overload]
    return [
        f"{k}: checkpoint {old.get(k)!r}, now {now.get(k)!r}"
        for k in sorted(old.keys() | now.keys())
        if old.get(k) != now.get(k)
    ]


def _structure_differences(saved: dict, live: Mapping[str, Tensor]) -> list[str]:
    """What differs between the parameters and buffers a checkpoint stores and those of
    the loss module now: names, dtypes (once per pair of dtypes), shapes."""
    problems = []
    old_only = sorted(saved.keys() - live.keys())
    new_only = sorted(live.keys() - saved.keys())
    if old_only:
        problems.append(f"parameters only in the checkpoint: {_few(old_only)}")
    if new_only:
        problems.append(f"parameters only in the model now: {_few(new_only)}")
    dtypes: dict[tuple[torch.dtype, torch.dtype], str] = {}
    shapes: list[str] = []
    for name in sorted(saved.keys() & live.keys()):
        old, new = saved[name], live[name]
        if not isinstance(old, (TensorSpec, Tensor)):
            problems.append(f"{name}: the checkpoint holds no tensor")
            continue
        if old.dtype != new.dtype:
            dtypes.setdefault((old.dtype, new.dtype), name)
        elif tuple(old.shape) != tuple(new.shape):
            shapes.append(
                f"shape of {name}: checkpoint {tuple(old.shape)}, now {tuple(new.shape)}"
            )
    problems += [f"dtype: checkpoint {a}, now {b}" for a, b in dtypes]
    problems += shapes[:5] + (
        [f"{len(shapes) - 5} more tensors of other shapes"] if len(shapes) > 5 else []
    )
    return problems


def _few(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _shapes(shapes: object) -> str:
    if isinstance(shapes, list) and all(isinstance(s, list) for s in shapes):
        return " and ".join(str(tuple(s)) for s in shapes)
    return repr(shapes)


def _brief(t: Tensor) -> str:
    t = t.detach().cpu()
    return f"{t.item():g}" if t.numel() == 1 else f"a tensor of shape {tuple(t.shape)}"


def _restore_loop(
    saved: dict,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
) -> tuple[int, float, int, dict, FitHistory]:
    """Put a checkpoint's loop state back; returns (first epoch, best score, stale
    epochs, best state, history)."""
    loss_fn.load_state_dict(saved["state"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["cpu"])
    if device.type == "cuda" and "cuda" in saved["rng"]:
        torch.cuda.set_rng_state(saved["rng"]["cuda"], device)
    best_state = {k: v.to(device) for k, v in saved["best_state"].items()}
    history = FitHistory(**saved["history"])
    return (
        int(saved["epoch"]),
        float(saved["best_score"]),
        int(saved["stale"]),
        best_state,
        history,
    )
