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
    "EnsembleGuide",
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


class EnsembleGuide(nn.Module):
    """Independently fitted members pooled into one posterior: a deep ensemble.

    Each member is a (model, guide) pair fitted on its own (its own initialization,
    mini-batches and validation split). A draw first picks a member, then draws that
    member's latent weights from its guide; the draw replaces *every* parameter of the
    network, point-estimated ones included, since members differ in all of them. The
    predictive of the ensemble is therefore the equal-weight mixture of the members'
    predictives, (1/M) sum_m p(y | x, D, member m): a mixture of mixtures, itself a
    Gaussian mixture, so every exact prediction (density, CDF, quantiles, moments, modes)
    works on it unchanged. With M MAP members this is a deep ensemble (Lakshminarayanan
    et al., 2017); with Bayesian members, MultiSWAG-style (Wilson and Izmailov, 2020).

    Parameters
    ----------
    models : sequence of MixtureDensityModel
        The members' models: same architecture, same standardization.
    guides : sequence of nn.Module
        Their fitted guides, in the same order.

    Notes
    -----
    Draws are balanced: of S draws, each member gives S // M or S // M + 1, placed in a
    random order (torch's generator, so ``seeded`` applies). Members with a deterministic
    guide give the same network every time, so an ensemble of MAP members needs only M
    draws (:meth:`effective_draws`).
    """

    def __init__(self, models: list[MixtureDensityModel], guides: list[nn.Module]) -> None:
        super().__init__()
        if len(models) != len(guides) or len(models) < 1:
            raise ValueError(
                f"an ensemble needs one guide per model and at least one member, got "
                f"{len(models)} models and {len(guides)} guides"
            )
        shapes = [{n: p.shape for n, p in m.net.named_parameters()} for m in models]
        if any(s != shapes[0] for s in shapes[1:]):
            raise ValueError("every member of an ensemble must have the same network shape")
        self.models = nn.ModuleList(models)
        self.guides = nn.ModuleList(guides)

    def __len__(self) -> int:
        return len(self.models)

    @property
    def members(self) -> list[tuple[MixtureDensityModel, nn.Module]]:
        """The (model, guide) pairs."""
        return list(zip(self.models, self.guides))  # type: ignore[arg-type]

    def effective_draws(self, num_draws: int) -> int:
        """Draws needed for ``num_draws``: M when every member is deterministic."""
        if all(is_deterministic(g) for g in self.guides):
            return len(self)
        return max(num_draws, len(self))

    def assignment(self, num_draws: int) -> torch.Tensor:
        """Member of each of ``num_draws`` draws: balanced, in random order, shape (S,)."""
        members = torch.arange(num_draws) % len(self)
        return members[torch.randperm(num_draws)]

    def draw(self, num_draws: int) -> dict[str, torch.Tensor]:
        """``num_draws`` draws of every network parameter, {name: (num_draws, *shape)}."""
        which = self.assignment(num_draws)
        out: dict[str, torch.Tensor] = {}
        for m, (model, guide) in enumerate(self.members):
            idx = (which == m).nonzero().flatten()
            if not len(idx):
                continue
            latent = draw_latents(guide, len(idx))
            for name, param in model.net.named_parameters():
                value = latent.get(name)
                if value is None:
                    value = param.detach().expand(len(idx), *param.shape)
                if name not in out:
                    out[name] = param.new_empty(num_draws, *param.shape)
                out[name][idx.to(param.device)] = value
        return out

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
    if isinstance(guide, EnsembleGuide):
        return len(guide) == 1 and is_deterministic(guide.guides[0])
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
    if isinstance(guide, (EmpiricalGuide, EnsembleGuide)):
        return guide.draw(num_draws)
    with pyro.plate("_draws", num_draws, dim=-2):
        values = guide()
    return {
        name: v.reshape(num_draws, *v.shape[2:])
        if v.dim() >= 2 and v.shape[:2] == (num_draws, 1)
        else v.expand(num_draws, *v.shape[1:])
        for name, v in values.items()
    }
