"""Variational families (Pyro autoguides) chosen by name."""

from __future__ import annotations

from typing import Literal

import pyro
import torch
from pyro.infer.autoguide import (
    AutoDelta,
    AutoLowRankMultivariateNormal,
    AutoNormal,
    init_to_value,
)
from torch import nn

from ._utils import pyro_scope
from .model import MixtureDensityModel

__all__ = [
    "GUIDES",
    "EmpiricalGuide",
    "PointGuide",
    "draw_latents",
    "is_deterministic",
    "make_guide",
]

GUIDES = ("delta", "normal", "lowrank")

GuideName = Literal["delta", "normal", "lowrank"]


class PointGuide(nn.Module):
    """The guide of a model with no latent weights: every parameter is a point estimate."""

    def forward(self, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        return {}


class EmpiricalGuide(nn.Module):
    """A posterior held as stored draws (from MCMC), usable wherever a guide is.

    Parameters
    ----------
    samples : dict from site name to Tensor of shape (num_chains, num_samples, *site_shape)

    Notes
    -----
    The draws are kept as buffers, so ``.to(device)`` moves them. :func:`draw_latents`
    resamples them: without replacement when fewer draws than stored are asked for,
    with replacement otherwise, using torch's random generator (so ``seeded`` applies).
    """

    def __init__(self, samples: dict[str, torch.Tensor]) -> None:
        super().__init__()
        if not samples:
            raise ValueError("samples must hold at least one latent site, got an empty dict")
        shapes = {name: tuple(v.shape[:2]) for name, v in samples.items()}
        if len(set(shapes.values())) != 1 or any(v.dim() < 2 for v in samples.values()):
            raise ValueError(
                f"every site must have shape (num_chains, num_samples, ...), got {shapes}"
            )
        self.num_chains, self.num_samples = next(iter(shapes.values()))
        self._names = {}
        for i, (name, value) in enumerate(samples.items()):
            self._names[name] = f"_draws_{i}"
            self.register_buffer(self._names[name], value.detach().clone())

    @property
    def samples(self) -> dict[str, torch.Tensor]:
        """The stored draws, {site: (num_chains, num_samples, *site_shape)}."""
        return {name: getattr(self, buf) for name, buf in self._names.items()}

    def draw(self, num_draws: int) -> dict[str, torch.Tensor]:
        """``num_draws`` stored joint draws, {site: (num_draws, *site_shape)}."""
        flat = {name: v.flatten(0, 1) for name, v in self.samples.items()}
        total = self.num_chains * self.num_samples
        ref = next(iter(flat.values()))
        if num_draws <= total:
            idx = torch.randperm(total, device=ref.device)[:num_draws]
        else:
            idx = torch.randint(total, (num_draws,), device=ref.device)
        return {name: v[idx] for name, v in flat.items()}

    def forward(self, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        return {name: v[0] for name, v in self.draw(1).items()}


def make_guide(
    model: MixtureDensityModel,
    name: GuideName = "normal",
    *,
    init_scale: float = 1e-3,
    rank: int | None = None,
) -> nn.Module:
    """An autoguide over the model's latent weights.

    Parameters
    ----------
    model : MixtureDensityModel
    name : {"delta", "normal", "lowrank"}
        ``"delta"``: MAP point estimates (AutoDelta). ``"normal"``: mean-field Gaussian
        (AutoNormal). ``"lowrank"``: Gaussian with low-rank plus diagonal covariance
        (AutoLowRankMultivariateNormal).
    init_scale : float
        Initial posterior standard deviation of every weight. Small values start the
        fit near the network's initialization; Pyro's 0.1 is too wide for an MDN.
    rank : int or None
        Rank of the ``"lowrank"`` covariance; None takes sqrt(number of weights).

    Returns
    -------
    nn.Module: the guide, whose location parameters start at the network's own
    initialization. A model with ``bayesian="none"`` gets a :class:`PointGuide`.
    """
    if name not in GUIDES:
        raise ValueError(f"guide must be one of {GUIDES}, got {name!r}")
    if not init_scale > 0:
        raise ValueError(f"init_scale must be > 0, got {init_scale!r}")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be None or an integer >= 1, got {rank!r}")
    if not model.latent_shapes:
        if name != "delta":
            raise ValueError(
                f"guide={name!r} needs latent weights, but bayesian='none' makes every "
                "weight a point estimate: use guide='delta' or bayesian='last'/'all'"
            )
        return PointGuide()
    init = init_to_value(values=model.initial_values())
    # PyroModules choose between the global param store and module-local parameters
    # when they are built, so the guide must be built inside the same scope it runs in.
    with pyro_scope():
        if name == "delta":
            return AutoDelta(model, init_loc_fn=init)
        if name == "normal":
            return AutoNormal(model, init_loc_fn=init, init_scale=float(init_scale))
        return AutoLowRankMultivariateNormal(
            model, init_loc_fn=init, init_scale=float(init_scale), rank=rank
        )


def is_deterministic(guide: nn.Module) -> bool:
    """True when every posterior draw from ``guide`` is the same (MAP or no latents)."""
    return isinstance(guide, (AutoDelta, PointGuide))


def draw_latents(guide: nn.Module, num_draws: int) -> dict[str, torch.Tensor]:
    """``num_draws`` joint draws of every latent site from the guide, in one pass.

    Returns
    -------
    dict from site name to Tensor of shape (num_draws, *site_shape); empty for a
    :class:`PointGuide`. Must run where the guide's parameters exist (after one call).
    """
    if isinstance(guide, PointGuide):
        return {}
    if isinstance(guide, EmpiricalGuide):
        return guide.draw(num_draws)
    with pyro.plate("_draws", num_draws, dim=-2):
        values = guide()
    return {
        name: v.reshape(num_draws, *v.shape[2:])
        if v.dim() >= 2 and v.shape[:2] == (num_draws, 1)
        else v.expand(num_draws, *v.shape[1:])
        for name, v in values.items()
    }
