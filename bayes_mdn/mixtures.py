"""Deprecated: the functions of bayes_mdn 0.1's mixture module.

The mixture math now lives in one place, :class:`bayes_mdn.distributions.GaussianMixture`.
Each function here calls the method named in its docstring and warns; they will be
removed in a later release.
"""

from __future__ import annotations

import warnings

from torch import Tensor

from .distributions import GaussianMixture, MixtureParams

__all__ = [
    "GaussianMixture",
    "affine",
    "covariance",
    "log_prob",
    "marginal_cdf",
    "marginal_quantiles",
    "mean",
    "mixture_distribution",
    "modes",
    "pool_draws",
]


def _deprecated(name: str, instead: str) -> None:
    warnings.warn(
        f"bayes_mdn.mixtures.{name} is deprecated; use {instead}",
        DeprecationWarning,
        stacklevel=3,
    )


def mixture_distribution(params: MixtureParams, validate: bool = False) -> GaussianMixture:
    """``params.distribution()``."""
    _deprecated("mixture_distribution", "MixtureParams.distribution()")
    return params.distribution(validate)


def log_prob(params: MixtureParams, y: Tensor) -> Tensor:
    """``params.distribution().log_prob(y)``."""
    _deprecated("log_prob", "MixtureParams.distribution().log_prob")
    return params.distribution().log_prob(y)


def affine(params: MixtureParams, loc: Tensor, scale: Tensor) -> MixtureParams:
    """``params.distribution().affine(loc, scale).params``."""
    _deprecated("affine", "GaussianMixture.affine")
    return params.distribution().affine(loc, scale).params


def pool_draws(params: MixtureParams) -> MixtureParams:
    """``params.distribution().pool().params``."""
    _deprecated("pool_draws", "GaussianMixture.pool")
    return params.distribution().pool().params


def marginal_cdf(params: MixtureParams, y: Tensor) -> Tensor:
    """``params.distribution().cdf(y)``."""
    _deprecated("marginal_cdf", "GaussianMixture.cdf")
    return params.distribution().cdf(y)


def marginal_quantiles(params: MixtureParams, q: Tensor, iterations: int = 100) -> Tensor:
    """``params.distribution().quantiles(q, iterations)``."""
    _deprecated("marginal_quantiles", "GaussianMixture.quantiles")
    return params.distribution().quantiles(q, iterations)


def mean(params: MixtureParams) -> Tensor:
    """``params.distribution().mean``."""
    _deprecated("mean", "GaussianMixture.mean")
    return params.distribution().mean


def covariance(params: MixtureParams) -> Tensor:
    """``params.distribution().covariance_matrix``."""
    _deprecated("covariance", "GaussianMixture.covariance_matrix")
    return params.distribution().covariance_matrix


def modes(
    params: MixtureParams, iterations: int = 200, tol: float = 1e-2
) -> tuple[Tensor, Tensor]:
    """``params.distribution().modes(iterations, tol)``."""
    _deprecated("modes", "GaussianMixture.modes")
    return params.distribution().modes(iterations, tol)
