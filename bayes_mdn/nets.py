"""The neural network that maps inputs to the parameters of a Gaussian mixture.

Plain PyTorch: nothing here knows about Pyro. The network's forward pass accepts
optional replacement weights with leading batch dimensions, which is how the Pyro
model evaluates one network per posterior draw (or per ELBO particle) in a single
vectorized pass.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn import functional as F

from .distributions import Covariance, GaussianMixture, MixtureParams

__all__ = ["ACTIVATIONS", "COVARIANCES", "MixtureDensityNetwork", "MixtureParams"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}
COVARIANCES = ("diagonal", "full")


def _linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``x @ weight.T + bias`` where ``weight`` may carry leading batch dimensions.

    x: (..., n, d_in); weight: (*B, d_out, d_in); bias: (*B, d_out).
    Returns (*broadcast, n, d_out).
    """
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    if weight.dim() == 3 and x.dim() in (2, 3):
        # One fused batched product with the bias: matmul's broadcasting copies x per
        # draw and adds the bias in a second pass (about 1.8x slower at 1,000 draws).
        # The batch size is worked out by hand: torch.broadcast_shapes costs more
        # Python time than a training step's whole first layer.
        batch = weight.shape[0]
        if x.dim() == 3 and x.shape[0] != batch:
            if 1 not in (batch, x.shape[0]):
                raise RuntimeError(
                    f"{x.shape[0]} batches of inputs do not broadcast with {batch} of weights"
                )
            batch = max(batch, x.shape[0])
        x = x.expand(batch, *x.shape[-2:])
        weight = weight.expand(batch, *weight.shape[-2:])
        bias = bias.expand(batch, bias.shape[-1])
        if weight.shape[-1] == 1:
            # One input feature: an outer product, which batched GEMM runs through a
            # slow degenerate path (several times slower than this broadcast).
            return torch.addcmul(bias.unsqueeze(-2), x, weight.mT)
        return torch.baddbmm(bias.unsqueeze(-2), x, weight.mT)
    return torch.matmul(x, weight.mT) + bias.unsqueeze(-2)


class MixtureDensityNetwork(nn.Module):
    """An MLP whose output parametrizes a K-component Gaussian mixture (Bishop, 1994).

    Parameters
    ----------
    d_x : int
        Number of input features (columns of x).
    d_y : int
        Dimension of the target.
    n_components : int
        Number of mixture components K.
    hidden : sequence of int
        Widths of the hidden layers (may be empty: a linear model of the parameters).
    activation : str
        One of ``ACTIVATIONS``.
    covariance : {"diagonal", "full"}
        Component covariance structure. ``"full"`` predicts a Cholesky factor.
    min_scale : float
        Floor added to every predicted standard deviation (diagonal of the
        Cholesky factor), in the units the network sees (standardized y).
    prior_function : float
        Scale of a randomized prior function (Osband et al., 2018), 0 for none. When
        positive, a second network of the same widths and activation, drawn at random
        when this one is built and never trained (its parameters ``prior.*`` have
        ``requires_grad=False``), adds ``prior_function`` times its output to every
        component mean. Where there are data the trained network learns to cancel it;
        away from the data it does not, so members built from different seeds disagree
        there by about ``prior_function`` standard deviations of y per standard deviation
        of x. It is drawn from a unit prior: weights Normal(0, gain^2 / fan_in) (He's gain
        sqrt(2) for ReLU, else 1), hidden biases Normal(0, 1) (so that its kinks fall
        anywhere in the standardized inputs), output bias zero.

    backbone : torch.nn.Module or None
        Any module mapping rows of inputs, shape (n, d_x), to features of shape
        (n, ``n_features``), placed in front of the hidden layers (which may be empty): a
        convolutional net for images (which reshapes its rows first, say with
        ``nn.Unflatten``), an embedding, a sequence encoder. Inputs stay rows so that
        standardization, chunking and the data sources work unchanged; an input with three
        dimensions, (B, n, d_x), is one batch of rows per draw of B. Its parameters
        are named ``backbone.*``; draws of them (latent backbone weights, ensemble members)
        are evaluated with ``torch.func.functional_call`` under ``torch.func.vmap``, so
        the backbone must be vmap-compatible (no in-place updates of buffers in the forward
        pass: batch norm in training mode is not). With a prior function, a copy of the
        backbone with fresh parameters (``reset_parameters`` of every submodule) feeds the
        prior network.
    n_features : int or None
        Width of the backbone's output; required with a backbone.

    Examples
    --------
    >>> net = MixtureDensityNetwork(d_x=1, d_y=2, n_components=3, hidden=(8,))
    >>> p = net(torch.zeros(5, 1))
    >>> tuple(p.logits.shape), tuple(p.loc.shape), tuple(p.scale.shape)
    ((5, 3), (5, 3, 2), (5, 3, 2))
    """

    def __init__(
        self,
        d_x: int,
        d_y: int,
        n_components: int,
        hidden: Sequence[int] = (64, 16),
        activation: str = "relu",
        covariance: Covariance = "diagonal",
        min_scale: float = 0.02,
        prior_function: float = 0.0,
        backbone: nn.Module | None = None,
        n_features: int | None = None,
    ) -> None:
        super().__init__()
        if backbone is not None and not isinstance(backbone, nn.Module):
            raise TypeError(
                f"backbone must be a torch.nn.Module or None, got {type(backbone).__name__}"
            )
        if backbone is not None and (
            not isinstance(n_features, int) or isinstance(n_features, bool) or n_features < 1
        ):
            raise ValueError(
                "a backbone needs n_features, the width of its output (an integer >= 1), "
                f"got {n_features!r}"
            )
        for name, value in (("d_x", d_x), ("d_y", d_y), ("n_components", n_components)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if any(not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"hidden must be a sequence of integers >= 1, got {hidden!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}"
            )
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
        if not min_scale > 0:
            raise ValueError(f"min_scale must be > 0, got {min_scale!r}")
        if isinstance(prior_function, bool) or not (
            isinstance(prior_function, (int, float)) and 0 <= prior_function < math.inf
        ):
            raise ValueError(
                f"prior_function must be a finite number >= 0, got {prior_function!r}"
            )
        self.d_x, self.d_y, self.n_components = d_x, d_y, n_components
        self.covariance = covariance
        self.min_scale = float(min_scale)
        self.activation = ACTIVATIONS[activation]()
        # Registered first: parameters are listed input first (backbone, hidden, head).
        self.backbone = backbone
        widths = [d_x if backbone is None else int(n_features), *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        n_tril = d_y * (d_y - 1) // 2 if covariance == "full" else 0
        self._sizes = (n_components, n_components * d_y, n_components * d_y, n_components * n_tril)
        self.head = nn.Linear(widths[-1], sum(self._sizes))
        self._init_head()
        self.prior_function = float(prior_function)
        self.prior: nn.ModuleList | None = None
        self.prior_backbone: nn.Module | None = None
        if self.prior_function > 0:
            if backbone is not None:
                self.prior_backbone = _reinitialized(backbone).requires_grad_(False)
            self.prior = nn.ModuleList(
                nn.Linear(a, b) for a, b in zip(widths, [*hidden, n_components * d_y])
            )
            gain = math.sqrt(2.0) if activation == "relu" else 1.0
            with torch.no_grad():
                for layer in self.prior:
                    layer.weight.normal_(0.0, gain / math.sqrt(layer.in_features))
                    layer.bias.normal_()
                self.prior[-1].bias.zero_()
            self.prior.requires_grad_(False)

    def _init_head(self) -> None:
        # Start near equal weights, spread-out means and unit-ish scales in standardized
        # units: components that start on top of each other tend to stay collapsed.
        k, d = self.n_components, self.d_y
        with torch.no_grad():
            self.head.weight.mul_(0.1)
            bias = torch.zeros(sum(self._sizes))
            locs = torch.randn(k, d)
            if d == 1:
                locs = torch.linspace(-1.6, 1.6, k).unsqueeze(-1) if k > 1 else torch.zeros(1, 1)
            start = self._sizes[0]
            bias[start : start + k * d] = locs.reshape(-1)
            start += k * d
            target_scale = 0.6 if k > 1 else 1.0
            bias[start : start + k * d] = _softplus_inverse(target_scale - self.min_scale)
            self.head.bias.copy_(bias)

    def forward(self, x: Tensor, weights: Mapping[str, Tensor] | None = None) -> MixtureParams:
        """Mixture parameters for each row of ``x``.

        Parameters
        ----------
        x : Tensor of shape (n, d_x)
        weights : mapping from parameter name (``"head.weight"``, ``"hidden.0.bias"``...)
            to replacement tensors of shape (B, *param.shape); missing names use the
            module's own parameters.

        Returns
        -------
        MixtureParams with logits (B?, n, K), loc and scale (B?, n, K, d[, d]).
        """
        return self.split(self.raw(x, weights))

    def raw(self, x: Tensor, weights: Mapping[str, Tensor] | None = None) -> Tensor:
        """The output layer before any transform, shape (B?, n, ``n_outputs``).

        Columns: K logits, then K*d locations, K*d raw scales, K*d(d-1)/2 raw Cholesky
        entries, each block component-major. :meth:`split` turns it into parameters.
        """
        weights = weights or {}
        w = weights.get("head.weight", self.head.weight)
        out = _linear(self.features(x, weights), w, weights.get("head.bias", self.head.bias))
        if self.prior is None:
            return out
        return out + self._prior_output(x, weights)

    def _prior_output(self, x: Tensor, weights: Mapping[str, Tensor]) -> Tensor:
        """The randomized prior function, placed in the component-mean columns of the
        output layer (zeros elsewhere): shape (B?, n, ``n_outputs``)."""
        assert self.prior is not None
        *hidden, out = self.prior
        if self.prior_backbone is not None:
            x = _call(self.prior_backbone, "prior_backbone", x, weights)
        h = self._layers(x, "prior", hidden, weights)
        name = f"prior.{len(hidden)}"
        h = _linear(
            h, weights.get(f"{name}.weight", out.weight), weights.get(f"{name}.bias", out.bias)
        )
        k = self.n_components
        return F.pad(self.prior_function * h, (k, self.n_outputs - k - h.shape[-1]))

    def features(self, x: Tensor, weights: Mapping[str, Tensor] | None = None) -> Tensor:
        """The last hidden layer's output (the head's input), shape (B?, n, width)."""
        weights = weights or {}
        if self.backbone is not None:
            x = _call(self.backbone, "backbone", x, weights)
        return self._layers(x, "hidden", self.hidden, weights)

    def _layers(
        self, h: Tensor, prefix: str, layers: Sequence[nn.Linear], weights: Mapping[str, Tensor]
    ) -> Tensor:
        """``layers`` (named ``<prefix>.<i>``) each followed by the activation, with any
        replacement weights from ``weights``: the hidden part of the trained network and
        of the prior function."""
        for i, layer in enumerate(layers):
            w = weights.get(f"{prefix}.{i}.weight", layer.weight)
            b = weights.get(f"{prefix}.{i}.bias", layer.bias)
            h = self.activation(_linear(h, w, b))
        return h

    @property
    def n_outputs(self) -> int:
        """Width of the output layer."""
        return sum(self._sizes)

    @torch.no_grad()
    def sample(
        self,
        x: Tensor,
        weights: Mapping[str, Tensor] | None = None,
        num_draws: int | None = None,
        max_elements: int = 2**21,
    ) -> Tensor:
        """One draw of y per draw of the weights and row of x, in the network's units.

        :meth:`GaussianMixture.sample` (component first) of :meth:`head_mixture`, on the
        head's (B, outputs, rows) layout, one matrix product for all draws, so that the
        reductions over components run along contiguous rows of x (faster than
        :meth:`raw`'s (B, rows, outputs) layout: docs/notes.md).

        Parameters
        ----------
        x : Tensor of shape (n, d_x)
        weights : as in :meth:`forward`; all batched weights share one batch size B
        num_draws : with unbatched weights, the number of independent draws of y
        max_elements : rows are taken in chunks so that no (B, outputs, rows) tensor has
            more elements than this

        Returns
        -------
        Tensor of shape (B, n, d), (num_draws, n, d), or (n, d) with neither.
        """
        batch = self.weight_batch(weights)
        draws = batch or num_draws or 1
        # Written in place chunk by chunk, rather than concatenated at the end: half the
        # peak memory.
        y = x.new_empty(draws, len(x), self.d_y)
        for rows, head in self.head_by_rows(x, weights, max_elements, draws):
            y[:, rows] = self._sample_head(head, draws)
        return y if batch or num_draws is not None else y[0]

    def weight_batch(self, weights: Mapping[str, Tensor] | None) -> int | None:
        """B when the replacement weights carry a leading batch dimension, else None."""
        params = dict(self.named_parameters())
        for name, value in (weights or {}).items():
            if value.dim() > params[name].dim():
                return value.shape[0]
        return None

    def head_by_rows(
        self,
        x: Tensor,
        weights: Mapping[str, Tensor] | None = None,
        max_elements: int = 2**21,
        draws: int = 1,
    ) -> Iterator[tuple[slice, Tensor]]:
        """The output layer, chunk by chunk of rows, laid out (B or 1, P, rows).

        The transpose of :meth:`raw`, built by one matrix product for all draws of the
        weights (the bias folded in as one more input column), so that work over the
        components (softmax, CDFs, log-sum-exp) runs along contiguous rows of x (about
        three times faster than on :meth:`raw`'s (B, rows, P) layout, docs/notes.md). Each chunk
        holds at most ``max_elements`` elements in its widest tensor (the head output or a
        hidden layer's, which is (B, rows, width) when the hidden weights are drawn too, as
        for ensembles), counting ``draws`` draws per row when the weights are not batched.
        Yields (slice of rows, head output).
        """
        weights = weights or {}
        w = weights.get("head.weight", self.head.weight)
        b = weights.get("head.bias", self.head.bias)
        # One row tells whether the hidden layers carry a draw dimension.
        first = self.features(x[:1], weights)
        h_dims = first.dim()
        if w.dim() == 3:
            draws = w.shape[0]
        elif h_dims == 3:
            draws = first.shape[0]
        w = torch.cat([w, b.unsqueeze(-1)], -1)
        if w.dim() == 3 and h_dims == 2:
            w = w.reshape(-1, w.shape[-1])  # (B * P, width + 1): one matrix product
        n_out = self.n_outputs
        widest = max([n_out, *(layer.out_features for layer in self.hidden)])
        size = max(1, max_elements // (draws * widest))
        for start in range(0, len(x), size):
            rows = slice(start, min(start + size, len(x)))
            h = self.features(x[rows], weights)
            chunk = torch.cat([h, h.new_ones(*h.shape[:-1], 1)], -1).mT
            head = (w @ chunk).reshape(-1, n_out, chunk.shape[-1])
            if self.prior is not None:
                head = head + self._prior_output(x[rows], weights).mT
            yield rows, head

    def log_prob_by_rows(
        self,
        x: Tensor,
        z: Tensor,
        weights: Mapping[str, Tensor] | None = None,
        max_elements: int = 2**21,
    ) -> Iterator[tuple[slice, Tensor]]:
        """log p(z | x, w), chunk by chunk of rows.

        z: (n, d) in the network's units. Yields (slice of rows, log density of shape
        (B or 1, rows)): :meth:`GaussianMixture.log_prob` of :meth:`head_mixture`.
        """
        for rows, head in self.head_by_rows(x, weights, max_elements):
            yield rows, self.head_mixture(head).log_prob(z[rows])

    def _sample_head(self, head: Tensor, draws: int) -> Tensor:
        """Draws of y from head outputs of shape (B or 1, P, rows): (draws, rows, d).

        The component is drawn first (:meth:`GaussianMixture.draw_components`); only its
        columns of the head are then transformed and sampled, as a one-component mixture.
        """
        k, d = self.n_components, self.d_y
        rows = head.shape[-1]
        component = GaussianMixture.draw_components(head[:, :k].mT, (draws, rows))
        # The rows of the head's output that belong to the chosen component.
        n_tril = self._sizes[3] // k
        offsets, strides, start = [], [], k
        for width in (d, d, n_tril):
            offsets.append(start + torch.arange(width, device=head.device))
            strides.append(torch.full((width,), width, device=head.device))
            start += k * width
        index = torch.cat(offsets)[:, None] + torch.cat(strides)[:, None] * component[:, None]
        chosen = head.expand(draws, *head.shape[1:]).gather(1, index)
        # A constant logit column in front: the one-component mixture's weight.
        chosen = torch.cat([chosen.new_zeros(draws, 1, rows), chosen], 1)
        return self.split(chosen.mT, 1).distribution().sample()

    def head_mixture(self, head: Tensor) -> GaussianMixture:
        """The mixture of a :meth:`head_by_rows` output (B, P, rows): batch shape (B, rows).

        Its parameters are strided views of ``head`` (the transforms of the scales aside),
        so the mixture's reductions over components run along contiguous rows.
        """
        return self.split(head.mT).distribution()

    def split(self, out: Tensor, n_components: int | None = None) -> MixtureParams:
        """Mixture parameters from a raw output (of :meth:`raw`; of one component per
        row with ``n_components=1``)."""
        k = self.n_components if n_components is None else n_components
        d = self.d_y
        n_tril = d * (d - 1) // 2 if self.covariance == "full" else 0
        batch = out.shape[:-1]
        logits, loc, raw_scale, raw_tril = out.split((k, k * d, k * d, k * n_tril), dim=-1)
        loc = loc.reshape(*batch, k, d)
        raw_scale = raw_scale.reshape(*batch, k, d)
        if raw_scale.stride(-1) == 1:
            # On raw()'s (..., rows, outputs) layout the scale block is a strided view
            # (K*d of every row's outputs), on which softplus takes a slow path: 15
            # times slower than a copy and a softplus of the copy (docs/notes.md). On
            # head_by_rows' layout the rows are contiguous and nothing is copied.
            raw_scale = raw_scale.contiguous()
        # In place: softplus saves its input, not its output, for the gradient.
        diag = F.softplus(raw_scale).add_(self.min_scale)
        if self.covariance == "diagonal":
            return MixtureParams(logits, loc, diag)
        tril = torch.zeros(*batch, k, d, d, dtype=out.dtype, device=out.device)
        rows, cols = torch.tril_indices(d, d, offset=-1, device=out.device)
        tril[..., rows, cols] = raw_tril.reshape(*batch, k, -1)
        scale = tril + torch.diag_embed(diag)
        return MixtureParams(logits, loc, scale)


def _softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def _call(module: nn.Module, prefix: str, x: Tensor, weights: Mapping[str, Tensor]) -> Tensor:
    """``module(x)`` with any replacement weights named ``<prefix>.<parameter>``.

    x holds rows of features, (n, d_x), or one batch of rows per draw, (B, n, d_x) (a
    stacked ensemble trains each member on its own mini-batch). Replacements with a
    leading batch dimension B (posterior draws, ELBO particles, ensemble members) are
    evaluated with ``torch.func.functional_call`` under ``torch.func.vmap``: one network
    per draw in one vectorized pass, giving (B, n, features).
    """
    start = len(prefix) + 1
    sub = {name[start:]: w for name, w in weights.items() if name.startswith(prefix + ".")}
    own = dict(module.named_parameters())
    batched = {k: v for k, v in sub.items() if v.dim() > own[k].dim()}
    fixed = {k: v for k, v in sub.items() if k not in batched}
    paired = x.dim() == 3
    if not batched and not paired:
        return functional_call(module, fixed, (x,)) if fixed else module(x)
    if not batched:
        return vmap(lambda rows: functional_call(module, fixed, (rows,)))(x)
    if paired and x.shape[0] == 1:
        x, paired = x[0], False

    def one(draw: dict[str, Tensor], rows: Tensor) -> Tensor:
        return functional_call(module, {**fixed, **draw}, (rows,))

    return vmap(one, in_dims=(0, 0 if paired else None))(batched, x)


def _reinitialized(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with fresh random parameters: every submodule that has
    ``reset_parameters`` (linear, convolution, normalization layers...) calls it."""
    fresh = copy.deepcopy(module)
    for sub in fresh.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
    return fresh
