"""The six real data sets of the suite, as float64 arrays in their original units."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bayes_mdn.datasets import load_dataset

__all__ = ["DATASETS", "DATA_DIR", "RealDataset", "load"]

DATA_DIR = Path(__file__).resolve().parents[1] / "data"

# name -> (file under benchmarks/data, target column, one line on what is modelled)
_BUNDLED: dict[str, tuple[str, str, str]] = {
    "airquality": (
        "airquality.csv",
        "Ozone",
        "New York, May-Sep 1973: ozone (ppb) given solar radiation, wind and temperature; "
        "complete rows only",
    ),
    "caschool": (
        "caschool.csv",
        "testscr",
        "California school districts 1998-99: average test score given ten numeric "
        "district columns (not its halves readscr and mathscr)",
    ),
    "wages1": (
        "wages1.csv",
        "wage",
        "US workers (Verbeek): hourly wage (1980 $) given experience, sex (female = 1) "
        "and years of schooling",
    ),
    "computers": (
        "computers.csv",
        "price",
        "486 PCs 1993-95: price (US $) given speed, disk, RAM, screen, cd/multi/premium "
        "(yes = 1), ads and month",
    ),
}

# In the order of the report: smallest first.
DATASETS: tuple[str, ...] = (
    "airquality",
    "mcycle",
    "faithful",
    "caschool",
    "wages1",
    "computers",
)


@dataclass(frozen=True)
class RealDataset:
    """One data set of the suite.

    Attributes
    ----------
    name : str
    X : ndarray of shape (n, d)
    y : ndarray of shape (n,)
    feature_names : tuple of str
    target_name : str
    description : str
    fingerprint : str
        First 16 hex digits of the SHA-256 of X and y as float64: part of every cache key,
        so that a changed file never reuses results computed on the old one.
    """

    name: str
    X: np.ndarray = field(repr=False)
    y: np.ndarray = field(repr=False)
    feature_names: tuple[str, ...]
    target_name: str
    description: str = field(repr=False)
    fingerprint: str = ""

    @property
    def n(self) -> int:
        return len(self.y)


def _fingerprint(X: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(X, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(y, dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


def load(name: str) -> RealDataset:
    """Load a data set of the suite by name (one of ``DATASETS``).

    faithful and mcycle come from the library (``bayes_mdn.datasets.load_dataset``), the
    other four from the CSV files in ``benchmarks/data`` (see its README.md).

    Examples
    --------
    >>> ds = load("airquality")
    >>> ds.X.shape, ds.y.shape, ds.target_name
    ((111, 3), (111,), 'Ozone')
    """
    if name in ("faithful", "mcycle"):
        lib = load_dataset(name)
        X, y = lib.X.astype(np.float64), lib.y.astype(np.float64)
        return RealDataset(
            name=name,
            X=X,
            y=y,
            feature_names=lib.feature_names,
            target_name=lib.target_name,
            description=lib.description,
            fingerprint=_fingerprint(X, y),
        )
    if name not in _BUNDLED:
        raise ValueError(f"unknown data set {name!r}; available: {list(DATASETS)}")
    filename, target, description = _BUNDLED[name]
    path = DATA_DIR / filename
    with path.open() as f:
        header = f.readline().strip().split(",")
        table = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
    j = header.index(target)
    features = tuple(c for c in header if c != target)
    X = table[:, [header.index(c) for c in features]]
    y = table[:, j]
    return RealDataset(
        name=name,
        X=X,
        y=y,
        feature_names=features,
        target_name=target,
        description=description,
        fingerprint=_fingerprint(X, y),
    )
