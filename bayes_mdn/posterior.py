"""``Posterior``: a fitted model's posterior and the predictive distribution it implies.

The posterior predictive p(y | x, D) of a Bayesian MDN, estimated with S posterior draws of
the weights, is itself a Gaussian mixture with S x K components. Its density, CDF,
quantiles, moments and modes are therefore computed exactly from that pooled mixture (a
:class:`~bayes_mdn.distributions.GaussianMixture`); only y draws are random (through
``pyro.infer.Predictive``, or the model's sampler called directly). Work is split into
chunks of x so that memory stays bounded whatever the number of points.

Moments (mean, standard deviation, covariance, the variance decomposition) are computed in
the model's standardized units of y and mapped to y's units in float64 at the end, so they
come back as float64 whatever the model's dtype: in float32 the variance of targets near
1e19 overflows and that of targets near 1e-23 underflows, though the model fits both.

A :class:`Posterior` is what the estimator's ``posterior_`` holds, and what
:mod:`bayes_mdn.predict` (its functional form), :mod:`bayes_mdn.diagnostics` and saving
consume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import cast

import torch
from pyro import poutine
from pyro.infer import Predictive
from torch import Tensor, nn

from ._utils import pyro_scope, seeded
from ._validation import check_count, check_seed
from .distributions import GaussianMixture, MixtureParams
from .guides import EnsembleGuide, draw_latents, is_deterministic
from .model import DEFAULT_MAX_ELEMENTS, OBS_SITE, MixtureDensityModel

__all__ = ["SAMPLERS", "Posterior"]

#: How :meth:`Posterior.sample` draws y: through ``pyro.infer.Predictive``, or by calling
#: the model's sampler directly.
SAMPLERS = ("predictive", "direct")


def _chunks(n: int, per_point: int, max_elements: int) -> Iterator[slice]:
    size = max(1, max_elements // max(per_point, 1))
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _check_overflow(z: Tensor, out: Tensor, what: str, scale: Tensor) -> None:
    if not bool(torch.isfinite(out).all()) and bool(torch.isfinite(z).all()):
        raise OverflowError(
            f"the predictive {what} overflows float64 in y's units (y's standard deviation "
            f"is {scale.max().item():.3g}); ask for a standard deviation (predict_std), or "
            "rescale y before fitting"
        )


class Posterior:
    """The posterior of a fitted Bayesian MDN: a model, a guide, and how many draws to use.

    Every method takes x as a Tensor of shape (n, d_x) on the model's device and dtype (y,
    where taken, of shape (n, d_y)), and a ``seed`` for its posterior draws, so that equal
    seeds give equal numbers. Densities come back in y's units.

    Parameters
    ----------
    model : MixtureDensityModel
        The Pyro model (its network and standardization). For an ensemble, the first
        member's model: every member shares its architecture and standardization.
    guide : torch.nn.Module
        The posterior over the model's latent weights: an autoguide, a
        :class:`~bayes_mdn.guides.PointGuide` (no latent weights), an
        :class:`~bayes_mdn.guides.EmpiricalGuide` (NUTS draws) or an
        :class:`~bayes_mdn.guides.EnsembleGuide` (pooled members).
    num_draws : int
        Posterior draws S behind each prediction, unless a call passes its own. A
        deterministic guide (MAP, or no latent weights) uses one: every draw would be the
        same; an ensemble spreads them over its members.
    max_elements : int
        Bound on the elements of the largest tensor built at once: x is taken in chunks
        so that neither the network's output for all draws nor the draws of y exceed it.

    Examples
    --------
    >>> from bayes_mdn import BayesianMDN, make_inverse_sine
    >>> X, y = make_inverse_sine(200, seed=0)
    >>> mdn = BayesianMDN(n_components=3, hidden=(8,), epochs=2, progress=False).fit(X, y)
    >>> post = mdn.posterior_
    >>> x = torch.as_tensor(X[:4], dtype=torch.float32)
    >>> post.mixture(x).batch_shape, post.quantiles(x, torch.tensor([0.1, 0.9])).shape
    (torch.Size([4]), torch.Size([4, 2, 1]))
    """

    def __init__(
        self,
        model: MixtureDensityModel,
        guide: nn.Module,
        num_draws: int = 100,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
    ) -> None:
        if not isinstance(model, MixtureDensityModel):
            raise TypeError(f"model must be a MixtureDensityModel, got {type(model).__name__}")
        if not isinstance(guide, nn.Module):
            raise TypeError(f"guide must be a torch.nn.Module, got {type(guide).__name__}")
        self.model = model
        self.guide = guide
        self.num_draws = check_count("num_draws", num_draws)
        self.max_elements = check_count("max_elements", max_elements)

    def __repr__(self) -> str:
        net = self.model.net
        return (
            f"Posterior({type(self.guide).__name__}, d_x={net.d_x}, d_y={net.d_y}, "
            f"K={net.n_components}, num_draws={self.num_draws})"
        )

    # -- draws of the weights ---------------------------------------------------------
    @property
    def d_y(self) -> int:
        """Dimension of y."""
        return self.model.net.d_y

    def effective_draws(self, num_draws: int | None = None) -> int:
        """The draws a prediction asked for ``num_draws`` (default: the posterior's) makes."""
        draws = self.num_draws if num_draws is None else check_count("num_draws", num_draws)
        if isinstance(self.guide, EnsembleGuide):
            return self.guide.effective_draws(draws)
        return 1 if is_deterministic(self.guide) else draws

    def weights(self, num_draws: int | None = None, seed: int | None = 0) -> dict[str, Tensor]:
        """Joint posterior draws of the latent weights: {site: Tensor (S, *shape)}."""
        draws = self.effective_draws(num_draws)
        seed = check_seed(seed)
        with pyro_scope(), seeded(seed, self.model.prior_scale.device), torch.no_grad():
            return draw_latents(self.guide, draws)

    def _map_chunks(
        self,
        x: Tensor,
        weights: dict[str, Tensor],
        fn: Callable[[MixtureParams, slice], Tensor],
        cost: int = 1,
        standardized: bool = False,
    ) -> Tensor:
        """``fn`` of the per-draw mixtures at each chunk of x, concatenated along the
        points; in y's units, or in the model's standardized units with ``standardized``."""
        model = self.model
        net = model.net
        draws = next(iter(weights.values())).shape[0] if weights else 1
        per_point = (
            draws * net.n_components * net.d_y * (net.d_y if net.covariance == "full" else 1)
        )
        outs = []
        with torch.no_grad():
            for sl in _chunks(len(x), per_point, self.max_elements // cost):
                if standardized:
                    params = net.split(model.raw(x[sl], weights))
                else:
                    params = model.mixture(x[sl], weights)
                if params.logits.dim() == 2:
                    params = params.map(lambda t: t.unsqueeze(0))
                outs.append(fn(params, sl))
        return torch.cat(outs, dim=0)

    def _pooled(
        self,
        x: Tensor,
        num_draws: int | None,
        seed: int | None,
        fn: Callable[[GaussianMixture], Tensor],
        cost: int = 1,
    ) -> Tensor:
        """``fn`` of the pooled predictive mixture, in standardized units of y."""
        weights = self.weights(num_draws, seed)
        return self._map_chunks(
            x, weights, lambda p, _: fn(p.distribution().pool()), cost, standardized=True
        )

    def _y_units(self) -> tuple[Tensor, Tensor]:
        """The location and scale of y (the model's standardization), in float64."""
        loc, scale = cast(Tensor, self.model.y_loc), cast(Tensor, self.model.y_scale)
        return loc.to(torch.float64), scale.to(torch.float64)

    def _location(self, z: Tensor, what: str) -> Tensor:
        """A location in standardized units of y (last axis y's d) -> y's units, float64."""
        loc, scale = self._y_units()
        out = loc + scale * z.to(torch.float64)
        _check_overflow(z, out, what, scale)
        return out

    def _spread(self, z: Tensor, power: int, what: str) -> Tensor:
        """A moment in standardized units of y -> y's units, in float64: ``z`` (last axis
        y's d) times y_scale ** ``power``, 1 for a standard deviation, 2 for a variance."""
        _, scale = self._y_units()
        out = z.to(torch.float64) * scale**power
        _check_overflow(z, out, what, scale)
        return out

    # -- the predictive as a distribution -----------------------------------------------
    def params(
        self, x: Tensor, num_draws: int | None = None, seed: int | None = 0
    ) -> MixtureParams:
        """Mixture parameters per posterior draw, in y's units: logits (S, n, K),
        loc (S, n, K, d), scale (S, n, K, d) or scale_tril (S, n, K, d, d)."""
        weights = self.weights(num_draws, seed)
        with torch.no_grad():
            params = self.model.mixture(x, weights)
        if params.logits.dim() == 2:
            params = params.map(lambda t: t.unsqueeze(0))
        return params

    def mixture(
        self, x: Tensor, num_draws: int | None = None, seed: int | None = 0
    ) -> GaussianMixture:
        """The posterior predictive at each x as one Gaussian mixture of S*K components,
        in y's units: batch shape (n,), event shape (d,)."""
        return self.params(x, num_draws, seed).distribution().pool()

    def log_prob(
        self, x: Tensor, y: Tensor, num_draws: int | None = None, seed: int | None = 0
    ) -> Tensor:
        """log p(y | x, D) = log (1/S) sum_s p(y | x, theta_s), shape (n,), in y's units."""
        weights = self.weights(num_draws, seed)
        return self.model.log_predictive_density(x, y, weights, self.max_elements)

    def sample(
        self,
        x: Tensor,
        num_samples: int = 100,
        seed: int | None = 0,
        sampler: str = "predictive",
    ) -> Tensor:
        """Posterior-predictive draws of y: (S, n, d).

        Each draw takes its own posterior draw of the weights, then y from the mixture
        those weights give, so the draws carry both kinds of uncertainty.

        Parameters
        ----------
        x : Tensor of shape (n, d_x)
        num_samples : int
            Draws S (each with its own draw of the weights).
        seed : int or None
        sampler : {"predictive", "direct"}
            ``"predictive"`` runs the Pyro model under ``pyro.infer.Predictive``
            (vectorized over draws, ``y=None`` so that y is sampled, not copied).
            ``"direct"`` calls the model's sampler (:meth:`MixtureDensityModel.sample`,
            the one the observed site's distribution uses under Predictive) without
            Pyro's tracing: the same distribution, slightly faster, but not the same
            numbers for a seed (Predictive first runs the model twice to learn its
            shapes, which draws random numbers).
        """
        check_count("num_samples", num_samples)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        seed = check_seed(seed)
        if isinstance(self.guide, EnsembleGuide):
            return self._sample_ensemble(x, num_samples, seed, sampler)
        model, guide, max_elements = self.model, self.guide, self.max_elements
        with pyro_scope(), seeded(seed, model.prior_scale.device), torch.no_grad():
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
                    # The model is conditioned on the one set of weights, and the
                    # vectorizing plate expands the likelihood to independent draws of y.
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

            # The model's sampler bounds its own working memory. Chunks of x here bound
            # the draws held per call and Predictive's per-call overhead, and keep the
            # allocator reusing freed pages: one call over 10,000 x at 1,000 draws is a
            # third slower.
            d_y = self.d_y
            outs = [
                draw(x[sl]).reshape(num_samples, -1, d_y)
                for sl in _chunks(len(x), num_samples * d_y, max_elements)
            ]
            return torch.cat(outs, dim=1) if outs else x.new_zeros(num_samples, 0, d_y)

    def _sample_ensemble(
        self, x: Tensor, num_samples: int, seed: int | None, sampler: str
    ) -> Tensor:
        """Draws of an ensemble's predictive: each draw from a member picked as
        :meth:`EnsembleGuide.assignment` picks them, through that member's own sampler."""
        ensemble = cast(EnsembleGuide, self.guide)
        with seeded(seed, x.device):
            which = ensemble.assignment(num_samples).to(x.device)
            member_seeds = torch.randint(2**62, (len(ensemble),)).tolist()
        out = x.new_empty(num_samples, len(x), self.d_y)
        for m, (model, guide) in enumerate(ensemble.members):
            idx = (which == m).nonzero().flatten()
            if len(idx):
                member = Posterior(model, guide, self.num_draws, self.max_elements)
                out[idx] = member.sample(x, len(idx), member_seeds[m], sampler)
        return out

    # -- summaries in y's units ---------------------------------------------------------
    def mean(self, x: Tensor, num_draws: int | None = None, seed: int | None = 0) -> Tensor:
        """Mean of the posterior predictive, float64 Tensor of shape (n, d)."""
        z = self._pooled(x, num_draws, seed, lambda m: m.mean)
        return self._location(z, "mean")

    def std(self, x: Tensor, num_draws: int | None = None, seed: int | None = 0) -> Tensor:
        """Marginal standard deviations of the posterior predictive, float64 Tensor (n, d)."""
        z = self._pooled(x, num_draws, seed, lambda m: m.variance)
        # The square root in float64, as covariance's entries are scaled: the two agree
        # to float64 rounding.
        return self._spread(z.to(torch.float64).sqrt(), 1, "standard deviation")

    def covariance(self, x: Tensor, num_draws: int | None = None, seed: int | None = 0) -> Tensor:
        """Covariance matrix of the posterior predictive, float64 Tensor of shape (n, d, d).

        Exact for the pooled mixture of S*K components (law of total variance over
        components and draws), so it holds both the noise the model sees in the data and
        the spread between posterior draws.
        """
        z = self._pooled(x, num_draws, seed, lambda m: m.covariance_matrix, cost=self.d_y)
        _, scale = self._y_units()
        out = z.to(torch.float64) * (scale[:, None] * scale[None, :])
        _check_overflow(z, out, "covariance", scale)
        return out

    def cdf(
        self, x: Tensor, y: Tensor, num_draws: int | None = None, seed: int | None = 0
    ) -> Tensor:
        """Marginal CDF of the posterior predictive at the observed y: PIT values, (n, d).

        Column j is P(Y_j <= y_j | x, D) under the pooled mixture, computed exactly (a
        marginal of a Gaussian mixture is a Gaussian mixture). For a calibrated model
        each column is uniform on (0, 1) over the data.
        """
        if y.shape != (len(x), self.d_y):
            raise ValueError(
                f"y must have shape (n, d_y) = ({len(x)}, {self.d_y}), got {tuple(y.shape)}"
            )
        weights = self.weights(num_draws, seed)

        def cdf(params: MixtureParams, sl: slice) -> Tensor:
            return params.distribution().pool().cdf(y[sl])

        return self._map_chunks(x, weights, cdf)

    def quantiles(
        self, x: Tensor, q: Tensor, num_draws: int | None = None, seed: int | None = 0
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
            raise ValueError(
                f"quantile levels must lie strictly between 0 and 1, got {q.tolist()}"
            )

        def quant(m: GaussianMixture) -> Tensor:
            return m.quantiles(q).movedim(0, 1)

        # Solved in standardized units (where the mixture is well scaled), mapped back.
        z = self._pooled(x, num_draws, seed, quant, cost=len(q))
        return self._location(z, "quantiles")

    def interval(
        self, x: Tensor, level: float = 0.9, num_draws: int | None = None, seed: int | None = 0
    ) -> tuple[Tensor, Tensor]:
        """Central interval holding ``level`` of the predictive mass: (lower, upper),
        each (n, d)."""
        if not (isinstance(level, (int, float)) and 0 < level < 1):
            raise ValueError(f"level must lie strictly between 0 and 1, got {level!r}")
        q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=x.dtype, device=x.device)
        bounds = self.quantiles(x, q, num_draws, seed)
        return bounds[:, 0], bounds[:, 1]

    def modes(
        self, x: Tensor, num_draws: int | None = 16, seed: int | None = 0
    ) -> tuple[Tensor, Tensor]:
        """Modes of the posterior predictive density at each x, in y's units.

        Mode finding costs (S*K)^2 per point, hence 16 draws by default; None takes the
        posterior's ``num_draws``.

        Returns
        -------
        modes : Tensor of shape (n, C, d), highest density first, NaN padded
        log_density : Tensor of shape (n, C), NaN padded
        """
        weights = self.weights(num_draws, seed)
        draws = next(iter(weights.values())).shape[0] if weights else 1
        comps = draws * self.model.net.n_components
        out_modes, out_dens = [], []
        with torch.no_grad():
            for sl in _chunks(len(x), comps * comps * self.d_y, self.max_elements):
                params = self.model.mixture(x[sl], weights)
                if params.logits.dim() == 2:
                    params = params.map(lambda t: t.unsqueeze(0))
                m, d = params.distribution().pool().modes()
                out_modes.append(m)
                out_dens.append(d)
        return torch.cat(out_modes), torch.cat(out_dens)

    def uncertainty(
        self, x: Tensor, num_draws: int | None = None, seed: int | None = 0
    ) -> dict[str, Tensor]:
        """Split the predictive variance by the law of total variance over posterior draws.

        Var[y | x, D] = E_theta[Var(y | x, theta)] + Var_theta[E(y | x, theta)]: the first
        term is aleatoric (noise the model believes is in the data), the second epistemic
        (disagreement between plausible networks, which shrinks with more data).

        Returns
        -------
        dict with "total", "aleatoric" and "epistemic", each a float64 Tensor of shape (n, d).
        """
        weights = self.weights(num_draws, seed)

        def split(params: MixtureParams, _: slice) -> Tensor:
            mix = params.distribution()
            means, variances = mix.mean, mix.variance  # each (S, n, d)
            aleatoric = variances.mean(0)
            epistemic = means.var(0, unbiased=False)
            return torch.stack([aleatoric + epistemic, aleatoric, epistemic], dim=-1)

        z = self._map_chunks(x, weights, split, standardized=True)
        out = self._spread(z.movedim(-1, 0), 2, "variance")
        return {"total": out[0], "aleatoric": out[1], "epistemic": out[2]}
