"""Stochastic variational inference for a :class:`~bayes_mdn.model.MixtureDensityModel`.

A plain torch optimizer trains the ELBO loss module (module-local Pyro parameters, no
global param store), on shuffled mini-batches whose likelihood the data plate scales
to the full data set, with gradient clipping, a learning-rate schedule, and early
stopping on the held-out log predictive density that restores the best state.
"""

from __future__ import annotations

import copy
import math
import operator
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from pyro.infer import JitTrace_ELBO, Trace_ELBO
from torch import Tensor, nn

from ._utils import pyro_scope, resolve_device, seeded
from .guides import PointGuide, draw_latents, is_deterministic
from .mixtures import mixture_distribution
from .model import MixtureDensityModel

__all__ = ["LR_SCHEDULES", "FitConfig", "FitHistory", "MapLoss", "fit_svi"]

LR_SCHEDULES = ("onecycle", "cosine", "constant")


@dataclass(frozen=True)
class FitConfig:
    """Settings of the SVI loop, checked when built.

    Parameters
    ----------
    epochs : maximum number of passes over the training data
    batch_size : rows per step; None uses the full training set each step
    lr : peak learning rate of Adam
    lr_schedule : "onecycle" (warm up, then anneal), "cosine" (anneal) or "constant"
    clip_norm : largest gradient norm, None for no clipping
    num_particles : ELBO particles per step, evaluated in one vectorized pass
    val_fraction : share of rows held out for early stopping (0 disables it)
    patience : epochs without a better validation score before stopping; None never
    val_draws : posterior draws used for the validation log predictive density
    jit : compile the ELBO with ``JitTrace_ELBO`` (stochastic guides; the MAP objective of
        a deterministic guide is computed directly, see :class:`MapLoss`)
    seed : seed of every random choice of the fit; None for fresh randomness
    device : "auto", "cpu", "cuda" or "cuda:N"
    progress : show a tqdm progress bar
    """

    epochs: int = 300
    batch_size: int | None = 500
    lr: float = 1e-2
    lr_schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    clip_norm: float | None = 10.0
    num_particles: int = 1
    val_fraction: float = 0.1
    patience: int | None = 60
    val_draws: int = 16
    jit: bool = False
    seed: int | None = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        def positive_int(name: str, value: object, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

        positive_int("epochs", self.epochs)
        positive_int("batch_size", self.batch_size, allow_none=True)
        positive_int("num_particles", self.num_particles)
        positive_int("patience", self.patience, allow_none=True)
        positive_int("val_draws", self.val_draws)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"
            )
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be None or > 0, got {self.clip_norm!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool)
        ):
            raise TypeError(f"seed must be an int or None, got {type(self.seed).__name__}")
        resolve_device(self.device)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FitHistory:
    """What happened during a fit, one entry per epoch.

    Attributes
    ----------
    train_loss : negative ELBO per training point, averaged over the epoch's steps
    val_nll : negative log predictive density per held-out point (empty without a split)
    best_epoch : epoch whose state was kept (0-based)
    stopped_early : True when patience ran out before ``epochs``
    steps : optimizer steps taken
    seconds : wall-clock time of the loop
    """

    train_loss: list[float] = field(default_factory=list)
    val_nll: list[float] = field(default_factory=list)
    best_epoch: int = -1
    stopped_early: bool = False
    steps: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def split_indices(n: int, val_fraction: float, seed: int | None) -> tuple[Tensor, Tensor]:
    """A seeded random split of range(n) into training and validation indices."""
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n - n_val < 1:
        raise ValueError(f"val_fraction={val_fraction} leaves no training rows out of {n}")
    with seeded(seed):
        perm = torch.randperm(n)
    return perm[n_val:], perm[:n_val]


def _make_scheduler(
    optimizer: torch.optim.Optimizer, config: FitConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if config.lr_schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=max(total_steps, 2)
        )
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=total_steps, eta_min=config.lr * 1e-2
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


@torch.no_grad()
def validation_nll(
    model: MixtureDensityModel, guide: nn.Module, x: Tensor, y: Tensor, num_draws: int
) -> float:
    """Negative log posterior-predictive density per point, log-mean-exp over draws."""
    draws = 1 if is_deterministic(guide) else num_draws
    weights = draw_latents(guide, draws)
    return -model.log_predictive_density(x, y, weights).mean().item()


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

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        *,
        subsample: Tensor | None = None,
        n_total: int | None = None,
    ) -> Tensor:
        model = self.model
        weights = self._weights(x, y, subsample, n_total)
        # The mixture is evaluated in standardized units, and the Jacobian of the map
        # back to y's units is added once: the same density the model reports, without
        # rescaling every component, and without building Pyro distribution objects.
        params = model.net((x - model.x_loc) / model.x_scale, weights)
        z = (y - model.y_loc) / model.y_scale
        if params.covariance == "diagonal":
            log_comp = (-0.5 * ((z.unsqueeze(-2) - params.loc) / params.scale).pow(2)).sum(-1)
            log_comp = log_comp - params.scale.log().sum(-1)
            log_lik = torch.logsumexp(torch.log_softmax(params.logits, -1) + log_comp, -1)
            log_lik = log_lik - 0.5 * params.event_dim * math.log(2 * math.pi)
        else:
            log_lik = mixture_distribution(params).log_prob(z)
        log_lik = log_lik - model.y_scale.log().sum()
        size = len(x) if n_total is None else n_total
        if size != len(x):
            # As Pyro's subsampled plate does: scale each term, then sum.
            log_lik = log_lik * (size / len(x))
        return -(log_lik.sum() + model.log_prior(weights))

    def _weights(
        self, x: Tensor, y: Tensor, subsample: Tensor | None, n_total: int | None
    ) -> dict[str, Tensor]:
        if isinstance(self.guide, PointGuide):
            return {}
        if self.guide.prototype_trace is None:
            # AutoDelta creates its parameters when it first runs the model.
            self.guide(x, y, subsample=subsample, n_total=n_total)
        return {name: operator.attrgetter(name)(self.guide) for name in self.model.latent_names}


def _make_loss(model: MixtureDensityModel, guide: nn.Module, config: FitConfig) -> nn.Module:
    """The loss module the loop minimizes: ``loss(x, y, subsample=idx, n_total=n)``.

    Deterministic guides get :class:`MapLoss`, the same objective as ``Trace_ELBO`` at a
    fraction of the per-step cost (particles and JIT change nothing for a point mass).
    Stochastic guides get ``Trace_ELBO`` (``JitTrace_ELBO`` with ``config.jit``), with
    particles vectorized in one pass.
    """
    if is_deterministic(guide):
        return MapLoss(model, guide)
    elbo_cls = JitTrace_ELBO if config.jit else Trace_ELBO
    elbo = elbo_cls(
        num_particles=config.num_particles,
        vectorize_particles=config.num_particles > 1,
        max_plate_nesting=1,
        ignore_jit_warnings=True,
    )
    return elbo(model, guide)


def fit_svi(
    model: MixtureDensityModel,
    guide: nn.Module,
    x: Tensor,
    y: Tensor,
    config: FitConfig = FitConfig(),
) -> FitHistory:
    """Fit ``guide`` (and the model's point-estimated weights) to (x, y) by SVI.

    Parameters
    ----------
    model : MixtureDensityModel, already on the target device
    guide : its guide (see :func:`bayes_mdn.guides.make_guide`)
    x : Tensor of shape (n, d_x)
    y : Tensor of shape (n, d_y)
    config : FitConfig

    Returns
    -------
    FitHistory. The model and guide hold the best state seen (by validation score,
    or the last state without a validation split).

    Raises
    ------
    FloatingPointError
        When the loss stops being finite. The last finite state is restored first,
        so no NaN parameters are left behind.
    """
    device = x.device
    history = FitHistory()
    start = time.perf_counter()
    with pyro_scope(), seeded(config.seed, device):
        train_idx, val_idx = split_indices(len(x), config.val_fraction, config.seed)
        train_idx, val_idx = train_idx.to(device), val_idx.to(device)
        x_train, y_train = x[train_idx], y[train_idx]
        x_val, y_val = x[val_idx], y[val_idx]
        n = len(x_train)
        batch = n if config.batch_size is None else min(config.batch_size, n)
        steps_per_epoch = math.ceil(n / batch)

        loss_fn = _make_loss(model, guide, config)
        # Autoguides create their parameters on the first call.
        loss_fn(x_train[:batch], y_train[:batch], subsample=train_idx[:batch], n_total=n)
        params = [p for p in loss_fn.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=config.lr)
        scheduler = _make_scheduler(optimizer, config, config.epochs * steps_per_epoch)

        best_score = math.inf
        best_state = copy.deepcopy(loss_fn.state_dict())
        stale = 0
        bar = _progress(config)
        for epoch in bar:
            perm = torch.randperm(n, device=device)
            losses = torch.empty(steps_per_epoch, device=device)
            for step in range(steps_per_epoch):
                idx = perm[step * batch : (step + 1) * batch]
                loss = loss_fn(x_train[idx], y_train[idx], subsample=idx, n_total=n)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.clip_norm)
                optimizer.step()
                scheduler.step()
                losses[step] = loss.detach()
            history.steps += steps_per_epoch
            epoch_loss = (losses.mean() / n).item()
            if not math.isfinite(epoch_loss):
                bad = int((~torch.isfinite(losses)).nonzero()[0])
                loss_fn.load_state_dict(best_state)
                raise FloatingPointError(
                    f"the loss became {losses[bad].item()} at step "
                    f"{epoch * steps_per_epoch + bad} (epoch {epoch}); the last finite state "
                    f"was restored. Likely causes: a learning rate too high (lr={config.lr}), "
                    "extreme or badly scaled data, or min_scale too small for the data"
                )
            history.train_loss.append(epoch_loss)
            if len(val_idx):
                with seeded(0 if config.seed is None else config.seed + 1, device):
                    score = validation_nll(model, guide, x_val, y_val, config.val_draws)
                history.val_nll.append(score)
                if score < best_score:
                    best_score, history.best_epoch, stale = score, epoch, 0
                    best_state = copy.deepcopy(loss_fn.state_dict())
                else:
                    stale += 1
                bar.set_postfix(loss=f"{epoch_loss:.4f}", val=f"{score:.4f}")
                if config.patience is not None and stale >= config.patience:
                    history.stopped_early = True
                    break
            else:
                # Without a validation split the last finite state is the one kept.
                best_state = copy.deepcopy(loss_fn.state_dict())
                history.best_epoch = epoch
                bar.set_postfix(loss=f"{epoch_loss:.4f}")
        loss_fn.load_state_dict(best_state)
    history.seconds = time.perf_counter() - start
    return history


def _progress(config: FitConfig):
    from tqdm.auto import tqdm

    return tqdm(range(config.epochs), disable=not config.progress, desc="fit", unit="epoch")
