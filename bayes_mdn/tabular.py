"""CSV in, model files and CSV/JSON/PNG out: the logic behind ``bayes-mdn fit|predict|evaluate``.

CSV files are read with the standard library (pandas is not a dependency): a header row of
column names, then one row per point. Every cell of a selected column must be a finite
number; the first offending cell is named, with its line, in a ``ValueError`` raised before
any fitting starts. Cells of any length are read (the csv module's default limit of 131,072
characters is lifted while reading, then restored), so a long text cell in a column that is
not used does not stop the read. Outputs are written atomically, and only once every input
has been checked and every number computed: a bad input writes nothing.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._files import atomic_path, write_json
from ._validation import check_dtype_range
from .estimator import BayesianMDN

__all__ = [
    "DEFAULT_LEVELS",
    "check_columns_fit",
    "evaluate_model",
    "fit_csv",
    "fit_parquet",
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
        When a column is missing, a row is ragged, a cell is not a finite number, the
        file is not readable as CSV text, or it has no data rows; the message names the
        file, line and column.

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
    with open(path, newline="") as f, _any_field_size():
        reader = csv.reader(f)
        try:
            header = [name.strip() for name in next(reader, [])]
            if not header:
                raise ValueError(f"{path}: empty file, expected a header row of column names")
            missing = [c for c in columns if c not in header]
            if missing:
                raise ValueError(
                    f"{path}: column(s) {missing} given by {role} not found; the columns are "
                    f"{_names(header)}"
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
        except csv.Error as err:
            raise ValueError(
                f"{path}, line {reader.line_num}: not readable as CSV: {err}"
            ) from None
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{path}: not a text file in the expected encoding ({err.encoding}): byte "
                f"{err.start} cannot be decoded"
            ) from None
    if not values:
        raise ValueError(f"{path}: no data rows after the header")
    return np.asarray(values, dtype=np.float64)


# Python's csv module refuses fields over 131,072 characters by default; a C long bounds it.
_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)


@contextlib.contextmanager
def _any_field_size() -> Iterator[None]:
    """Lift the csv module's (process-wide) field size limit for one read, then restore it."""
    before = csv.field_size_limit(_FIELD_LIMIT)
    try:
        yield
    finally:
        csv.field_size_limit(before)


def _show(text: str, limit: int = 40) -> str:
    """``repr(text)``, cut to about ``limit`` characters, so a message stays one short line."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text):,} characters)"


def _names(header: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(_show(name) for name in header[:limit])
    return f"[{shown}{f', ... ({len(header)} in all)' if len(header) > limit else ''}]"


def _number(cell: str, path: Any, line: int, column: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        shown = "an empty cell" if not cell.strip() else _show(cell)
        raise ValueError(
            f"{path}, line {line}, column {_show(column)}: {shown} is not a finite number"
        )
    return value


def check_columns_fit(
    path: str | os.PathLike[str],
    values: np.ndarray,
    columns: Sequence[str],
    role: str,
    dtype: Any,
) -> None:
    """Refuse cells beyond the largest finite number of the model's ``dtype``.

    A value such as 1e39 is finite in the CSV and in float64, but infinite in a float32
    model. The message names the file, the data row (1-based, blank lines not counted),
    the column and the dtype.

    Parameters
    ----------
    path : the CSV file, for the message
    values : array of shape (n_rows, len(columns)), as :func:`read_columns` returns
    columns : the column names, in the order of ``values``' columns
    role : how the columns were asked for (say ``"--y"``)
    dtype : the model's dtype (torch dtype or its name)

    Examples
    --------
    >>> check_columns_fit("d.csv", np.array([[1.0], [1e39]]), ["y"], "--y", "float32")
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: d.csv, data row 2, column 'y' given by --y: 1e+39 is beyond the largest float32 ...
    """
    try:
        check_dtype_range(values, role, dtype)
    except ValueError:
        limit = float(np.finfo(str(dtype).removeprefix("torch.")).max)
        row, col = np.argwhere(np.abs(values) > limit)[0]
        raise ValueError(
            f"{path}, data row {row + 1}, column {_show(columns[col])} given by {role}: "
            f"{values[row, col]:.4g} is beyond the largest {str(dtype).removeprefix('torch.')} "
            f"({limit:.4g}), the precision the model computes in; rescale that column, or "
            "fit with --dtype float64"
        ) from None


def write_csv(
    path: str | os.PathLike[str], header: Sequence[str], columns: Sequence[np.ndarray]
) -> None:
    """Write equal-length 1-D arrays as CSV columns (full float precision), atomically."""
    data = np.column_stack([np.asarray(c, dtype=np.float64) for c in columns])
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([repr(float(v)) for v in row] for row in data)


def _json_finite(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return True


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
    mdn.check_params()
    X = read_columns(csv_path, x_columns, "--x")
    y = read_columns(csv_path, y_columns, "--y")
    check_columns_fit(csv_path, X, x_columns, "--x", mdn.dtype)
    check_columns_fit(csv_path, y, y_columns, "--y", mdn.dtype)
    mdn.fit(X, _target(y))
    mdn.save(model_path)
    return mdn


def fit_parquet(
    path: str | os.PathLike[str],
    x_columns: Sequence[str],
    y_columns: Sequence[str],
    model_path: str | os.PathLike[str],
    **options: Any,
) -> BayesianMDN:
    """Fit a :class:`BayesianMDN` on columns of a Parquet file or folder, streamed (never
    loaded whole), and save it to ``model_path``.

    ``options`` are :class:`BayesianMDN` arguments, checked with the file's schema before
    any row is read. Returns the fitted estimator.
    """
    from .sources import ParquetSource

    mdn = BayesianMDN(**options)
    mdn.check_params()
    source = ParquetSource(path, x=x_columns, y=y_columns)
    mdn.fit(source)
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

    Raises
    ------
    ValueError
        For bad inputs, and for metrics JSON cannot hold (an infinite NLL), before
        anything is written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import torch

    from . import plotting

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
    pit = mix.distribution().cdf(torch.as_tensor(y2).to(mix.loc)).cpu().numpy()
    metrics = {
        "n": len(y2),
        "nll": float(nll.mean()),
        "rmse": np.sqrt(((mean - y2) ** 2).mean(0)).tolist(),
        "coverage": coverage,
        "pit_mean": pit.mean(0).tolist(),
    }
    # Every number is known before anything is written: metrics that JSON cannot hold
    # (an infinite NLL: a target where the model's density underflows) write nothing.
    bad = sorted(k for k, v in metrics.items() if not _json_finite(v))
    if bad:
        raise ValueError(
            f"the metrics {bad} are not finite ({', '.join(f'{k}={metrics[k]}' for k in bad)}):"
            " some targets lie where the model's density underflows; nothing was written"
        )

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out_dir {os.fspath(out_dir)!r} is a file, not a folder")
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
    try:
        if y2.shape[1] == 1 and model.n_features_in_ == 1:
            fig, ax = plt.subplots(figsize=(6, 4.5))
            figures.append(("predictive_samples.png", fig))
            plotting.plot_predictive_samples(
                model, X, y2[:, 0], ax, seed=0 if seed is None else seed
            )
        out.mkdir(parents=True, exist_ok=True)
        for name, fig in figures:
            with atomic_path(out / name) as tmp:
                fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        for _, fig in figures:
            plt.close(fig)
    metrics["figures"] = [name for name, _ in figures]
    write_json(out / "metrics.json", metrics)
    return metrics
