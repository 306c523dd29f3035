"""The fused losses: the ``Trace_ELBO`` objective of the built-in structures, computed
directly.

For the built-in :class:`~bayes_mdn.model.MixtureDensityModel` with an ``AutoDelta`` or
:class:`~bayes_mdn.guides.PointGuide` guide (:class:`MapLoss`) or an ``AutoNormal`` guide
(:class:`MeanFieldLoss`), the negative ELBO is computed from the network and the mixture
density without tracing model and guide: the same values, gradients and random draws as
``Trace_ELBO``, at a fraction of its per-step cost. :func:`fused_loss_applies` says when
that holds; :func:`make_loss` picks the loss module a training loop minimizes (a fused
loss, else ``Trace_ELBO`` itself).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence

import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal
from torch import Tensor, nn
from torch.distributions import transform_to
from torch.distributions.constraints import Constraint
from torch.distributions.transforms import ComposeTransform, IndependentTransform

from ._utils import pyro_scope, seeded
from .config import FitConfig
from .guides import PointGuide, is_deterministic
from .model import OBS_SITE, MixtureDensityModel

__all__ = ["MapLoss", "MeanFieldLoss", "fused_loss_applies", "make_loss"]

# The guides whose ELBO MapLoss and MeanFieldLoss compute directly (exact types: a
# subclass may add sites); the stacked loop trains these kinds only.
_FUSED_GUIDES = (AutoDelta, AutoNormal, PointGuide)


def _scaled_log_likelihood(
    model: MixtureDensityModel,
    x: Tensor,
    y: Tensor,
    weights: dict[str, Tensor],
    n_total: int | None,
) -> Tensor:
    """The data term of the ELBO: (n_total / n) * sum_i log p(y_i | x_i, w), in y's units.

    Weights may carry one leading particle dimension P, giving shape (P,); else a scalar.
    """
    log_lik = model.log_density(x, y, weights)
    size = len(x) if n_total is None else n_total
    if size != len(x):
        # As Pyro's subsampled plate does: scale each term, then sum.
        log_lik = log_lik * (size / len(x))
    return log_lik.sum(-1)


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class _ConstrainedParams:
    """Reads the constrained values of PyroParams, as ``attrgetter(name)(module)`` does,
    without going through ``PyroModule.__getattr__`` on every step.

    That lookup resolves the constraint and issues a (module-local) ``pyro.param``
    effect per parameter, about a tenth of a small step at two sites (measured:
    docs/notes.md). Here each value is read once by that public lookup, which hands back with it
    its unconstrained ``nn.Parameter`` as ``value.unconstrained()`` (the weak reference
    Pyro attaches to every constrained value, which its own optimizers follow); the
    transform comes from ``constraint_of[name]``, the constraint the caller knows the guide
    gives the site, and is checked once against the value read. ``load_state_dict``
    copies into those same parameters, so they stay current.

    Parameters
    ----------
    module : the PyroModule holding the parameters (a guide, or its ``locs`` or ``scales``)
    names : dotted names of the parameters in ``module`` (the latent sites' names)
    constraint_of : the constraint of each name
    """

    def __init__(
        self,
        module: nn.Module,
        names: Sequence[str],
        constraint_of: Mapping[str, Constraint],
    ) -> None:
        self.entries = []
        with pyro_scope(), torch.no_grad():
            for name in names:
                value = operator.attrgetter(name)(module)
                ref = getattr(value, "unconstrained", None)
                param = ref() if callable(ref) else None
                if not isinstance(param, nn.Parameter):
                    raise RuntimeError(
                        f"{type(module).__name__}.{name} came without its unconstrained "
                        "parameter (value.unconstrained(), which Pyro 1.9 attaches to the "
                        "constrained values of a PyroModule); this Pyro version is not "
                        "supported by the fused losses"
                    )
                transform = transform_to(constraint_of[name])
                if not torch.equal(transform(param), value):
                    raise RuntimeError(
                        f"{type(module).__name__}.{name} is not its unconstrained parameter "
                        f"mapped by transform_to({constraint_of[name]}): the guide constrains "
                        "it otherwise than the fused losses assume"
                    )
                # The identity on real sites (every weight): skip the call altogether.
                if isinstance(transform, IndependentTransform):
                    transform = transform.base_transform
                identity = isinstance(transform, ComposeTransform) and not transform.parts
                self.entries.append((name, param, None if identity else transform))

    def __call__(self) -> dict[str, Tensor]:
        return {
            name: value if transform is None else transform(value)
            for name, value, transform in self.entries
        }


class MapLoss(nn.Module):
    """The negative ELBO of a deterministic guide, computed directly.

    With a point-mass guide (``AutoDelta``) or no latent weights at all (``PointGuide``),
    ``Trace_ELBO`` reduces to the negative log joint: -(n_total / n) * sum log p(y | x, w)
    - sum log p(w), since a Delta guide contributes log q = 0. This module computes that
    same value from the same network and distributions, but without tracing the model
    and guide and without the host syncs ``Trace_ELBO`` makes per site, which is most of
    Pyro's per-step overhead at small batch sizes. Its ``state_dict`` has the keys of
    ``Trace_ELBO()(model, guide)`` (``model.*``, ``guide.*``).

    Call it as the ELBO module: ``loss(x, y, subsample=idx, n_total=n)``, with x of shape
    (n, d_x) and y of shape (n, d_y); it returns a scalar Tensor.
    """

    def __init__(self, model: MixtureDensityModel, guide: nn.Module) -> None:
        super().__init__()
        if not is_deterministic(guide):
            raise TypeError(
                f"MapLoss needs a deterministic guide (AutoDelta or PointGuide), "
                f"got {type(guide).__name__}"
            )
        self.model = model
        self.guide = guide
        self._params: _ConstrainedParams | None = None

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        *,
        subsample: Tensor | None = None,
        n_total: int | None = None,
    ) -> Tensor:
        weights = self._weights(x, y, subsample, n_total)
        log_lik = _scaled_log_likelihood(self.model, x, y, weights, n_total)
        return -(log_lik + self.model.log_prior(weights))

    def _weights(
        self, x: Tensor, y: Tensor, subsample: Tensor | None, n_total: int | None
    ) -> dict[str, Tensor]:
        if isinstance(self.guide, PointGuide):
            return {}
        if self._params is None:
            guide = self.guide
            if guide.prototype_trace is None:
                # AutoDelta creates its parameters when it first runs the model. Inside
                # pyro_scope: run by a caller outside it, the guide would take (and share
                # with other guides) same-named parameters of Pyro's global param store.
                with pyro_scope():
                    guide(x, y, subsample=subsample, n_total=n_total)
            # AutoDelta's values have the support of each site's distribution.
            sites = guide.prototype_trace.nodes
            supports = {name: sites[name]["fn"].support for name in self.model.latent_names}
            self._params = _ConstrainedParams(guide, self.model.latent_names, supports)
        return self._params()


class MeanFieldLoss(nn.Module):
    """The negative ELBO of a mean-field Gaussian guide (``AutoNormal``), computed directly.

    The same estimator as ``Trace_ELBO`` with every site reparameterized: per particle,
    draw w = loc + scale * eps for each latent site from the guide's own parameters
    (``guide.locs.<site>``, ``guide.scales.<site>``), then take
    -(n_total / n) * sum log p(y | x, w) - log p(w) + log q(w), averaged over
    ``num_particles`` particles evaluated in one vectorized pass. The standard normals
    are drawn in the order and shapes ``Trace_ELBO`` draws them (site by site, all
    particles of a site at once), so a seeded fit follows the ``Trace_ELBO`` fit. It
    skips the tracing of model and guide, the distribution objects and the per-site host
    syncs. Its ``state_dict`` has the keys of ``Trace_ELBO()(model, guide)``.

    Call it as the ELBO module: ``loss(x, y, subsample=idx, n_total=n)``, with x of shape
    (n, d_x) and y of shape (n, d_y); it returns a scalar Tensor.
    """

    def __init__(
        self, model: MixtureDensityModel, guide: nn.Module, num_particles: int = 1
    ) -> None:
        super().__init__()
        if not isinstance(guide, AutoNormal):
            raise TypeError(f"MeanFieldLoss needs an AutoNormal guide, got {type(guide).__name__}")
        if (
            not isinstance(num_particles, int)
            or isinstance(num_particles, bool)
            or num_particles < 1
        ):
            raise ValueError(f"num_particles must be an integer >= 1, got {num_particles!r}")
        self.model = model
        self.guide = guide
        self.num_particles = num_particles
        self._locs: _ConstrainedParams | None = None
        self._scales: _ConstrainedParams | None = None

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        *,
        subsample: Tensor | None = None,
        n_total: int | None = None,
    ) -> Tensor:
        guide = self.guide
        if self._locs is None or self._scales is None:
            if guide.prototype_trace is None:
                # The guide creates its parameters on its first call, then draws from
                # them: discard that draw (forked random state, sites hidden), so that the
                # first step consumes the random stream exactly as Trace_ELBO's first step
                # does. Creating them draws nothing: every site starts at init_to_value.
                # Module-local parameters, as for MapLoss.
                devices = [x.device] if x.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices), poutine.block(), pyro_scope():
                    guide(x, y, subsample=subsample, n_total=n_total)
            names = self.model.latent_names
            # AutoNormal keeps its locations in unconstrained space and its scales under
            # its scale_constraint.
            self._locs = _ConstrainedParams(
                guide.locs, names, dict.fromkeys(names, constraints.real)
            )
            self._scales = _ConstrainedParams(
                guide.scales, names, dict.fromkeys(names, guide.scale_constraint)
            )
        particles = self.num_particles
        weights = {}
        log_q = x.new_zeros(())
        scales = self._scales()
        for name, loc in self._locs().items():
            scale = scales[name]
            shape = loc.shape if particles == 1 else (particles, *loc.shape)
            eps = torch.empty(shape, dtype=loc.dtype, device=loc.device).normal_()
            value = loc + eps * scale
            # log q(w) with (w - loc) / scale = eps: the value of Normal(loc, scale)
            # .log_prob(w) and, as a function of loc and scale, the same gradient (equal
            # to rounding), in two cheap terms; eps carries no gradient.
            square = eps.flatten(eps.dim() - loc.dim()).pow(2).sum(-1)
            log_q = log_q - 0.5 * square - (scale.log().sum() + loc.numel() * _HALF_LOG_2PI)
            weights[name] = value
        log_lik = _scaled_log_likelihood(self.model, x, y, weights, n_total)
        elbo = log_lik + self.model.log_prior(weights) - log_q
        return -elbo.mean() if particles > 1 else -elbo


def fused_loss_applies(model: nn.Module, guide: nn.Module) -> bool:
    """True when :class:`MapLoss` or :class:`MeanFieldLoss` computes exactly the
    ``Trace_ELBO`` objective of this model and guide.

    The fused losses know the built-in model's sites and densities and nothing else, so
    the check is structural: the model is exactly :class:`MixtureDensityModel` (a
    subclass may add sample sites or factors, or change a density), the guide exactly
    ``AutoDelta``, ``AutoNormal`` or :class:`~bayes_mdn.guides.PointGuide`, and a trace of
    the model on one row holds exactly its latent sites, the data plate and the observed
    site, in order.
    Anything else trains through ``Trace_ELBO``.

    Examples
    --------
    >>> from bayes_mdn.guides import make_guide
    >>> from bayes_mdn.nets import MixtureDensityNetwork
    >>> net = MixtureDensityNetwork(d_x=1, d_y=1, n_components=2, hidden=(4,))
    >>> one = torch.ones(1)
    >>> model = MixtureDensityModel(net, x_loc=0 * one, x_scale=one, y_loc=0 * one, y_scale=one)
    >>> fused_loss_applies(model, make_guide(model, "normal"))
    True
    >>> fused_loss_applies(model, make_guide(model, "lowrank"))
    False
    """
    if type(model) is not MixtureDensityModel:
        return False
    if type(guide) not in _FUSED_GUIDES:
        return False
    like = model.x_loc
    x = torch.zeros(1, model.net.d_x, dtype=like.dtype, device=like.device)
    y = torch.zeros(1, model.net.d_y, dtype=like.dtype, device=like.device)
    with pyro_scope(), torch.no_grad(), seeded(0, like.device):
        trace = poutine.trace(model).get_trace(x, y)
    # The data plate records its subsample as a sample site of its own, named "data".
    sites = [name for name, site in trace.nodes.items() if site["type"] == "sample"]
    return sites == [*model.latent_names, "data", OBS_SITE]


def make_loss(model: MixtureDensityModel, guide: nn.Module, config: FitConfig) -> nn.Module:
    """The loss module the loop minimizes: ``loss(x, y, subsample=idx, n_total=n)``.

    Where :func:`fused_loss_applies`, deterministic guides get :class:`MapLoss`, the same
    objective as ``Trace_ELBO`` at a fraction of the per-step cost (particles change
    nothing for a point mass), and ``AutoNormal`` gets :class:`MeanFieldLoss`, the
    same estimator from the same draws as ``Trace_ELBO``. Every other model and guide
    gets ``Trace_ELBO`` itself, particles vectorized in one pass.
    """
    if fused_loss_applies(model, guide):
        if is_deterministic(guide):
            return MapLoss(model, guide)
        return MeanFieldLoss(model, guide, config.num_particles)
    elbo = Trace_ELBO(
        num_particles=config.num_particles,
        vectorize_particles=config.num_particles > 1,
        max_plate_nesting=1,
    )
    return elbo(model, guide)
