"""The Pyro model: priors over the chosen layers, the mixture likelihood under a data plate."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import ClassVar, Literal

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor, nn

from .distributions import MixtureParams
from .nets import MixtureDensityNetwork

__all__ = [
    "BAYESIAN_LAYERS",
    "DEFAULT_MAX_ELEMENTS",
    "OBS_SITE",
    "MixtureDensityModel",
    "latent_parameters",
]

BAYESIAN_LAYERS = ("none", "last", "all")
OBS_SITE = "obs"
# Elements of the largest (draws x points x outputs) tensor built at once by the chunked
# evaluations (predict.py uses the same budget).
DEFAULT_MAX_ELEMENTS = 2**21

Bayesian = Literal["none", "last", "all"]


def latent_parameters(net: MixtureDensityNetwork, bayesian: Bayesian | Sequence[str]) -> list[str]:
    """Names of the network's parameters that ``bayesian`` makes latent, network order.

    ``bayesian`` is a shorthand, ``"none"``, ``"last"`` (the output layer, ``head.*``) or
    ``"all"`` (``backbone.*``, ``hidden.*`` and ``head.*``), or a sequence of glob
    patterns over parameter names, as ``fnmatch`` reads them (``["head.*",
    "backbone.fc.*"]``). The fixed prior-function parameters (``prior*``) are never latent.

    Examples
    --------
    >>> net = MixtureDensityNetwork(d_x=1, d_y=1, n_components=2, hidden=(4,))
    >>> latent_parameters(net, "last")
    ['head.weight', 'head.bias']
    >>> latent_parameters(net, ["*.weight"])
    ['hidden.0.weight', 'head.weight']
    """
    if isinstance(bayesian, str):
        if bayesian not in BAYESIAN_LAYERS:
            raise ValueError(
                f"bayesian must be one of {BAYESIAN_LAYERS} or a sequence of name patterns, "
                f"got {bayesian!r}"
            )
        patterns = {"none": [], "last": ["head.*"], "all": ["backbone.*", "hidden.*", "head.*"]}[
            bayesian
        ]
    else:
        patterns = list(bayesian)
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise ValueError(
                f"bayesian patterns must be a non-empty sequence of strings, got {bayesian!r}"
            )
    names = [
        name
        for name, _ in net.named_parameters()
        if not name.startswith("prior") and any(fnmatchcase(name, p) for p in patterns)
    ]
    if not isinstance(bayesian, str) and not names:
        trainable = [n for n, _ in net.named_parameters() if not n.startswith("prior")]
        raise ValueError(
            f"bayesian patterns {patterns} match no parameter of the network; its "
            f"parameters are {trainable[:8]}{' ...' if len(trainable) > 8 else ''}"
        )
    return names


class MixtureDensityModel(nn.Module):
    """A Bayesian mixture density network as a Pyro model.

    The weights and biases of the chosen layers are latent variables with Gaussian
    priors: Normal(0, prior_scale / sqrt(fan_in)) for a weight matrix (Neal's scaling,
    which keeps the prior variance of each layer's output independent of its width),
    Normal(0, prior_scale) for a bias. Every other parameter is a point estimate (an ordinary
    ``nn.Parameter``, trained by the optimizer alongside the guide). Inputs are
    standardized inside the model and the mixture is mapped back to the units of y,
    so every density the model reports is in the user's units.

    Parameters
    ----------
    net : MixtureDensityNetwork
        The network; its initial weights are also the initial values of the guide.
    bayesian : {"none", "last", "all"} or sequence of str
        Which parameters get priors: none (maximum likelihood), the output layer, every
        layer (a backbone's included), or the parameters whose names match any of these
        glob patterns (see :func:`latent_parameters`).
    prior_scale : float
        Prior standard deviation of a latent bias, and of a latent weight times
        sqrt(fan_in).
    x_loc, x_scale : Tensor of shape (d_x,)
        Standardization of the inputs.
    y_loc, y_scale : Tensor of shape (d_y,)
        Standardization of the targets.

    Notes
    -----
    Latent weights arrive either as plain tensors or with leading batch dimensions
    (vectorized ELBO particles, ``Predictive(parallel=True)``). Those batch dimensions
    are flattened into one leading dimension B, so the likelihood has batch shape
    (B, n): B lines up with Pyro's vectorization plate at dim -2, n with the data plate.
    """

    def __init__(
        self,
        net: MixtureDensityNetwork,
        *,
        bayesian: Bayesian | Sequence[str] = "last",
        prior_scale: float = 32.0,
        x_loc: Tensor,
        x_scale: Tensor,
        y_loc: Tensor,
        y_scale: Tensor,
    ) -> None:
        super().__init__()
        if not prior_scale > 0:
            raise ValueError(f"prior_scale must be > 0, got {prior_scale!r}")
        self.net = net
        self.bayesian = bayesian
        self.latent_shapes: dict[str, torch.Size] = {
            name: net.get_parameter(name).shape for name in latent_parameters(net, bayesian)
        }
        # Latent weights are sampled, not optimized: their nn.Parameters stay only as the
        # network's initialization, which the guides start from.
        for name, param in net.named_parameters():
            if name in self.latent_shapes:
                param.requires_grad_(False)
        ref = next(net.parameters())
        self.register_buffer("prior_scale", torch.tensor(float(prior_scale), dtype=ref.dtype))
        # One prior standard deviation per latent site, kept as buffers so .to() moves them.
        self._prior_names = {}
        for i, (name, shape) in enumerate(self.latent_shapes.items()):
            # Weights of any rank (linear, convolution) by their fan-in; vectors (biases,
            # normalization scales) by prior_scale itself.
            fan_in = math.prod(shape[1:]) if len(shape) >= 2 else 1
            scale = torch.tensor(float(prior_scale) / math.sqrt(fan_in), dtype=ref.dtype)
            self._prior_names[name] = f"_prior_scale_{i}"
            self.register_buffer(self._prior_names[name], scale)
        self.register_buffer("x_loc", x_loc.to(ref))
        self.register_buffer("x_scale", x_scale.to(ref))
        self.register_buffer("y_loc", y_loc.to(ref))
        self.register_buffer("y_scale", y_scale.to(ref))

    @property
    def latent_names(self) -> list[str]:
        """Names of the latent sites (``"head.weight"``, ...), in network order."""
        return list(self.latent_shapes)

    def initial_values(self) -> dict[str, Tensor]:
        """The network's initial weights for each latent site: where guides start."""
        params = dict(self.net.named_parameters())
        return {name: params[name].detach().clone() for name in self.latent_shapes}

    def _flat(self, weights: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        """Replacement weights with their batch dimensions flattened into one, B.

        Any parameter of the network may be replaced, latent or not: an ensemble's draws
        replace every parameter (see :class:`bayes_mdn.guides.EnsembleGuide`).
        """
        flat = {}
        shapes = None
        for name, value in (weights or {}).items():
            event = self.latent_shapes.get(name)
            if event is None:
                if shapes is None:
                    shapes = {n: p.shape for n, p in self.net.named_parameters()}
                event = shapes[name]
            batch = value.shape[: value.dim() - len(event)]
            flat[name] = value.reshape(-1, *event) if len(batch) else value
        return flat

    def raw(self, x: Tensor, weights: Mapping[str, Tensor] | None = None) -> Tensor:
        """The network's raw output for x in the user's units, shape (B?, n, P).

        See :meth:`bayes_mdn.nets.MixtureDensityNetwork.raw`; the parameters it gives
        are in standardized units of y (map them back with :meth:`to_user_units`).
        """
        return self.net.raw((x - self.x_loc) / self.x_scale, self._flat(weights))

    def to_user_units(self, params: MixtureParams) -> MixtureParams:
        """Mixture parameters in standardized units of y -> in y's units."""
        return params.distribution().affine(self.y_loc, self.y_scale).params

    def mixture(self, x: Tensor, weights: Mapping[str, Tensor] | None = None) -> MixtureParams:
        """Mixture parameters in the units of y.

        Parameters
        ----------
        x : Tensor of shape (n, d_x), in the user's units
        weights : optional latent weights, each of shape (*B, *param_shape)

        Returns
        -------
        MixtureParams with logits (n, K) or (B, n, K) when the weights are batched.
        """
        return self.to_user_units(self.net.split(self.raw(x, weights)))

    def sample(
        self,
        x: Tensor,
        weights: Mapping[str, Tensor] | None = None,
        num_draws: int | None = None,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
    ) -> Tensor:
        """Draws of y in y's units: (B, n, d) with batched weights, (num_draws, n, d)
        with ``num_draws``, else (n, d). See :meth:`MixtureDensityNetwork.sample`."""
        z = self.net.sample(
            (x - self.x_loc) / self.x_scale, self._flat(weights), num_draws, max_elements
        )
        return self.y_loc + self.y_scale * z

    def log_density(
        self, x: Tensor, y: Tensor, weights: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        """log p(y | x, w) in y's units, one value per draw of the weights and row.

        x: (n, d_x); y: (n, d_y); weights: each (*B, *param_shape) or absent.
        Returns a Tensor of shape (B, n), or (n,) without batched weights.
        """
        # The mixture is evaluated in standardized units and the Jacobian of the map back
        # to y's units is added once: the density mixture(x, w) reports, without rescaling
        # every component (the losses call this per step).
        mix = self.net.split(self.raw(x, weights)).distribution()
        return mix.log_prob((y - self.y_loc) / self.y_scale) - self.y_scale.log().sum()

    @torch.no_grad()
    def log_predictive_density(
        self,
        x: Tensor,
        y: Tensor,
        weights: Mapping[str, Tensor] | None = None,
        max_elements: int = DEFAULT_MAX_ELEMENTS,
    ) -> Tensor:
        """log p(y | x) averaged over draws of the weights: log-mean-exp over B draws.

        x: (n, d_x); y: (n, d_y); weights: each (B, *param_shape) or absent.
        Rows are taken in chunks so that no tensor of more than about ``max_elements``
        (draws x rows x outputs) is built at once. An evaluation, without gradients.
        Returns a Tensor of shape (n,).
        """
        # The network's (B, outputs, rows) evaluation: about three times faster at 1,000
        # draws than reducing over components on log_density's (B, rows, outputs) layout.
        xs = (x - self.x_loc) / self.x_scale
        z = (y - self.y_loc) / self.y_scale
        outs = [
            torch.logsumexp(log_p, 0) - math.log(log_p.shape[0])
            for _, log_p in self.net.log_prob_by_rows(xs, z, self._flat(weights), max_elements)
        ]
        log_p = torch.cat(outs) if outs else x.new_zeros(0)
        return log_p - self.y_scale.log().sum()

    def prior(self, name: str) -> dist.Distribution:
        """The prior of latent site ``name``."""
        shape = self.latent_shapes[name]
        scale = getattr(self, self._prior_names[name])
        return dist.Normal(torch.zeros_like(scale), scale).expand(shape).to_event(len(shape))

    def log_prior(self, weights: Mapping[str, Tensor]) -> Tensor:
        """Sum of the prior log densities of the latent weights.

        The value of summing ``self.prior(name).log_prob(w)`` over ``weights``, computed
        without building distribution objects (the fused losses call it every step).
        Each weight has shape (*B, *site_shape) with the same leading batch shape B
        (possibly empty); returns a Tensor of shape B.
        """
        coefs, consts, const_all = self._prior_constants()
        if list(weights) == self.latent_names:
            total = const_all
        else:
            total = sum((consts[name] for name in weights), self.prior_scale.new_zeros(()))
        for name, value in weights.items():
            flat = value.flatten(value.dim() - len(self.latent_shapes[name]))
            # Plain ops, measured fastest in a step: a hand-written autograd.Function for
            # the whole sum costs more in Python overhead than the ops it saves.
            total = total + coefs[name] * (flat * flat).sum(-1)
        return total

    def _prior_constants(self) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """Per site, -1 / (2 scale^2) and the normalizing constant of its prior; the sum
        of those constants over every site.

        Cached while the prior-scale buffers are the same tensors, unmodified (their
        version counters unchanged), so that a step pays for none of these scalar ops.
        """
        buffers = [getattr(self, self._prior_names[name]) for name in self.latent_shapes]
        if torch.compiler.is_compiling():
            # Traced into a compiled step as plain ops (the cache's version checks would
            # break its graph); the compiled graph computes them once a step.
            return self._compute_prior_constants(buffers)
        # The key holds the buffers themselves, so a freed buffer's id is never reused.
        key = getattr(self, "_prior_cache_key", None)
        if key is None or not all(
            a is b and version == b._version for (a, version), b in zip(key, buffers)
        ):
            key = [(b, b._version) for b in buffers]
            self._prior_cache = self._compute_prior_constants(buffers)
            self._prior_cache_key = key
        return self._prior_cache

    def _compute_prior_constants(
        self, buffers: list[Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        with torch.no_grad():
            coefs, consts = {}, {}
            for name, scale in zip(self.latent_shapes, buffers):
                coefs[name] = -0.5 / scale.pow(2)
                numel = math.prod(self.latent_shapes[name])
                consts[name] = -numel * (scale.log() + 0.5 * math.log(2 * math.pi))
            const_all = sum(consts.values(), self.prior_scale.new_zeros(()))
        return coefs, consts, const_all

    def forward(
        self,
        x: Tensor,
        y: Tensor | None = None,
        *,
        subsample: Tensor | None = None,
        n_total: int | None = None,
    ) -> Tensor:
        """Run the generative model.

        Parameters
        ----------
        x : Tensor of shape (n, d_x)
        y : Tensor of shape (n, d_y) or None to sample it
        subsample : indices of this mini-batch in the full data set, shape (n,)
        n_total : size of the full data set; the likelihood is scaled by n_total / n

        Returns
        -------
        The observed or sampled y, shape (n, d_y) or (B, n, d_y).
        """
        weights = {name: pyro.sample(name, self.prior(name)) for name in self.latent_shapes}
        likelihood = _Likelihood(self, x, weights)
        size = len(x) if n_total is None else n_total
        if subsample is None and size != len(x):
            subsample = torch.arange(len(x), device=x.device)
        with pyro.plate("data", size, subsample=subsample, dim=-1):
            return pyro.sample(OBS_SITE, likelihood, obs=y)


class _Likelihood(TorchDistribution):
    """p(y | x, w) of the mixture network, as the distribution of the observed site.

    Its values are those of ``model.mixture(x, weights).distribution()``, but
    nothing is computed until asked: ``log_prob`` is :meth:`MixtureDensityModel.log_density`
    (the mixture in standardized units plus the Jacobian) and ``sample`` is
    :meth:`MixtureDensityModel.sample`, which transforms only the drawn component. This
    is what makes ``pyro.infer.Predictive`` and ``Trace_ELBO`` as fast as the fused
    code paths. Batch shape (B, n) with batched weights, else (n,); ``expand`` adds
    independent draws in front (Predictive without latent weights).
    """

    arg_constraints: ClassVar[dict] = {}
    support = constraints.independent(constraints.real, 1)
    has_rsample = False

    def __init__(
        self,
        model: MixtureDensityModel,
        x: Tensor,
        weights: Mapping[str, Tensor],
        batch_shape: torch.Size | None = None,
    ) -> None:
        self.model, self.x, self.weights = model, x, model._flat(weights)
        natural = self._natural_shape()
        super().__init__(
            natural if batch_shape is None else batch_shape,
            torch.Size([model.net.d_y]),
            validate_args=False,
        )

    def _natural_shape(self) -> torch.Size:
        """(B, n) with batched weights, else (n,): the shape before any ``expand``."""
        batch = self.model.net.weight_batch(self.weights)
        return torch.Size([len(self.x)] if batch is None else [batch, len(self.x)])

    def expand(self, batch_shape, _instance=None) -> _Likelihood:
        batch_shape = torch.Size(batch_shape)
        natural = self._natural_shape()
        if len(batch_shape) < len(natural) or not all(
            a == b or b == 1 for a, b in zip(batch_shape[-len(natural) :], natural)
        ):
            raise ValueError(
                f"cannot expand a likelihood of batch shape {natural} to {batch_shape}"
            )
        return _Likelihood(self.model, self.x, self.weights, batch_shape)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:  # noqa: B008
        shape = torch.Size(sample_shape) + self.batch_shape
        natural = self._natural_shape()
        weights = self.weights
        with torch.no_grad():
            if len(natural) == 2 and natural[0] == 1:
                # One draw of the weights shared by every draw of y.
                weights = {name: value[0] for name, value in weights.items()}
                natural = natural[1:]
            if len(natural) == 1:
                y = self.model.sample(self.x, weights, num_draws=math.prod(shape[:-1]))
            else:
                # Batched weights: one pass per draw of y for each draw of the weights.
                repeats = math.prod(shape[:-2])
                y = torch.stack([self.model.sample(self.x, weights) for _ in range(repeats)])
        return y.reshape(*shape, *self.event_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        log_p = self.model.log_density(self.x, value, self.weights)
        return log_p.expand(torch.broadcast_shapes(log_p.shape, self.batch_shape))
