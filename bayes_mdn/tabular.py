"""CSV in, model files and CSV/JSON/PNG out: the logic behind ``bayes-mdn fit|predict|evaluate``.

CSV files are read with the standard library (pandas is not a dependency): a header row of
column names, then one row per point. Every cell of a selected column must be a finite
number; the first offending cell is named, with its line, in a ``ValueError`` raised before
any fitting starts. Outputs are written atomically.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._files import atomic_path, write_json
from .estimator import BayesianMDN

__all__ = [
    "DEFAULT_LEVELS",
    "evaluate_model",
    "fit_csv",
    "predict_table",
    "read_columns",
    "write_csv",
]

#: Central interval levels reported by ``predict`` and ``evaluate``.
DEFAULT_LEVELS = (0.5, 0.9)


def read_columns(
    path: str | os.PathLike[str], columns: Sequence[str], role: str = "columns"
) -> np.ndarray:
    """Read the named columns of a CSV file as floats.

    Parameters
    ----------
    path : CSV file whose first row holds the column names
    columns : names of the columns to read, in the order wanted
    role : how the columns were asked for (say ``"--x"``), used in error messages

    Returns
    -------
    ndarray of shape (n_rows, len(columns))

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    ValueError
        When a column is missing, a row is ragged, a cell is not a finite number, or the
        file has no data rows; the message names the file, line and column.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "d.csv"
    >>> _ = p.write_text("a,b\\n1,2\\n3,4\\n")
    >>> read_columns(p, ["b"]).tolist()
    [[2.0], [4.0]]
    """
    columns = list(columns)
    if not columns or not all(isinstance(c, str) and c for c in columns):
        raise ValueError(f"{role} must name at least one column, got {columns!r}")
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = [name.strip() for name in next(reader, [])]
        if not header:
            raise ValueError(f"{path}: empty file, expected a header row of column names")
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(
                f"{path}: column(s) {missing} given by {role} not found; the columns are {header}"
            )
        index = [header.index(c) for c in columns]
        values: list[list[float]] = []
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue  # blank lines, e.g. a trailing newline
            if len(row) != len(header):
                raise ValueError(
                    f"{path}, line {reader.line_num}: {len(row)} fields, "
                    f"but the header has {len(header)}"
                )
            values.append([_number(row[i], path, reader.line_num, header[i]) for i in index])
    if not values:
        raise ValueError(f"{path}: no data rows after the header")
    return np.asarray(values, dtype=np.float64)


def _number(cell: str, path: Any, line: int, column: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        shown = "an empty cell" if not cell.strip() else repr(cell)
        raise ValueError(f"{path}, line {line}, column {column!r}: {shown} is not a finite number")
    return value


def write_csv(
    path: str | os.PathLike[str], header: Sequence[str], columns: Sequence[np.ndarray]
) -> None:
    """Write equal-length 1-D arrays as CSV columns (full float precision), atomically."""
    data = np.column_stack([np.asarray(c, dtype=np.float64) for c in columns])
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([repr(float(v)) for v in row] for row in data)


def _target(y: np.ndarray) -> np.ndarray:
    return y[:, 0] if y.shape[1] == 1 else y


def fit_csv(
    csv_path: str | os.PathLike[str],
    x_columns: Sequence[str],
    y_columns: Sequence[str],
    model_path: str | os.PathLike[str],
    **options: Any,
) -> BayesianMDN:
    """Fit a :class:`BayesianMDN` on columns of a CSV file and save it to ``model_path``.

    ``options`` are :class:`BayesianMDN` arguments; they are checked before the file is
    read. Returns the fitted estimator.
    """
    mdn = BayesianMDN(**options)
    mdn._check_options()
    X = read_columns(csv_path, x_columns, "--x")
    y = read_columns(csv_path, y_columns, "--y")
    mdn.fit(X, _target(y))
    mdn.save(model_path)
    return mdn


def _check_levels(levels: Sequence[float]) -> tuple[float, ...]:
    levels = tuple(float(v) for v in levels)
    if not levels or not all(0 < v < 1 for v in levels):
        raise ValueError(f"levels must lie strictly between 0 and 1, got {levels}")
    return levels


def _suffix(j: int, d: int) -> str:
    return "" if d == 1 else f"_{j}"


def predict_table(
    model: BayesianMDN,
    X: Any,
    levels: Sequence[float] = DEFAULT_LEVELS,
    n_samples: int | None = None,
    seed: int | None = 0,
) -> tuple[list[str], list[np.ndarray]]:
    """Predictions as named columns, ready for :func:`write_csv`.

    Without ``n_samples``: ``mean``, ``std`` and, per level, ``lower_<level>`` and
    ``upper_<level>`` (the central predictive interval). With ``n_samples``: columns
    ``sample_0`` ... of posterior-predictive draws. For d_y > 1 outputs every name gets a
    ``_<j>`` suffix.

    Returns
    -------
    header : list of str
    columns : list of ndarray of shape (n,)
    """
    levels = _check_levels(levels)
    d = model.n_outputs_
    header: list[str] = []
    cols: list[np.ndarray] = []

    def add(name: str, values: np.ndarray) -> None:
        values = values.reshape(len(values), d)
        for j in range(d):
            header.append(f"{name}{_suffix(j, d)}")
            cols.append(values[:, j])

    if n_samples is not None:
        draws = model.sample(X, n_samples=n_samples, seed=seed)
        for s in range(n_samples):
            add(f"sample_{s}", draws[s])
        return header, cols
    add("mean", model.predict(X, seed=seed))
    add("std", model.predict_std(X, seed=seed))
    for level in levels:
        lo, hi = model.predict_interval(X, level=level, seed=seed)
        add(f"lower_{level:g}", lo)
        add(f"upper_{level:g}", hi)
    return header, cols


def evaluate_model(
    model: BayesianMDN,
    X: Any,
    y: Any,
    out_dir: str | os.PathLike[str],
    levels: Sequence[float] = DEFAULT_LEVELS,
    seed: int | None = 0,
) -> dict[str, Any]:
    """Score a fitted model on held-out data; write ``metrics.json`` and figures.

    Metrics: mean negative log predictive density (nats per point), root mean squared
    error of the predictive mean, and per output the fraction of points inside each
    central predictive interval. Figures: ``pit_histogram.png`` (probability integral
    transform of each y under its predictive CDF: flat when calibrated) and, for one input
    and one output, ``predictive_samples.png``.

    Parameters
    ----------
    model : fitted BayesianMDN
    X : array of shape (n, d_x)
    y : array of shape (n,) or (n, d_y)
    out_dir : folder for the outputs (created)
    levels : central interval levels
    seed : seed of the posterior draws

    Returns
    -------
    dict, the content of ``metrics.json``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import torch

    from . import mixtures, plotting

    levels = _check_levels(levels)
    y2 = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    nll = -model.log_prob(X, _target(y2), seed=seed)
    mean = np.asarray(model.predict(X, seed=seed)).reshape(y2.shape)
    coverage = {}
    for level in levels:
        lo, hi = model.predict_interval(X, level=level, seed=seed)
        inside = (y2 >= lo.reshape(y2.shape)) & (y2 <= hi.reshape(y2.shape))
        coverage[f"{level:g}"] = inside.mean(0).tolist()
    mix = model.predictive_mixture(X, seed=seed)
    pit = mixtures.marginal_cdf(mix, torch.as_tensor(y2).to(mix.loc)).cpu().numpy()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = [i / 10 for i in range(11)]
    for j in range(y2.shape[1]):
        label = "y" if y2.shape[1] == 1 else f"output {j}"
        ax.hist(pit[:, j], bins=bins, density=True, histtype="step", lw=1.5, label=label)
    ax.axhline(1.0, color="black", ls="--", lw=1, label="calibrated")
    ax.set_xlabel("PIT: predictive CDF at the observed y")
    ax.set_ylabel("density")
    ax.legend()
    figures.append(("pit_histogram.png", fig))
    if y2.shape[1] == 1 and model.n_features_in_ == 1:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        plotting.plot_predictive_samples(model, X, y2[:, 0], ax, seed=0 if seed is None else seed)
        figures.append(("predictive_samples.png", fig))
    for name, fig in figures:
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)

    metrics = {
        "n": len(y2),
        "nll": float(nll.mean()),
        "rmse": np.sqrt(((mean - y2) ** 2).mean(0)).tolist(),
        "coverage": coverage,
        "pit_mean": pit.mean(0).tolist(),
        "figures": [name for name, _ in figures],
    }
    write_json(out / "metrics.json", metrics)
    return metrics
