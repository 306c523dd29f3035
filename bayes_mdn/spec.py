"""``ModelSpec``: what model a set of settings describes, and how to build it.

The estimator's architecture, prior and variational family, checked once and turned into a
network, a Pyro model and a guide for data of given dimensions. Fitting, loading a saved
file and the data-parallel workers all build their members through :meth:`ModelSpec.build`,
so a model is described in one place.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._utils import seeded
from ._validation import is_count
from .guides import GUIDES, make_guide
from .model import BAYESIAN_LAYERS, MixtureDensityModel
from .nets import ACTIVATIONS, COVARIANCES, MixtureDensityNetwork

__all__ = ["DTYPES", "ModelSpec", "auto_components", "backbone_class", "state_differences"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def auto_components(n_train: int) -> int:
    """The number of mixture components ``n_components="auto"`` gives ``n_train`` rows:
    round(n_train ** (1/3)), between 3 and 20.

    Examples
    --------
    >>> [auto_components(n) for n in (100, 1_000, 5_000, 100_000)]
    [5, 10, 17, 20]
    """
    return int(min(20, max(3, round(n_train ** (1 / 3)))))


def backbone_class(backbone: nn.Module) -> str:
    """The qualified class name a saved model records for its backbone."""
    kind = type(backbone)
    return f"{kind.__module__}.{kind.__qualname__}"


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """The architecture, prior and guide of a Bayesian MDN, checked when built.

    The fields mean what the :class:`~bayes_mdn.estimator.BayesianMDN` parameters of the
    same names mean. ``n_components="auto"`` is resolved by :meth:`components` once the
    number of training rows is known.

    Examples
    --------
    >>> spec = ModelSpec(n_components=3, hidden=(8,))
    >>> stats = (torch.zeros(2), torch.ones(2), torch.zeros(1), torch.ones(1))
    >>> model, guide = spec.build(2, 1, 3, stats, init_seed=0)
    >>> model.latent_names
    ['head.weight', 'head.bias']
    >>> ModelSpec(hidden=(0,))
    Traceback (most recent call last):
    ...
    ValueError: hidden must be a sequence of integers >= 1, got (0,)
    """

    n_components: int | Literal["auto"] = "auto"
    hidden: Sequence[int] = (64, 16)
    activation: str = "relu"
    bayesian: str | Sequence[str] = "last"
    guide: str = "normal"
    covariance: str = "diagonal"
    prior_scale: float = 32.0
    min_scale: float = 0.02
    prior_function: float = 0.5
    init_scale: float = 1e-3
    rank: int | None = None
    dtype: str = "float32"
    backbone: nn.Module | None = None

    def __post_init__(self) -> None:
        if self.backbone is not None and not isinstance(self.backbone, nn.Module):
            raise TypeError(
                f"backbone must be a torch.nn.Module or None, got {type(self.backbone).__name__}"
            )
        bayesian = self.bayesian
        if not isinstance(bayesian, str) and not (
            isinstance(bayesian, Sequence)
            and len(bayesian) > 0
            and all(isinstance(p, str) for p in bayesian)
        ):
            raise ValueError(
                f"bayesian must be one of {BAYESIAN_LAYERS} or a non-empty sequence of name "
                f"patterns, got {bayesian!r}"
            )
        for name, value, options in (
            ("activation", self.activation, tuple(ACTIVATIONS)),
            ("bayesian", bayesian if isinstance(bayesian, str) else "all", BAYESIAN_LAYERS),
            ("guide", self.guide, GUIDES),
            ("covariance", self.covariance, COVARIANCES),
            ("dtype", self.dtype, tuple(DTYPES)),
        ):
            if value not in options:
                raise ValueError(f"{name} must be one of {options}, got {value!r}")
        if self.n_components != "auto" and not is_count(self.n_components):
            raise ValueError(
                f"n_components must be 'auto' or an integer >= 1, got {self.n_components!r}"
            )
        if isinstance(self.hidden, (str, bytes)) or not all(is_count(h) for h in self.hidden):
            raise ValueError(f"hidden must be a sequence of integers >= 1, got {self.hidden!r}")
        for name in ("prior_scale", "min_scale", "init_scale"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        value = self.prior_function
        if isinstance(value, bool) or not (
            isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
        ):
            raise ValueError(f"prior_function must be a finite number >= 0, got {value!r}")
        if self.bayesian == "none" and self.guide != "delta":
            raise ValueError(
                f"guide={self.guide!r} needs latent weights, but bayesian='none' makes every "
                "weight a point estimate: use guide='delta' or bayesian='last'/'all'"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of ``dtype``."""
        return DTYPES[self.dtype]

    def components(self, n_train: int) -> int:
        """K for ``n_train`` training rows: ``n_components``, or :func:`auto_components`."""
        if self.n_components == "auto":
            return auto_components(n_train)
        return int(self.n_components)

    def build(
        self,
        d_x: int,
        d_y: int,
        n_components: int,
        stats: tuple[Tensor, Tensor, Tensor, Tensor],
        init_seed: int | None,
    ) -> tuple[MixtureDensityModel, nn.Module]:
        """The network, Pyro model and guide for d_x inputs and d_y outputs (not fitted).

        Parameters
        ----------
        d_x, d_y : int
        n_components : int
            K (see :meth:`components`).
        stats : (x_loc, x_scale, y_loc, y_scale)
            The standardization, of shapes (d_x,), (d_x,), (d_y,), (d_y,), on the device
            and dtype the model should live on.
        init_seed : int or None
            Seeds the network's initialization. A backbone is deep-copied as given.
        """
        device, dtype = stats[0].device, stats[0].dtype
        backbone, n_features = None, None
        if self.backbone is not None:
            backbone = copy.deepcopy(self.backbone).to(device=device, dtype=dtype)
            n_features = _backbone_width(backbone, d_x, device, dtype)
        with seeded(init_seed, device):
            net = MixtureDensityNetwork(
                d_x=d_x,
                d_y=d_y,
                n_components=n_components,
                hidden=tuple(self.hidden),
                activation=self.activation,
                covariance=self.covariance,
                min_scale=self.min_scale,
                prior_function=self.prior_function,
                backbone=backbone,
                n_features=n_features,
            ).to(device=device, dtype=dtype)
        x_loc, x_scale, y_loc, y_scale = stats
        model = MixtureDensityModel(
            net,
            bayesian=self.bayesian,
            prior_scale=self.prior_scale,
            x_loc=x_loc,
            x_scale=x_scale,
            y_loc=y_loc,
            y_scale=y_scale,
        )
        guide = make_guide(model, self.guide, init_scale=float(self.init_scale), rank=self.rank)
        return model, guide

    def mismatches(self, model: MixtureDensityModel) -> list[str]:
        """How ``model`` differs from the model this spec builds for its dimensions and K:
        tensors missing, extra, or of another shape or dtype. Empty when the spec describes
        it. The spec's model is built on the ``meta`` device, which allocates nothing."""
        net = model.net
        dtype = self.torch_dtype
        meta = torch.device("meta")
        with meta:
            stats = (
                torch.zeros(net.d_x, dtype=dtype),
                torch.ones(net.d_x, dtype=dtype),
                torch.zeros(net.d_y, dtype=dtype),
                torch.ones(net.d_y, dtype=dtype),
            )
            described, _ = self.build(net.d_x, net.d_y, net.n_components, stats, None)
        want, have = described.state_dict(), model.state_dict()
        missing, extra, differ = state_differences(want, have)
        return (
            [f"{k} missing" for k in missing]
            + [f"{k} not described" for k in extra]
            + [
                f"{k}: described {want[k].dtype} {tuple(want[k].shape)}, the model has "
                f"{have[k].dtype} {tuple(have[k].shape)}"
                for k in differ
            ]
        )


def state_differences(
    expected: Mapping[str, Any], found: Mapping[str, Any]
) -> tuple[list[str], list[str], list[str]]:
    """Names only in ``expected``, names only in ``found``, and names in both whose dtype or
    shape differ, each sorted. Values are tensors, or anything with ``dtype`` and
    ``shape`` (the tensor descriptions of a file's header).

    Examples
    --------
    >>> state_differences({"a": torch.zeros(2), "b": torch.zeros(1)},
    ...                   {"a": torch.zeros(3), "c": torch.zeros(1)})
    (['b'], ['c'], ['a'])
    """

    def described(t: Any) -> tuple[Any, tuple[int, ...]]:
        return t.dtype, tuple(t.shape)

    missing = sorted(expected.keys() - found.keys())
    extra = sorted(found.keys() - expected.keys())
    differ = sorted(
        k for k in expected.keys() & found.keys() if described(expected[k]) != described(found[k])
    )
    return missing, extra, differ


def _backbone_width(
    backbone: nn.Module, d_x: int, device: torch.device, dtype: torch.dtype
) -> int:
    """F, the width of the features ``backbone`` gives for rows of d_x columns, found by
    calling it on two rows of zeros (two, so that normalization layers have a batch)."""
    with torch.no_grad():
        out = backbone(torch.zeros(2, d_x, device=device, dtype=dtype))
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"backbone must map a batch of rows, shape (n, {d_x}), to features of shape "
            f"(n, F); on 2 rows it returned {shape}"
        )
    return int(out.shape[1])
