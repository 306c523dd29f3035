"""Epistemic uncertainty where there are no data (issue #16): the data-with-a-hole problem of
notebook 02, on a fresh seed, K = 1 as the notebook uses, every other setting the default."""

from __future__ import annotations

import numpy as np
import pytest

from bayes_mdn import BayesianMDN


def _f(x):
    return np.sin(x) + 0.3 * x


def _sd(x):
    return 0.1 + 0.25 * (x + 4) / 8


def _sample(rng, x):
    return x.reshape(-1, 1), _f(x) + _sd(x) * rng.standard_normal(len(x))


def _train(seed, n=150):
    rng = np.random.default_rng(seed)
    x = np.where(rng.random(n) < 0.5, rng.uniform(-4, -1, n), rng.uniform(1.5, 4, n))
    return _sample(rng, x)


def _regions(seed, n=4000):
    rng = np.random.default_rng(seed)
    half = rng.random(n) < 0.5
    return {
        "data": _sample(rng, np.where(half, rng.uniform(-4, -1, n), rng.uniform(1.5, 4, n))),
        "hole": _sample(rng, rng.uniform(-1, 1.5, n)),
    }


def _coverage(mdn, X, y):
    lo, hi = mdn.predict_interval(X, 0.9)
    return float(((y > lo) & (y < hi)).mean())


@pytest.mark.slow
def test_default_fit_is_honest_in_the_hole():
    X, y = _train(seed=13)
    regions = _regions(seed=10_013)
    mdn = BayesianMDN(n_components=1, seed=13, progress=False).fit(X, y)
    # Measured (docs/defaults.md): the default ensemble covers 0.92 of fresh points in the
    # data and 0.80 in the hole on this seed (the 0.1 defaults: 0.94 and 0.28). 4,000 points
    # a region put the sd of a coverage near 0.005; the bounds leave room for fits that
    # differ across machines. Issue #16's goal (0.85 in the hole) is not met on every seed.
    assert 0.85 <= _coverage(mdn, *regions["data"]) <= 0.95
    assert _coverage(mdn, *regions["hole"]) >= 0.7
    # In the hole the density stays sane: the 0.1 defaults gave NLL 7.7 there, five MAP fits
    # pooled by hand 1.6; measured here 0.24.
    assert -mdn.score(*regions["hole"]) < 1.0
