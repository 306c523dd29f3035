"""Splits, the run loop, the per-split result cache and the summary statistics.

Protocol: split ``s`` of a data set of n rows is the permutation
``numpy.random.default_rng(s)`` of range(n), its first ``round(0.2 n)`` rows the test set.
Every model sees the same splits and is built by its factory from the split seed ``s``.
One result per (data set, split, model) holds the test NLL per point in y's original
units, the 90 % interval coverage where the model gives intervals, and seconds to fit.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import os
import re
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .._report import mean_se
from .datasets import DATASETS, RealDataset, load

__all__ = [
    "INTERVAL_LEVEL",
    "SMALL_ROWS",
    "TEST_FRACTION",
    "Model",
    "ResultCache",
    "SplitResult",
    "default_splits",
    "model_config",
    "paired_differences",
    "run_suite",
    "split_indices",
    "summarize",
]

TEST_FRACTION = 0.2
INTERVAL_LEVEL = 0.9
# Data sets under this many rows get 10 splits, larger ones 5 (see default_splits).
SMALL_ROWS = 1000


class Model(Protocol):
    """What the harness needs: ``fit`` and a per-point log density in y's units."""

    def fit(self, X: np.ndarray, y: np.ndarray) -> Any: ...

    def log_prob(self, X: np.ndarray, y: np.ndarray) -> np.ndarray: ...


ModelFactory = Callable[[int], Model]


def default_splits(n_rows: int) -> int:
    """10 repeated splits for tables under ``SMALL_ROWS`` rows, 5 for larger ones.

    Small tables have noisy test sets (22 to 84 rows here), so they need more repeats for
    the same standard error; larger tables have test sets of 660 to 1,250 rows and cost
    more per fit.
    """
    return 10 if n_rows < SMALL_ROWS else 5


def split_indices(
    n: int, split_seed: int, test_fraction: float = TEST_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices of split ``split_seed`` of a table of ``n`` rows.

    Examples
    --------
    >>> tr, te = split_indices(10, 0)
    >>> len(tr), len(te), sorted([*tr, *te]) == list(range(10))
    (8, 2, True)
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    perm = np.random.default_rng(split_seed).permutation(n)
    n_test = int(round(test_fraction * n))
    if n_test < 1 or n - n_test < 2:
        raise ValueError(f"a table of {n} rows is too small to split at {test_fraction}")
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _benchmark_source(cls: type) -> str:
    """Source of a class defined in this benchmark plus, transitively, of the module-level
    helpers it names: an edit to another peer or to a docstring elsewhere in the module
    leaves its cached results valid."""
    module = inspect.getmodule(cls)
    members = {
        name: obj
        for name, obj in vars(module).items()
        if (inspect.isfunction(obj) or inspect.isclass(obj))
        and getattr(obj, "__module__", None) == getattr(module, "__name__", None)
    }
    seen, parts = {cls.__name__}, []
    todo: list[Any] = [cls]
    while todo:
        src = inspect.getsource(todo.pop())
        parts.append(src)
        for name, obj in members.items():
            if name not in seen and re.search(rf"\b{re.escape(name)}\b", src):
                seen.add(name)
                todo.append(obj)
    return "\n".join(sorted(parts))


@functools.cache
def _source_hash(cls: type) -> str:
    """Short hash of the code behind a model class: its whole top-level package when that
    is not this benchmark (any change to bayes_mdn invalidates its cached results), else
    the class and the helpers it uses (see ``_benchmark_source``). Computed once per class
    and process, so a file edited during a run does not change the keys midway."""
    module = inspect.getmodule(cls)
    h = hashlib.sha256()
    if module is None or not getattr(module, "__file__", None):
        h.update(cls.__qualname__.encode())
    elif module.__name__.split(".")[0] == "benchmarks":
        h.update(_benchmark_source(cls).encode())
    else:
        root = Path(str(module.__file__)).resolve()
        while (root.parent / "__init__.py").exists():
            root = root.parent
        for file in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            h.update(
                file.name.encode() if file == root else file.relative_to(root).as_posix().encode()
            )
            h.update(file.read_bytes())
    return h.hexdigest()[:12]


def model_config(model: Any) -> str:
    """The string that identifies a model's configuration in the cache.

    A peer's ``config()``; otherwise the class and ``get_params()`` without the seed and
    progress flags. Either way followed by a hash of the model's code and torch's version,
    so a changed default or a changed line of the library misses the cache.
    """
    if hasattr(model, "config"):
        base = model.config()
    elif hasattr(model, "get_params"):
        params = {k: v for k, v in model.get_params().items() if k not in ("seed", "progress")}
        base = f"{type(model).__name__}({', '.join(f'{k}={v!r}' for k, v in params.items())})"
    else:
        base = repr(model)
    cls: Any = type(model)
    return f"{base}|src={_source_hash(cls)}|torch={torch.__version__}"


@dataclass
class SplitResult:
    """The outcome of one model on one split of one data set.

    ``status`` is "ok", "skipped" (the model declines tables this large), "nonfinite"
    (some test point got log density -inf or NaN; ``nll`` is then None) or "failed"
    (``error`` holds the exception).
    """

    dataset: str
    split: int
    model: str
    config: str
    status: str
    n_train: int
    n_test: int
    nll: float | None = None
    coverage: float | None = None
    interval_width: float | None = None
    fit_seconds: float | None = None
    eval_seconds: float | None = None
    error: str | None = None

    def key(self, fingerprint: str) -> str:
        return _key(self.dataset, fingerprint, self.split, self.model, self.config)


def _key(dataset: str, fingerprint: str, split: int, model: str, config: str) -> str:
    return f"{dataset}@{fingerprint}|split={split}/test={TEST_FRACTION}|{model}|{config}"


class ResultCache:
    """Per-split results in a JSON file, keyed by data set (and its fingerprint), split,
    model name and model configuration. Written atomically after every new result, so an
    interrupted run keeps what it finished."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = None if path is None else Path(path)
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path is not None and self.path.exists():
            self.entries = json.loads(self.path.read_text())["results"]

    def get(self, key: str) -> SplitResult | None:
        entry = self.entries.get(key)
        return None if entry is None else SplitResult(**entry)

    def put(self, key: str, result: SplitResult) -> None:
        self.entries[key] = asdict(result)
        if self.path is not None:
            _write_json(self.path, {"results": dict(sorted(self.entries.items()))})


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, allow_nan=False)
            f.write("\n")
        # mkstemp makes the file private; give it the permissions of an ordinary new file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _interval(model: Any) -> Callable[[np.ndarray, float], tuple[Any, Any]] | None:
    for name in ("interval", "predict_interval"):
        if callable(getattr(model, name, None)):
            return getattr(model, name)
    return None


def _evaluate(
    ds: RealDataset, split: int, name: str, model: Any, config: str, on_error: str
) -> SplitResult:
    train, test = split_indices(ds.n, split)
    result = SplitResult(ds.name, split, name, config, "ok", len(train), len(test))
    limit = getattr(model, "max_train_rows", None)
    if limit is not None and len(train) > limit:
        result.status = "skipped"
        result.error = f"n_train {len(train)} > max_train_rows {limit}"
        return result
    X_tr, y_tr, X_te, y_te = ds.X[train], ds.y[train], ds.X[test], ds.y[test]
    try:
        t0 = time.perf_counter()
        model.fit(X_tr, y_tr)
        t1 = time.perf_counter()
        log_p = np.asarray(model.log_prob(X_te, y_te), dtype=np.float64).reshape(-1)
        result.eval_seconds = time.perf_counter() - t1
        result.fit_seconds = t1 - t0
        if log_p.shape != y_te.shape:
            raise ValueError(f"log_prob returned shape {log_p.shape}, expected {y_te.shape}")
        if np.isfinite(log_p).all():
            result.nll = float(-log_p.mean())
        else:
            result.status = "nonfinite"
            result.error = f"{int((~np.isfinite(log_p)).sum())} test points without density"
        interval = _interval(model)
        if interval is not None:
            bounds = interval(X_te, INTERVAL_LEVEL)
            lo, hi = (np.asarray(b, dtype=np.float64).reshape(-1) for b in bounds)
            result.coverage = float(np.mean((y_te >= lo) & (y_te <= hi)))
            result.interval_width = float(np.mean(hi - lo))
    except Exception as err:
        if on_error == "raise":
            raise
        result.status = "failed"
        result.error = "".join(traceback.format_exception_only(type(err), err)).strip()
    return result


def run_suite(
    models: Mapping[str, ModelFactory],
    datasets: Sequence[str | RealDataset] = DATASETS,
    n_splits: int | Mapping[str, int] | None = None,
    cache: str | os.PathLike[str] | None = None,
    refresh: Iterable[str] = (),
    on_error: str = "record",
    log: Callable[[str], None] | None = print,
) -> list[SplitResult]:
    """Fit and score every model on every split of every data set.

    Parameters
    ----------
    models : mapping of name to factory
        ``factory(split_seed)`` returns an unfitted model with ``fit(X, y)`` and
        ``log_prob(X, y)`` (per-point log density in y's units), optionally
        ``interval(X, level)`` or ``predict_interval(X, level)`` and ``max_train_rows``.
        Names starting with ``"bayes_mdn"`` are the library's; the others are peers.
    datasets : sequence of str or RealDataset
        Names from ``DATASETS``, or data sets built by hand (tests, new tables).
    n_splits : int, mapping of data set to int, or None
        Splits 0 .. n_splits - 1; None uses :func:`default_splits` (10 under 1,000 rows,
        else 5).
    cache : path or None
        JSON file of per-split results. A result is reused when its data set (and file
        fingerprint), split, model name and :func:`model_config` all match.
    refresh : iterable of str
        Model names whose cached results are recomputed (and overwritten).
    on_error : {"record", "raise"}
        Whether a failing fit is recorded as status "failed" or raised.
    log : callable or None
        Receives one line per newly computed result.

    Returns
    -------
    list of SplitResult, in data set, split, model order.
    """
    if on_error not in ("record", "raise"):
        raise ValueError(f"on_error must be 'record' or 'raise', got {on_error!r}")
    store = ResultCache(cache)
    refresh = set(refresh)
    out: list[SplitResult] = []
    for item in datasets:
        ds = item if isinstance(item, RealDataset) else load(item)
        if n_splits is None:
            count = default_splits(ds.n)
        elif isinstance(n_splits, int):
            count = n_splits
        else:
            count = n_splits[ds.name]
        for split in range(count):
            for name, factory in models.items():
                model = factory(split)
                config = model_config(model)
                key = _key(ds.name, ds.fingerprint, split, name, config)
                cached = None if name in refresh else store.get(key)
                if cached is not None:
                    out.append(cached)
                    continue
                result = _evaluate(ds, split, name, model, config, on_error)
                store.put(key, result)
                out.append(result)
                if log is not None:
                    log(_line(result))
    return out


def _line(r: SplitResult) -> str:
    nll = "   n/a" if r.nll is None else f"{r.nll:8.3f}"
    cov = "" if r.coverage is None else f" cov90={r.coverage:.2f}"
    fit = "" if r.fit_seconds is None else f" fit={r.fit_seconds:.1f}s"
    extra = "" if r.status == "ok" else f" [{r.status}: {r.error}]"
    return f"{r.dataset:>10} split {r.split:2d} {r.model:>16}: nll {nll}{cov}{fit}{extra}"


def is_ours(name: str) -> bool:
    """bayes_mdn and its variants (``bayes_mdn[...]``) against everything else."""
    return name.startswith("bayes_mdn")


def paired_differences(
    results: Sequence[SplitResult], model: str, peer: str
) -> dict[str, dict[int, float]]:
    """Per data set, {split: NLL(model) - NLL(peer)} over the splits where both are "ok".

    Examples
    --------
    >>> r = [SplitResult("d", 0, m, "", "ok", 8, 2, nll=v) for m, v in [("a", 1.5), ("b", 1.0)]]
    >>> paired_differences(r, "a", "b")
    {'d': {0: 0.5}}
    """
    nll: dict[tuple[str, int, str], float] = {
        (r.dataset, r.split, r.model): r.nll  # type: ignore[misc]
        for r in results
        if r.status == "ok"
    }
    out: dict[str, dict[int, float]] = {}
    for (ds, split, name), value in nll.items():
        if name == model and (ds, split, peer) in nll:
            out.setdefault(ds, {})[split] = value - nll[(ds, split, peer)]
    return {ds: dict(sorted(d.items())) for ds, d in out.items()}


def summarize(results: Sequence[SplitResult]) -> dict[str, Any]:
    """Per data set: each model's mean and standard error over splits of the test NLL,
    mean coverage and fit seconds; the best peer (lowest mean NLL among the peers with a
    result on every split); and for each bayes_mdn model the paired difference to it.

    The paired difference d_s = NLL(bayes_mdn, s) - NLL(best peer, s) is averaged over
    the splits where both have a finite NLL; its standard error is sd(d) / sqrt(splits).
    Negative means bayes_mdn is better.
    """
    by_ds: dict[str, dict[str, list[SplitResult]]] = {}
    for r in results:
        by_ds.setdefault(r.dataset, {}).setdefault(r.model, []).append(r)
    summary: dict[str, Any] = {}
    for ds_name, per_model in by_ds.items():
        models: dict[str, Any] = {}
        for name, rows in per_model.items():
            ok = [r for r in rows if r.status == "ok"]
            entry: dict[str, Any] = {
                "splits": len(rows),
                "ok": len(ok),
                "status": sorted({r.status for r in rows}),
                "n_train": rows[0].n_train,
                "n_test": rows[0].n_test,
            }
            if ok:
                entry["nll_mean"], entry["nll_se"] = mean_se([r.nll for r in ok])  # type: ignore[misc]
                entry["fit_seconds"] = float(np.mean([r.fit_seconds for r in ok]))
                covs = [r.coverage for r in ok if r.coverage is not None]
                entry["coverage"] = float(np.mean(covs)) if covs else None
            models[name] = entry
        complete = {
            n: e for n, e in models.items() if not is_ours(n) and e["ok"] == e["splits"] > 0
        }
        best = min(complete, key=lambda n: complete[n]["nll_mean"]) if complete else None
        paired: dict[str, Any] = {}
        if best is not None:
            for name in per_model:
                if not is_ours(name):
                    continue
                diffs = list(paired_differences(results, name, best).get(ds_name, {}).values())
                if diffs:
                    mean, se = mean_se(diffs)
                    paired[name] = {
                        "vs": best,
                        "mean": mean,
                        "se": se,
                        "sd": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else math.nan,
                        "splits": len(diffs),
                    }
        summary[ds_name] = {"models": models, "best_peer": best, "paired": paired}
    return summary
