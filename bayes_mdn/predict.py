"""The posterior predictive of a fitted model: draws, densities, quantiles, modes.

The posterior predictive p(y | x, D) of a Bayesian MDN, estimated with S posterior
draws of the weights, is itself a Gaussian mixture with S x K components. Its density,
CDF, quantiles, moments and modes are therefore computed exactly from that pooled
mixture; only y draws are random (through ``pyro.infer.Predictive``, or the model's
sampler called directly). Work is split into chunks of x so that memory stays bounded
whatever the number of points.

Moments (mean, standard deviation, covariance, the variance decomposition) are computed in
the model's standardized units of y and mapped to y's units in float64 at the end, so they
come back as float64 whatever the model's dtype: in float32 the variance of targets near
1e19 overflows and that of targets near 1e-23 underflows, though the model fits both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import cast

import torch
from pyro import poutine
from pyro.infer import Predictive
from torch import Tensor, nn

from ._utils import pyro_scope, seeded
from ._validation import check_seed
from .distributions import GaussianMixture, MixtureParams
from .guides import EnsembleGuide, draw_latents, is_deterministic
from .model import DEFAULT_MAX_ELEMENTS, OBS_SITE, MixtureDensityModel

__all__ = [
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


def _effective_draws(guide: nn.Module, num_draws: int) -> int:
    if not isinstance(num_draws, int) or isinstance(num_draws, bool) or num_draws < 1:
        raise ValueError(f"num_draws must be an integer >= 1, got {num_draws!r}")
    if isinstance(guide, EnsembleGuide):
        return guide.effective_draws(num_draws)
    return 1 if is_deterministic(guide) else num_draws


def _chunks(n: int, per_point: int, max_elements: int) -> Iterator[slice]:
    size = max(1, max_elements // max(per_point, 1))
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def posterior_weights(
    model: MixtureDensityModel, guide: nn.Module, num_draws: int = 100, seed: int | None = 0
) -> dict[str, Tensor]:
    """Joint posterior draws of the latent weights: {site: Tensor (S, *shape)}.

    A deterministic guide (MAP, or no latent weights) gives one draw whatever
    ``num_draws`` asks for: every draw would be the same.
    """
    draws = _effective_draws(guide, num_draws)
    seed = check_seed(seed)
    device = model.prior_scale.device
    with pyro_scope(), seeded(seed, device), torch.no_grad():
        return draw_latents(guide, draws)


def _map_chunks(
    model: MixtureDensityModel,
    x: Tensor,
    weights: dict[str, Tensor],
    fn: Callable[[MixtureParams, slice], Tensor],
    max_elements: int,
    standardized: bool = False,
) -> Tensor:
    """``fn`` of the mixture at each chunk of x, concatenated along the points; the
    mixture in y's units, or in the model's standardized units with ``standardized``."""
    draws = next(iter(weights.values())).shape[0] if weights else 1
    net = model.net
    per_point = draws * net.n_components * net.d_y * (net.d_y if net.covariance == "full" else 1)
    outs = []
    with torch.no_grad():
        for sl in _chunks(len(x), per_point, max_elements):
            if standardized:
                params = net.split(model.raw(x[sl], weights))
            else:
                params = model.mixture(x[sl], weights)
            if params.logits.dim() == 2:
                params = params.map(lambda t: t.unsqueeze(0))
            outs.append(fn(params, sl))
    return torch.cat(outs, dim=0)


def predictive_params(
    model: MixtureDensityModel,
    guide: nn.Module,
    x: Tensor,
    num_draws: int = 100,
    seed: int | None = 0,
) -> MixtureParams:
    """Mixture parameters per posterior draw: logits (S, n, K), loc (S, n, K, d), ..."""
    weights = posterior_weights(model, guide, num_draws, seed)
    with torch.no_grad():
        params = model.mixture(x, weights)
    if params.logits.dim() == 2:
        params = params.map(lambda t: t.unsqueeze(0))
    return params


def predictive_mixture(
    model: MixtureDensityModel,
    guide: nn.Module,
    x: Tensor,
    num_draws: int = 100,
    seed: int | None = 0,
) -> MixtureParams:
    """The posterior predictive at each x as one mixture of S*K components: (n, S*K)."""
    return predictive_params(model, guide, x, num_draws, seed).distribution().pool().params


def log_predictive_density(
    model: MixtureDensityModel,
    guide: nn.Module,
    x: Tensor,
    y: Tensor,
    num_draws: int = 100,
    seed: int | None = 0,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Tensor:
    """log p(y | x, D) = log (1/S) sum_s p(y | x, theta_s), shape (n,), in y's units."""
    weights = posterior_weights(model, guide, num_draws, seed)
    return model.log_predictive_density(x, y, weights, max_elements)


SAMPLERS = ("predictive", "direct")


def sample_predictive(
    model: MixtureDensityModel,
    guide: nn.Module,
    x: Tensor,
    num_samples: int = 100,
    seed: int | None = 0,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    sampler: str = "predictive",
) -> Tensor:
    """Posterior-predictive draws of y: (S, n, d).

    Each draw takes its own posterior draw of the weights, then y from the mixture
    those weights give, so the draws carry both kinds of uncertainty.

    Parameters
    ----------
    sampler : {"predictive", "direct"}
        ``"predictive"`` runs the Pyro model under ``pyro.infer.Predictive`` (vectorized
        over draws, ``y=None`` so that y is sampled, not copied). ``"direct"`` calls the
        model's sampler (:meth:`MixtureDensityModel.sample`, the one the observed site's
        distribution uses under Predictive) without Pyro's tracing: the same
        distribution, slightly faster, but not the same numbers for a seed (Predictive
        first runs the model twice to learn its shapes, which draws random numbers).
    max_elements : int
        Bound on the elements of the largest tensor built at once: x is taken in chunks
        so that neither the network's output for all draws nor the draws of y exceed it.
    """
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    seed = check_seed(seed)
    device = model.prior_scale.device
    if isinstance(guide, EnsembleGuide):
        return _sample_ensemble(guide, x, num_samples, seed, max_elements, sampler)
    with pyro_scope(), seeded(seed, device), torch.no_grad():
        weights = draw_latents(guide, num_samples)
        shared = is_deterministic(guide)
        if shared:
            # Every draw has the same weights (MAP, or none at all): one network.
            weights = {name: value[0] for name, value in weights.items()}
        if sampler == "direct":

            def draw(xs: Tensor) -> Tensor:
                num_draws = num_samples if shared else None
                return model.sample(xs, weights, num_draws, max_elements)

        else:
            if shared:
                # The model is conditioned on the one set of weights, and the vectorizing
                # plate expands the likelihood to independent draws of y.
                predictive = Predictive(
                    poutine.condition(model, weights),
                    num_samples=num_samples,
                    return_sites=[OBS_SITE],
                    parallel=True,
                )
            else:
                predictive = Predictive(
                    model, posterior_samples=weights, return_sites=[OBS_SITE], parallel=True
                )

            def draw(xs: Tensor) -> Tensor:
                return predictive(xs, None)[OBS_SITE]

        # The model's sampler bounds its own working memory. Chunks of x here bound the
        # draws held per call and Predictive's per-call overhead, and keep the allocator
        # reusing freed pages: one call over 10,000 x at 1,000 draws is a third slower.
        d_y = model.net.d_y
        outs = [
            draw(x[sl]).reshape(num_samples, -1, d_y)
            for sl in _chunks(len(x), num_samples * d_y, max_elements)
        ]
        return torch.cat(outs, dim=1) if outs else x.new_zeros(num_samples, 0, d_y)


def _sample_ensemble(
    ensemble: EnsembleGuide,
    x: Tensor,
    num_samples: int,
    seed: int | None,
    max_elements: int,
    sampler: str,
) -> Tensor:
    """Draws of an ensemble's predictive: each draw from a member picked as
    :meth:`EnsembleGuide.assignment` picks them, through that member's own sampler."""
    with seeded(seed, x.device):
        which = ensemble.assignment(num_samples).to(x.device)
        member_seeds = torch.randint(2**62, (len(ensemble),)).tolist()
    out = x.new_empty(num_samples, len(x), ensemble.models[0].net.d_y)
    for m, (model, guide) in enumerate(ensemble.members):
        idx = (which == m).nonzero().flatten()
        if len(idx):
            out[idx] = sample_predictive(
                model, guide, x, len(idx), member_seeds[m], max_elements, sampler
            )
    return out


def _pooled(
    model: MixtureDensityModel,
    guide: nn.Module,
    x: Tensor,
    num_draws: int,
    seed: int | None,
    fn: Callable[[GaussianMixture], Tensor],
    max_elements: int,
    cost: int = 1,
) -> Tensor:
    """``fn`` of the pooled predictive mixture, in standardized units of y."""
    weights = posterior_weights(model, guide, num_draws, seed)
    return _map_chunks(
        model,
        x,
        weights,
        lambda p, _: fn(p.distribution().pool()),
        max_elements // cost,
        standardized=True,
    )


def _y_units(model: MixtureDensityModel) -> tuple[Tensor, Tensor]:
    """The location and scale of y (the model's standardization), in float64."""
    loc, scale = cast(Tensor, model.y_loc), cast(Tensor, model.y_scale)
    return loc.to(torch.float64), scale.to(torch.float64)


def _to_user_units(model: MixtureDensityModel, z: Tensor, power: int, what: str) -> Tensor:
    """A moment in standardized units of y -> y's units, in float64: ``z`` (last axis
    y's d) times y_scale ** ``power``, 1 for a standard deviation, 2 for a variance.

    Raises ``OverflowError`` when a finite standardized moment overflows float64.
    """
    _, scale = _y_units(model)
    out = z.to(torch.float64) * scale**power
    _check_overflow(z, out, what, scale)
    return out


def _check_overflow(z: Tensor, out: Tensor, what: str, scale: Tensor) -> None:
    if not bool(torch.isfinite(out).all()) and bool(torch.isfinite(z).all()):
        raise OverflowError(
            f"the predictive {what} overflows float64 in y's units (y's standard deviation "
            f"is {scale.max().item():.3g}); ask for a standard deviation (predict_std), or "
            "rescale y before fitting"
        )


def predictive_mean(
    model: MixtureDensityModel,
    guide: nn.Module,
    x: Tensor,
    num_draws: int = 100,
    seed: int | None = 0,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Tensor:
    """Mean of the posterior predictive, float64 Tensor of shape (n, d)."""
    z = _pooled(model, guide, x, num_draws, seed, lambda m: m.mean, max_elements)
    loc, scale = _y_units(model)
    out = loc + scale * z.to(torch.float64)
    _check_overflow(z, out, "mean", scale)
    return out


def predictive_std(
    model: MixtureDensityModel,
    guide: nn.Module,
    x: Tensor,
    num_draws: int = 100,
    seed: int | None = 0,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Tensor:
    """Marginal standard deviations of the posterior predictive, float64 Tensor (n, d)."""

    z = _pooled(model, guide, x, num_draws, seed, lambda m: m.variance, max_elements)
    # The square root in float64, as predictive_covariance's entries are scaled: the
    # two agree to float64 rounding.
    return _to_user_units(model, z.to(torch.float64).sqrt(), 1, "standard deviation")


def predictive_covariance(
    model: MixtureDensityModel,
    guide: nn.Module,
    x: Tensor,
    num_draws: int = 100,
    seed: int | None = 0,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Tensor:
    """Covariance matrix of the posterior predictive, float64 Tensor of shape (n, d, d).

    Exact for the pooled mixture of S*K components (law of total variance over
    components and draws), so it holds both the noise the model sees in the data and
    the spread between posterior draws.

    Examples
    --------
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
    z = _pooled(
        model,
        guide,
        x,
        num_draws,
        seed,
        lambda m: m.covariance_matrix,
        max_elements,
        cost=model.net.d_y,
    )
    _, scale = _y_units(model)
    out = z.to(torch.float64) * (scale[:, None] * scale[None, :])
    _check_overflow(z, out, "covariance", scale)
    return out


def predictive_cdf(
    model: MixtureDensityModel,
    guide: nn.Module,
    x: Tensor,
    y: Tensor,
    num_draws: int = 100,
    seed: int | None = 0,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Tensor:
    """Marginal CDF of the posterior predictive at the observed y: PIT values, (n, d).

    Column j is P(Y_j <= y_j | x, D) under the pooled mixture, computed exactly (a
    marginal of a Gaussian mixture is a Gaussian mixture). For a calibrated model
    each column is uniform on (0, 1) over the data.

    Parameters
    ----------
    x : Tensor of shape (n, d_x)
    y : Tensor of shape (n, d)
    """
    if y.shape != (len(x), model.net.d_y):
        raise ValueError(
            f"y must have shape (n, d_y) = ({len(x)}, {model.net.d_y}), got {tuple(y.shape)}"
        )
    weights = posterior_weights(model, guide, num_draws, seed)

    def cdf(params: MixtureParams, sl: slice) -> Tensor:
        return params.distribution().pool().cdf(y[sl])

    return _map_chunks(model, x, weights, cdf, max_elements)


def predictive_quantiles(
    model: MixtureDensityModel,
    guide: nn.Module,
    x: Tensor,
    q: Tensor,
    num_draws: int = 100,
    seed: int | None = 0,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Tensor:
    """Marginal quantiles of the posterior predictive from its exact CDF: (n, m, d).

    q : Tensor of shape (m,), each strictly between 0 and 1.
    """
    q = torch.as_tensor(q, dtype=x.dtype, device=x.device)
    if q.dim() > 1:
        raise ValueError(
            f"quantile levels q must be a number or of shape (m,), got shape {tuple(q.shape)}"
        )
    q = q.reshape(-1)
    if q.numel() == 0 or not bool(((q > 0) & (q < 1)).all()):
        raise ValueError(f"quantile levels must lie strictly between 0 and 1, got {q.tolist()}")

    def quant(m: GaussianMixture) -> Tensor:
        return m.quantiles(q).movedim(0, 1)

    # Solved in standardized units (where the mixture is well scaled), mapped back in float64.
    z = _pooled(model, guide, x, num_draws, seed, quant, max_elements, cost=len(q))
    loc, scale = _y_units(model)
    out = loc + scale * z.to(torch.float64)
    _check_overflow(z, out, "quantiles", scale)
    return out


def predictive_interval(
    model: MixtureDensityModel,
    guide: nn.Module,
    x: Tensor,
    level: float = 0.9,
    num_draws: int = 100,
    seed: int | None = 0,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """Central interval holding ``level`` of the predictive mass: (lower, upper), each (n, d)."""
    if not (isinstance(level, (int, float)) and 0 < level < 1):
        raise ValueError(f"level must lie strictly between 0 and 1, got {level!r}")
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=x.dtype, device=x.device)
    bounds = predictive_quantiles(model, guide, x, q, num_draws, seed, max_elements)
    return bounds[:, 0], bounds[:, 1]


def predictive_modes(
    model: MixtureDensityModel,
    guide: nn.Module,
    x: Tensor,
    num_draws: int = 16,
    seed: int | None = 0,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """Modes of the posterior predictive density at each x.

    Returns
    -------
    modes : Tensor of shape (n, C, d), highest density first, NaN padded
    log_density : Tensor of shape (n, C), NaN padded
    """
    weights = posterior_weights(model, guide, num_draws, seed)
    draws = next(iter(weights.values())).shape[0] if weights else 1
    comps = draws * model.net.n_components
    out_modes, out_dens = [], []
    with torch.no_grad():
        for sl in _chunks(len(x), comps * comps * model.net.d_y, max_elements):
            params = model.mixture(x[sl], weights)
            if params.logits.dim() == 2:
                params = params.map(lambda t: t.unsqueeze(0))
            m, d = params.distribution().pool().modes()
            out_modes.append(m)
            out_dens.append(d)
    return torch.cat(out_modes), torch.cat(out_dens)


def uncertainty_decomposition(
    model: MixtureDensityModel,
    guide: nn.Module,
    x: Tensor,
    num_draws: int = 100,
    seed: int | None = 0,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> dict[str, Tensor]:
    """Split the predictive variance by the law of total variance over posterior draws.

    Var[y | x, D] = E_theta[Var(y | x, theta)] + Var_theta[E(y | x, theta)]: the first
    term is aleatoric (noise the model believes is in the data), the second epistemic
    (disagreement between plausible networks, which shrinks with more data).

    Returns
    -------
    dict with "total", "aleatoric" and "epistemic", each a float64 Tensor of shape (n, d).
    """
    weights = posterior_weights(model, guide, num_draws, seed)

    def split(params: MixtureParams, _: slice) -> Tensor:
        mix = params.distribution()
        means, variances = mix.mean, mix.variance  # each (S, n, d)
        aleatoric = variances.mean(0)
        epistemic = means.var(0, unbiased=False)
        return torch.stack([aleatoric + epistemic, aleatoric, epistemic], dim=-1)

    z = _map_chunks(model, x, weights, split, max_elements, standardized=True)
    out = _to_user_units(model, z.movedim(-1, 0), 2, "variance")
    return {"total": out[0], "aleatoric": out[1], "epistemic": out[2]}
