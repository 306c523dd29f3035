"""Proper scores and calibration numbers for Gaussian-mixture predictives (no ArviZ).

Every function takes the predictive as one :class:`~bayes_mdn.distributions.MixtureParams` with
logits of shape (n, M) (for a Bayesian MDN, the pooled S x K mixture of
:meth:`bayes_mdn.distributions.GaussianMixture.pool`) and targets y of shape (n, d). PIT values,
quantiles and the CRPS are exact functions of that mixture; only the energy score of
vector targets needs predictive draws.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import scoringrules as sr
import torch
from torch import Tensor

from .distributions import MixtureParams

__all__ = [
    "crps_mixture",
    "energy_score",
    "interval_coverage",
    "ks_uniform",
    "negative_log_likelihood",
    "pit",
]

# Elements of the largest (points x M x M) array the mixture CRPS builds at once.
_MAX_ELEMENTS = 2**22


def _check_y(params: MixtureParams, y: Tensor) -> None:
    n, d = params.logits.shape[0], params.loc.shape[-1]
    if params.logits.dim() != 2:
        raise ValueError(
            f"params must describe one mixture per point (logits of shape (n, M)), got "
            f"logits of shape {tuple(params.logits.shape)}; pool posterior draws first"
        )
    if y.dim() != 2 or tuple(y.shape) != (n, d):
        raise ValueError(f"y must have shape ({n}, {d}), got {tuple(y.shape)}")


def pit(params: MixtureParams, y: Tensor) -> np.ndarray:
    """Probability integral transform F_j(y_j | x) of each marginal, shape (n, d).

    For a calibrated predictive these values are U(0, 1).

    Examples
    --------
    >>> p = MixtureParams(torch.zeros(1, 1), torch.zeros(1, 1, 1), torch.ones(1, 1, 1))
    >>> pit(p, torch.zeros(1, 1)).tolist()
    [[0.5]]
    """
    _check_y(params, y)
    with torch.no_grad():
        return params.distribution().cdf(y).cpu().numpy()


def ks_uniform(u: np.ndarray) -> tuple[float, float]:
    """One-sample Kolmogorov-Smirnov test of ``u`` against U(0, 1).

    The p-value is the asymptotic Kolmogorov distribution with Stephens' small-sample
    correction, Q((sqrt(n) + 0.12 + 0.11 / sqrt(n)) D), accurate to about 1 % for n >= 5
    (Numerical Recipes, 3rd ed., 14.3.3).

    Parameters
    ----------
    u : array-like of shape (n,), values in [0, 1]

    Returns
    -------
    (statistic D, p-value)

    Examples
    --------
    >>> d, p = ks_uniform(np.linspace(0.005, 0.995, 100))
    >>> round(d, 3), p > 0.99
    (0.005, True)
    """
    u = np.sort(np.asarray(u, dtype=float).reshape(-1))
    n = u.size
    if n == 0:
        raise ValueError("u must hold at least one value, got an empty array")
    if not np.all(np.isfinite(u)) or u[0] < 0 or u[-1] > 1:
        raise ValueError("u must hold finite values in [0, 1]")
    i = np.arange(1, n + 1)
    stat = float(max((i / n - u).max(), (u - (i - 1) / n).max()))
    sqrt_n = math.sqrt(n)
    lam = (sqrt_n + 0.12 + 0.11 / sqrt_n) * stat
    if lam < 1e-3:
        return stat, 1.0
    k = np.arange(1, 101)
    p = 2.0 * np.sum((-1.0) ** (k - 1) * np.exp(-2.0 * (k * lam) ** 2))
    return stat, float(min(max(p, 0.0), 1.0))


def interval_coverage(
    params: MixtureParams, y: Tensor, levels: Sequence[float] = (0.5, 0.8, 0.9, 0.95)
) -> np.ndarray:
    """Share of points inside the central predictive interval of each level, per marginal.

    The interval bounds are exact quantiles (bisection of the mixture CDF).

    Returns
    -------
    ndarray of shape (len(levels), d): the empirical coverage of each nominal level.
    """
    _check_y(params, y)
    lv = np.asarray(levels, dtype=float).reshape(-1)
    if lv.size == 0 or not np.all((lv > 0) & (lv < 1)):
        raise ValueError(f"levels must lie strictly between 0 and 1, got {list(levels)}")
    q = torch.tensor(np.concatenate([(1 - lv) / 2, (1 + lv) / 2]), dtype=y.dtype, device=y.device)
    with torch.no_grad():
        bounds = params.distribution().quantiles(q)  # (2L, n, d)
    lo, hi = bounds[: lv.size], bounds[lv.size :]
    inside = (y >= lo) & (y <= hi)
    return inside.to(y.dtype).mean(1).cpu().numpy()


def crps_mixture(
    params: MixtureParams, y: Tensor, max_elements: int = _MAX_ELEMENTS
) -> np.ndarray:
    """Closed-form CRPS of each marginal of the mixture (Grimit et al., 2006), shape (n, d).

    Uses ``scoringrules.crps_mixnorm`` on normalized weights (it does not normalize them
    itself); its cost is quadratic in the number of components M, so points are scored
    in chunks of at most ``max_elements`` pairwise terms.

    Examples
    --------
    >>> p = MixtureParams(torch.zeros(1, 1), torch.zeros(1, 1, 1), torch.ones(1, 1, 1))
    >>> round(float(crps_mixture(p, torch.zeros(1, 1))[0, 0]), 4)  # (sqrt(2) - 1) / sqrt(pi)
    0.2337
    """
    _check_y(params, y)
    with torch.no_grad():
        w = torch.softmax(params.logits, -1).double().cpu().numpy()  # (n, M)
        loc = params.loc.double().cpu().numpy()  # (n, M, d)
        sd = params.marginal_scale().double().cpu().numpy()
    obs = y.double().cpu().numpy()
    n, m = w.shape
    step = max(1, max_elements // (m * m))
    out = np.empty(obs.shape)
    for start in range(0, n, step):
        sl = slice(start, start + step)
        for j in range(obs.shape[1]):
            out[sl, j] = sr.crps_mixnorm(
                obs[sl, j], loc[sl, :, j], sd[sl, :, j], w[sl], m_axis=-1, backend="numpy"
            )
    return out


def energy_score(samples: Tensor | np.ndarray, y: Tensor | np.ndarray) -> np.ndarray:
    """Energy score of predictive draws for vector targets, shape (n,).

    Parameters
    ----------
    samples : array of shape (S, n, d), predictive draws
    y : array of shape (n, d)

    Returns
    -------
    ndarray of shape (n,) from ``scoringrules.es_ensemble``; lower is better, and it
    reduces to the CRPS for d = 1.
    """
    s = samples.detach().cpu().numpy() if isinstance(samples, Tensor) else np.asarray(samples)
    obs = y.detach().cpu().numpy() if isinstance(y, Tensor) else np.asarray(y)
    if s.ndim != 3 or obs.ndim != 2 or s.shape[1:] != obs.shape:
        raise ValueError(
            f"samples must have shape (S, n, d) and y shape (n, d), got {s.shape} and {obs.shape}"
        )
    # scoringrules wants (n, S, d): ensemble members on m_axis, variables on v_axis.
    return np.asarray(
        sr.es_ensemble(obs, np.moveaxis(s, 0, 1), m_axis=-2, v_axis=-1, backend="numpy")
    )


def negative_log_likelihood(params: MixtureParams, y: Tensor) -> float:
    """Mean negative log predictive density, nats per point."""
    _check_y(params, y)
    with torch.no_grad():
        return float(-params.distribution().log_prob(y).mean())
