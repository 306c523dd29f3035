"""The posterior predictive as functions of ``(model, guide, x, ...)``.

The functional form of :class:`~bayes_mdn.posterior.Posterior`, kept for code written against
bayes_mdn 0.1: each function builds ``Posterior(model, guide, num_draws, max_elements)`` and
calls one of its methods, so both give the same numbers for a seed. New code can hold a
``Posterior`` (a fitted estimator's ``posterior_``) and call its methods.
"""

from __future__ import annotations

from torch import Tensor, nn

from .model import DEFAULT_MAX_ELEMENTS, MixtureDensityModel
from .nets import MixtureParams
from .posterior import SAMPLERS, Posterior

__all__ = [
    "SAMPLERS",
    "log_predictive_density",
    "posterior_weights",
    "predictive_cdf",
    "predictive_covariance",
    "predictive_interval",
    "predictive_mean",
    "predictive_mixture",
    "predictive_modes",
    "predictive_params",
    "predictive_quantiles",
    "predictive_std",
    "sample_predictive",
    "uncertainty_decomposition",
]


def posterior_weights(
    model: MixtureDensityModel, guide: nn.Module, num_draws: int = 100, seed: int | None = 0
) -> dict[str, Tensor]:
    """Joint posterior draws of the latent weights, {site: (S, *shape)}:
    :meth:`Posterior.weights`."""
    return Posterior(model, guide).weights(num_draws, seed)


def predictive_params(
    model: MixtureDensityModel,
    guide: nn.Module,
    x: Tensor,
    num_draws: int = 100,
    seed: int | None = 0,
) -> MixtureParams:
    """Mixture parameters per posterior draw: :meth:`Posterior.params`."""
    return Posterior(model, guide).params(x, num_draws, seed)


def predictive_mixture(
    model: MixtureDensityModel,
    guide: nn.Module,
    x: Tensor,
    num_draws: int = 100,
    seed: int | None = 0,
) -> MixtureParams:
    """The parameters of the pooled predictive mixture, (n, S*K):
    :meth:`Posterior.mixture` ``.params``."""
    return Posterior(model, guide).mixture(x, num_draws, seed).params


def log_predictive_density(
    model: MixtureDensityModel,
    guide: nn.Module,
    x: Tensor,
    y: Tensor,
    num_draws: int = 100,
    seed: int | None = 0,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Tensor:
    """log p(y | x, D), shape (n,): :meth:`Posterior.log_prob`."""
    return Posterior(model, guide, max_elements=max_elements).log_prob(x, y, num_draws, seed)


def sample_predictive(
    model: MixtureDensityModel,
    guide: nn.Module,
    x: Tensor,
    num_samples: int = 100,
    seed: int | None = 0,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    sampler: str = "predictive",
) -> Tensor:
    """Posterior-predictive draws of y, (S, n, d): :meth:`Posterior.sample`."""
    return Posterior(model, guide, max_elements=max_elements).sample(x, num_samples, seed, sampler)


def predictive_mean(
    model: MixtureDensityModel,
    guide: nn.Module,
    x: Tensor,
    num_draws: int = 100,
    seed: int | None = 0,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Tensor:
    """Mean of the posterior predictive, float64 (n, d): :meth:`Posterior.mean`."""
    return Posterior(model, guide, max_elements=max_elements).mean(x, num_draws, seed)


def predictive_std(
    model: MixtureDensityModel,
    guide: nn.Module,
    x: Tensor,
    num_draws: int = 100,
    seed: int | None = 0,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Tensor:
    """Marginal standard deviations, float64 (n, d): :meth:`Posterior.std`."""
    return Posterior(model, guide, max_elements=max_elements).std(x, num_draws, seed)


def predictive_covariance(
    model: MixtureDensityModel,
    guide: nn.Module,
    x: Tensor,
    num_draws: int = 100,
    seed: int | None = 0,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Tensor:
    """Covariance matrix of the posterior predictive, float64 (n, d, d):
    :meth:`Posterior.covariance`.

    Examples
    --------
    >>> import torch
    >>> from bayes_mdn._utils import pyro_scope
    >>> from bayes_mdn.guides import make_guide
    >>> from bayes_mdn.nets import MixtureDensityNetwork
    >>> net = MixtureDensityNetwork(d_x=1, d_y=2, n_components=3, hidden=(4,), covariance="full")
    >>> model = MixtureDensityModel(net, x_loc=torch.zeros(1), x_scale=torch.ones(1),
    ...                             y_loc=torch.zeros(2), y_scale=torch.ones(2))
    >>> guide = make_guide(model, "delta")
    >>> with pyro_scope():
    ...     _ = guide(torch.zeros(1, 1), torch.zeros(1, 2))
    >>> predictive_covariance(model, guide, torch.zeros(5, 1)).shape
    torch.Size([5, 2, 2])
    """
    return Posterior(model, guide, max_elements=max_elements).covariance(x, num_draws, seed)


def predictive_cdf(
    model: MixtureDensityModel,
    guide: nn.Module,
    x: Tensor,
    y: Tensor,
    num_draws: int = 100,
    seed: int | None = 0,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Tensor:
    """Marginal predictive CDF at y (PIT values), (n, d): :meth:`Posterior.cdf`."""
    return Posterior(model, guide, max_elements=max_elements).cdf(x, y, num_draws, seed)


def predictive_quantiles(
    model: MixtureDensityModel,
    guide: nn.Module,
    x: Tensor,
    q: Tensor,
    num_draws: int = 100,
    seed: int | None = 0,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Tensor:
    """Marginal predictive quantiles, (n, m, d): :meth:`Posterior.quantiles`."""
    return Posterior(model, guide, max_elements=max_elements).quantiles(x, q, num_draws, seed)


def predictive_interval(
    model: MixtureDensityModel,
    guide: nn.Module,
    x: Tensor,
    level: float = 0.9,
    num_draws: int = 100,
    seed: int | None = 0,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """Central predictive interval (lower, upper), each (n, d): :meth:`Posterior.interval`."""
    return Posterior(model, guide, max_elements=max_elements).interval(x, level, num_draws, seed)


def predictive_modes(
    model: MixtureDensityModel,
    guide: nn.Module,
    x: Tensor,
    num_draws: int = 16,
    seed: int | None = 0,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """Modes of the predictive density and their log densities: :meth:`Posterior.modes`."""
    return Posterior(model, guide, max_elements=max_elements).modes(x, num_draws, seed)


def uncertainty_decomposition(
    model: MixtureDensityModel,
    guide: nn.Module,
    x: Tensor,
    num_draws: int = 100,
    seed: int | None = 0,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> dict[str, Tensor]:
    """Predictive variance split into total, aleatoric and epistemic parts:
    :meth:`Posterior.uncertainty`."""
    return Posterior(model, guide, max_elements=max_elements).uncertainty(x, num_draws, seed)
