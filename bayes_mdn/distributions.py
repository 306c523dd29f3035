"""The Gaussian mixture: the one home of the library's mixture math.

A network returns :class:`MixtureParams` (logits of the weights, means, and standard
deviations or Cholesky factors); :class:`GaussianMixture` is the distribution they
define. Every density, CDF, quantile, draw, moment and mode that the model, the
predictions, the scores, the diagnostics and the plots report is computed here, and the
posterior predictive of a Bayesian MDN (S posterior draws of a K-component mixture) is
one more :class:`GaussianMixture` of S x K components (:meth:`GaussianMixture.pool`).

Nothing here knows about networks or Pyro models: this is the lowest layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor

__all__ = ["Covariance", "GaussianMixture", "MixtureParams"]

Covariance = Literal["diagonal", "full"]
_LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class MixtureParams:
    """Parameters of a batch of K-component Gaussian mixtures over y in R^d.

    Attributes
    ----------
    logits : Tensor of shape (..., n, K)
        Unnormalized log mixture weights.
    loc : Tensor of shape (..., n, K, d)
        Component means.
    scale : Tensor of shape (..., n, K, d) or (..., n, K, d, d)
        Component standard deviations (diagonal covariance) or lower-triangular
        Cholesky factors with a positive diagonal (full covariance).
    """

    logits: Tensor
    loc: Tensor
    scale: Tensor

    @property
    def covariance(self) -> Covariance:
        """``"full"`` when ``scale`` holds Cholesky factors, else ``"diagonal"``."""
        return "full" if self.scale.dim() == self.loc.dim() + 1 else "diagonal"

    @property
    def n_components(self) -> int:
        return self.logits.shape[-1]

    @property
    def event_dim(self) -> int:
        """Dimension d of the target y."""
        return self.loc.shape[-1]

    def map(self, fn: Callable[[Tensor], Tensor]) -> MixtureParams:
        """Apply ``fn`` to every tensor (indexing, moving, detaching)."""
        return MixtureParams(fn(self.logits), fn(self.loc), fn(self.scale))

    def marginal_scale(self) -> Tensor:
        """Per-dimension component standard deviations, shape (..., n, K, d)."""
        if self.covariance == "diagonal":
            return self.scale
        return self.scale.pow(2).sum(-1).sqrt()

    def distribution(self, validate_args: bool = False) -> GaussianMixture:
        """The mixture these parameters define."""
        return GaussianMixture(self.logits, self.loc, self.scale, validate_args)


class GaussianMixture(TorchDistribution):
    """A K-component Gaussian mixture over y in R^d, batch shape (...), event shape (d,).

    Parameters
    ----------
    logits : Tensor of shape (..., K)
        Unnormalized log mixture weights.
    loc : Tensor of shape (..., K, d)
        Component means.
    scale : Tensor of shape (..., K, d) or (..., K, d, d)
        Component standard deviations (diagonal covariance), or lower-triangular
        Cholesky factors with a positive diagonal (full covariance).
    validate_args : bool
        Check the support of values given to :meth:`log_prob` (off by default: the
        library validates user input at its boundary).

    The batch shapes of the three tensors broadcast. They may be strided views (the
    network lays out a batch of draws as (draws, outputs, rows) and hands the mixture
    permuted views of it): every reduction here runs over the component axis wherever
    it lies in memory, and elementwise results keep the layout of ``loc``.

    Examples
    --------
    >>> mix = GaussianMixture(torch.zeros(3, 2), torch.tensor([[[-1.0], [1.0]]] * 3),
    ...                       torch.ones(3, 2, 1))
    >>> mix.batch_shape, mix.event_shape
    (torch.Size([3]), torch.Size([1]))
    >>> mix.cdf(torch.zeros(3, 1)).flatten().tolist()
    [0.5, 0.5, 0.5]
    >>> round(float(mix.variance[0, 0]), 4)
    2.0
    """

    arg_constraints: ClassVar[dict] = {}
    support = constraints.independent(constraints.real, 1)
    has_rsample = False

    def __init__(
        self, logits: Tensor, loc: Tensor, scale: Tensor, validate_args: bool = False
    ) -> None:
        if logits.dim() < 1 or loc.dim() < 2:
            raise ValueError(
                f"logits must have shape (..., K) and loc (..., K, d), got "
                f"{tuple(logits.shape)} and {tuple(loc.shape)}"
            )
        full = scale.dim() == loc.dim() + 1
        k, d = logits.shape[-1], loc.shape[-1]
        comp_shape = (k, d, d) if full else (k, d)
        if (
            loc.shape[-2] != k
            or (scale.dim() != loc.dim() and not full)
            or (tuple(scale.shape[-len(comp_shape) :]) != comp_shape)
        ):
            raise ValueError(
                f"a mixture of {k} components over R^{d} needs loc (..., {k}, {d}) and scale "
                f"(..., {k}, {d}) or (..., {k}, {d}, {d}), got loc {tuple(loc.shape)} and "
                f"scale {tuple(scale.shape)}"
            )
        shapes = (logits.shape[:-1], loc.shape[:-2], scale.shape[: -len(comp_shape)])
        # torch.broadcast_shapes costs about 25 us, a few percent of a training step.
        same = shapes[0] == shapes[1] == shapes[2]
        batch = shapes[0] if same else torch.broadcast_shapes(*shapes)
        self.logits, self.loc, self.scale = logits, loc, scale
        super().__init__(batch, torch.Size([d]), validate_args=validate_args)

    # -- structure ---------------------------------------------------------------------

    @property
    def covariance_type(self) -> Covariance:
        """``"full"`` when ``scale`` holds Cholesky factors, else ``"diagonal"``."""
        return "full" if self.scale.dim() == self.loc.dim() + 1 else "diagonal"

    @property
    def n_components(self) -> int:
        return self.logits.shape[-1]

    @property
    def params(self) -> MixtureParams:
        """The parameters as a :class:`MixtureParams`."""
        return MixtureParams(self.logits, self.loc, self.scale)

    def marginal_scale(self) -> Tensor:
        """Per-dimension component standard deviations, shape (..., K, d)."""
        return self.params.marginal_scale()

    def log_weights(self) -> Tensor:
        """Normalized log mixture weights, shape (..., K)."""
        return torch.log_softmax(self.logits, -1)

    def expand(self, batch_shape, _instance=None) -> GaussianMixture:
        batch = torch.Size(batch_shape)
        k, d = self.n_components, self.event_shape[0]
        comp = (k, d, d) if self.covariance_type == "full" else (k, d)
        return GaussianMixture(
            self.logits.expand(*batch, k),
            self.loc.expand(*batch, k, d),
            self.scale.expand(*batch, *comp),
            self._validate_args,
        )

    # -- densities ---------------------------------------------------------------------

    def component_log_prob(self, value: Tensor) -> Tensor:
        """log N(value; loc_k, Sigma_k) of every component, shape (..., K).

        ``value`` has shape (..., d), broadcastable against the batch shape.
        """
        return self._log_kernel(value) - 0.5 * self.event_shape[0] * _LOG_2PI

    def log_prob(self, value: Tensor) -> Tensor:
        """log p(value), shape broadcast(value.shape[:-1], batch_shape).

        Diagonal components take an elementwise fast path; full ones one triangular
        solve per component.
        """
        if self._validate_args:
            self._validate_sample(value)
        log_comp = self._log_kernel(value)
        if not torch.is_grad_enabled() and log_comp.shape[:-1] == self.logits.shape[:-1]:
            log_comp = log_comp.add_(self.logits)
        else:
            log_comp = log_comp + self.logits
        log_p = _logsumexp(log_comp) - _logsumexp(self.logits)
        # The Gaussian constant once per value, not once per component.
        return log_p - 0.5 * self.event_shape[0] * _LOG_2PI

    def _log_kernel(self, value: Tensor) -> Tensor:
        """Each component's log density without the constant -d/2 log(2 pi): (..., K)."""
        # loc first, so that the result takes loc's memory layout (see the class notes).
        diff = self.loc - value.unsqueeze(-2)
        if self.covariance_type == "full":
            sol = torch.linalg.solve_triangular(self.scale, diff.unsqueeze(-1), upper=False)
            log_det = self.scale.diagonal(dim1=-2, dim2=-1).log().sum(-1)
            return -0.5 * sol.squeeze(-1).square().sum(-1) - log_det
        t = diff / self.scale
        if torch.is_grad_enabled() and t.requires_grad:
            return _sum_last(-0.5 * t.square() - self.scale.log())
        # In place when no gradient is recorded: less memory traffic on the
        # (draws, rows, K, d) tensors of posterior-predictive evaluations.
        return _sum_last(t.square_().mul_(-0.5).sub_(self.scale.log()))

    def cdf(self, value: Tensor) -> Tensor:
        """Exact marginal CDF sum_k pi_k Phi((y_j - mu_kj) / sigma_kj) of each coordinate.

        ``value`` has shape (..., d) broadcastable against the batch shape; returns
        (..., d). For d = 1 this is the CDF.
        """
        w = torch.softmax(self.logits, -1).unsqueeze(-1)
        z = (value.unsqueeze(-2) - self.loc) / self.marginal_scale()
        return (w * torch.special.ndtr(z)).sum(-2)

    def quantiles(self, q: Tensor, iterations: int = 100) -> Tensor:
        """Quantiles of each marginal from the exact CDF, by safeguarded Newton iteration.

        Each step takes the Newton step (F(x) - q) / f(x) when it stays inside the current
        bracket and bisects otherwise, so it converges like bisection in the worst case and
        quadratically near the root: about 8 CDF evaluations instead of 60 halvings.

        Parameters
        ----------
        q : Tensor of shape (m,), probabilities strictly inside (0, 1)
        iterations : the most steps taken; stops earlier once every Newton step (or the
            bracket) is within a few ulps of x. The stopping rule is on x, not on F(x) - q:
            between separated modes F is nearly flat, and a small F error is a large x
            error.

        Returns
        -------
        Tensor of shape (m, *batch_shape, d)
        """
        w = torch.softmax(self.logits, -1).unsqueeze(-1)
        loc, sd = self.loc, self.marginal_scale()
        # Every quantile in (1e-12, 1 - 1e-12) lies within 8 sds of some component.
        lo = (loc - 8 * sd).amin(-2).expand(len(q), *loc.shape[:-2], loc.shape[-1]).clone()
        hi = (loc + 8 * sd).amax(-2).expand_as(lo).clone()
        target = q.to(loc).reshape(-1, *([1] * (lo.dim() - 1)))
        eps = torch.finfo(loc.dtype).eps
        unit = sd.amin(-2)  # (..., d): the finest length scale of each marginal
        x = (lo + hi) / 2
        for _ in range(iterations):
            z = (x.unsqueeze(-2) - loc) / sd
            cdf = (w * torch.special.ndtr(z)).sum(-2)
            pdf = (w * torch.exp(-0.5 * z * z) / (sd * math.sqrt(2 * math.pi))).sum(-2)
            err = cdf - target
            below = err < 0
            lo = torch.where(below, x, lo)
            hi = torch.where(below, hi, x)
            newton = x - err / pdf
            inside = (newton > lo) & (newton < hi) & (pdf > 0)
            tol = 8 * eps * (x.abs() + unit)
            done = (hi - lo <= tol) | (inside & ((newton - x).abs() <= tol))
            x = torch.where(inside, newton, (lo + hi) / 2)
            if bool(done.all()):
                break
        return x

    # -- sampling ----------------------------------------------------------------------

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:  # noqa: B008
        """Draws of shape (*sample_shape, *batch_shape, d), component first.

        A component is drawn by inverting the CDF of the mixture weights and only its
        Gaussian is sampled: a draw costs one component whatever K is (sampling every
        component and keeping one, as ``MixtureSameFamily`` does, costs K).
        """
        with torch.no_grad():
            shape = self._extended_shape(sample_shape)[:-1]
            k, d = self.n_components, self.event_shape[0]
            if k == 1:
                eps = torch.randn((*shape, d), dtype=self.loc.dtype, device=self.loc.device)
                loc = self.loc[..., 0, :]
                if self.covariance_type == "full":
                    return loc + (self.scale[..., 0, :, :] @ eps.unsqueeze(-1)).squeeze(-1)
                return loc + self.scale[..., 0, :] * eps
            component = self.draw_components(self.logits, shape)
            index = component[..., None, None].expand(*shape, 1, d)
            loc = self.loc.expand(*shape, k, d).gather(-2, index).squeeze(-2)
            eps = torch.randn(loc.shape, dtype=loc.dtype, device=loc.device)
            if self.covariance_type == "full":
                rows = component[..., None, None, None].expand(*shape, 1, d, d)
                tril = self.scale.expand(*shape, k, d, d).gather(-3, rows).squeeze(-3)
                return loc + (tril @ eps.unsqueeze(-1)).squeeze(-1)
            return loc + self.scale.expand(*shape, k, d).gather(-2, index).squeeze(-2) * eps

    @staticmethod
    def draw_components(logits: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
        """Component indices drawn with probabilities softmax(``logits``), by inverse CDF.

        ``logits`` has shape (..., K) whose batch part broadcasts to ``shape``; returns a
        long Tensor of ``shape``. One uniform per draw (none when K = 1): faster than
        ``torch.multinomial`` at millions of rows, and the same distribution.
        """
        k = logits.shape[-1]
        component = torch.zeros(shape, dtype=torch.long, device=logits.device)
        if k == 1:
            return component
        with torch.no_grad():
            # Unnormalized weights, u scaled by their total. The running sums are
            # elementwise adds, which keep the memory layout of the logits (a cumsum
            # would not: see _sum_last).
            w = (logits - logits.amax(-1, keepdim=True)).exp()
            u = torch.rand(shape, dtype=w.dtype, device=w.device) * w.sum(-1)
            # The chosen component is the number of cumulative weights below u, counted
            # one component at a time: small comparisons, and never K itself.
            cdf = w[..., 0]
            for j in range(k - 1):
                component += cdf < u
                cdf = cdf + w[..., j + 1]
        return component

    # -- moments and modes -------------------------------------------------------------

    @property
    def mean(self) -> Tensor:
        """Mixture mean, shape (*batch_shape, d)."""
        w = torch.softmax(self.logits, -1).unsqueeze(-1)
        return (w * self.loc).sum(-2)

    @property
    def covariance_matrix(self) -> Tensor:
        """Mixture covariance by the law of total variance, shape (*batch_shape, d, d)."""
        w = torch.softmax(self.logits, -1)[..., None, None]
        if self.covariance_type == "full":
            comp_cov = self.scale @ self.scale.mT
        else:
            comp_cov = torch.diag_embed(self.scale.pow(2))
        dev = self.loc - self.mean.unsqueeze(-2)
        return (w * (comp_cov + dev.unsqueeze(-1) * dev.unsqueeze(-2))).sum(-3)

    @property
    def variance(self) -> Tensor:
        """Marginal variances, shape (*batch_shape, d): the covariance's diagonal."""
        return self.covariance_matrix.diagonal(dim1=-2, dim2=-1)

    def modes(self, iterations: int = 200, tol: float = 1e-2) -> tuple[Tensor, Tensor]:
        """Local maxima of each mixture density, found by the fixed-point (mean-shift)
        iteration of Carreira-Perpinan (2000) started from every component mean.

        Needs one batch dimension: batch shape (n,).

        Parameters
        ----------
        iterations : fixed-point steps
        tol : two end points closer than ``tol`` (in units of the smallest component sd)
            are the same mode.

        Returns
        -------
        modes : Tensor of shape (n, K, d), distinct modes first, sorted by density,
            padded with NaN
        log_density : Tensor of shape (n, K), the log density at each mode, NaN padded
        """
        if len(self.batch_shape) != 1:
            raise ValueError(
                f"modes needs a batch of shape (n,), got {tuple(self.batch_shape)}; "
                "pool posterior draws first"
            )
        k, d = self.n_components, self.event_shape[0]
        dtype = self.loc.dtype
        # Full covariances fitted to nearly collinear targets reach condition numbers near
        # 1e11; a float32 solve then scatters the end points of one mode too far apart to
        # be merged, so the iteration runs in float64 whatever the mixture's dtype.
        p = self.params.map(lambda t: t.to(torch.float64))
        mix = p.distribution()
        if mix.covariance_type == "full":
            prec = torch.cholesky_inverse(p.scale)
        else:
            prec = torch.diag_embed(p.scale.pow(-2))
        prec_mu = (prec @ p.loc.unsqueeze(-1)).squeeze(-1)  # (n, K, d)
        # Components with a singleton axis for the start points: log N(x_start; comp_k).
        starts = p.map(lambda t: t.unsqueeze(1)).distribution()
        log_w = mix.log_weights().unsqueeze(1)  # (n, 1, K)
        x = p.loc.clone()  # (n, starts = K, d)
        for _ in range(iterations):
            r = torch.softmax(starts.component_log_prob(x) + log_w, -1)  # (n, starts, K)
            a = torch.einsum("nsk,nkij->nsij", r, prec)
            b = torch.einsum("nsk,nki->nsi", r, prec_mu)
            x = torch.linalg.solve(a, b.unsqueeze(-1)).squeeze(-1)
        dens = mix.log_prob(x.transpose(0, 1)).transpose(0, 1)
        order = dens.argsort(-1, descending=True)
        x = x.gather(1, order.unsqueeze(-1).expand(-1, -1, d))
        dens = dens.gather(1, order)
        # An end point is a duplicate when an end point of higher density lies within tol
        # smallest-sds of it: converged starts of one mode agree to far better than that.
        threshold = tol * p.marginal_scale().amin((-1, -2))  # (n,)
        close = torch.cdist(x, x) < threshold[:, None, None]
        earlier = torch.ones(k, k, dtype=torch.bool, device=x.device).tril(-1)
        duplicate = (close & earlier).any(-1)  # (n, starts)
        keep_order = duplicate.to(torch.int8).argsort(dim=-1, stable=True)
        x = x.gather(1, keep_order.unsqueeze(-1).expand(-1, -1, d))
        dens = dens.gather(1, keep_order)
        duplicate = duplicate.gather(1, keep_order)
        x = x.masked_fill(duplicate.unsqueeze(-1), float("nan"))
        dens = dens.masked_fill(duplicate, float("nan"))
        return x.to(dtype), dens.to(dtype)

    # -- transformations ---------------------------------------------------------------

    def affine(self, loc: Tensor, scale: Tensor) -> GaussianMixture:
        """The mixture of ``loc + scale * y`` where y follows this one.

        ``loc`` and ``scale`` have shape (d,), ``scale`` positive: this is how a mixture
        in standardized units is mapped to the user's units (a Gaussian stays Gaussian,
        so it is exact, and the density picks up the Jacobian).
        """
        if self.covariance_type == "full":
            new_scale = scale.unsqueeze(-1) * self.scale
        else:
            new_scale = scale * self.scale
        return GaussianMixture(self.logits, loc + scale * self.loc, new_scale, self._validate_args)

    def pool(self) -> GaussianMixture:
        """Pool the S mixtures along the first batch dimension into one of S*K components.

        With batch shape (S, *rest) (S posterior draws), the result has batch shape
        (*rest): the equal-weight mixture (1/S) sum_s p_s(y), which is the posterior
        predictive of a Bayesian MDN.
        """
        if len(self.batch_shape) < 1:
            raise ValueError("pool needs a leading batch dimension of draws to pool over")
        s, rest = self.batch_shape[0], self.batch_shape[1:]
        k, d = self.n_components, self.event_shape[0]
        comp = (d, d) if self.covariance_type == "full" else (d,)
        logits = torch.log_softmax(self.logits, -1) - math.log(s)

        def merge(t: Tensor, event: tuple[int, ...]) -> Tensor:
            t = t.expand(s, *rest, k, *event)
            return t.movedim(0, -2 - len(event)).reshape(*rest, s * k, *event)

        return GaussianMixture(
            merge(logits, ()), merge(self.loc, (d,)), merge(self.scale, comp), self._validate_args
        )


def _sum_last(t: Tensor) -> Tensor:
    """``t.sum(-1)`` that keeps the memory layout of the other axes.

    A reduction returns a contiguous tensor; on the network's (draws, rows, K, d) views
    that puts K innermost, and the log-sum-exp over K that follows then runs about three
    times slower than along contiguous rows. Elementwise adds keep the layout, and for
    d = 1 there is nothing to add.
    """
    out = t[..., 0]
    for j in range(1, t.shape[-1]):
        out = out + t[..., j]
    return out


def _logsumexp(t: Tensor) -> Tensor:
    """``torch.logsumexp(t, -1)`` with every term below ``exp(-80)`` of the largest (at
    float32; ``exp(-700)`` at float64) counted as that floor.

    ``exp`` of an argument whose result is subnormal or zero takes a slow path on CPUs,
    10 to 30 times slower per element, and a mixture's components far from y put most
    of a training step's log-sum-exp arguments there (with ``torch.logsumexp`` about a
    sixth of a default stacked step went to those two exps, forward and backward).
    Flooring changes the sum by at most K times the floor against a largest term of 1,
    far below float precision, and gives the floored terms no gradient (theirs is
    below the floor too). Rows whose every term is -inf stay -inf; NaN propagates.
    """
    m = t.detach().amax(-1, keepdim=True)
    shift = m.nan_to_num(0.0, 0.0, 0.0)
    floor = -700.0 if t.dtype == torch.float64 else -80.0
    out = (t - shift).clamp_min(floor).exp().sum(-1).log() + shift.squeeze(-1)
    m = m.squeeze(-1)
    return torch.where(m == -math.inf, m, out)
