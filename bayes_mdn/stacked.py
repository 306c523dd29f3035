"""Train the members of an ensemble as one stacked network.

M members of one architecture, each with its own initialization, validation split,
shuffles, input noise and ELBO draws, have their trainable tensors stacked along a
leading dimension M, and one optimizer step updates all of them. The loss is the sum of
the members' losses, whose gradients do not mix; Adam is elementwise and the gradient is
clipped per member, so each member follows the update rule it would follow alone, and
stops early on its own validation score. Only the random streams differ from M separate
fits. At MDN sizes a step is dominated by per-operation overhead, so one step of the
stack costs far less than M steps of one member (``docs/benchmarks.md`` has the ratio).

The stack covers the built-in structures whose losses are computed directly
(:class:`~bayes_mdn.losses.MapLoss` for ``AutoDelta`` or no latent weights,
:class:`~bayes_mdn.losses.MeanFieldLoss` for ``AutoNormal``); :func:`can_stack` says when.
Other guides are fitted member by member with :func:`~bayes_mdn.fit.fit_svi`.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from ._archive import ModelFileError
from ._utils import pyro_scope, seeded
from .checkpoint import (
    _data_identity,
    _plain,
    _read_checkpoint,
    _write_loop_state,
    check_checkpoint_args,
)
from .config import FitConfig, FitHistory
from .fit import (
    ParameterAverage,
    _adam,
    _cpu_threads,
    _make_scheduler,
    _progress,
    _step_module,
    split_indices,
)
from .losses import _FUSED_GUIDES, MapLoss, MeanFieldLoss, make_loss
from .model import MixtureDensityModel

__all__ = ["StackedLoss", "can_stack", "fit_stacked"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def can_stack(guides: Sequence[nn.Module]) -> bool:
    """True when these members' guides are all of one built-in kind the stack trains:
    ``AutoDelta``, ``AutoNormal``, or :class:`~bayes_mdn.guides.PointGuide`. Subclasses
    do not count: they may add sites the fused losses would not see."""
    kinds = {type(g) for g in guides}
    return len(kinds) == 1 and kinds <= set(_FUSED_GUIDES)


def _entries(loss: nn.Module) -> tuple[list, list, list]:
    """(point, loc, scale) entries of one member's fused loss, each a list of
    (name, tensor, transform or None): the trainable tensors as the loss reads them."""
    model = loss.model
    point = [(name, p, None) for name, p in model.net.named_parameters() if p.requires_grad]
    if isinstance(loss, MapLoss):
        locs = [] if loss._params is None else list(loss._params.entries)
        return point, locs, []
    return point, list(loss._locs.entries), list(loss._scales.entries)


class StackedLoss(nn.Module):
    """The negative ELBOs of M members at once, one per member.

    Built from the members' own fused losses (already called once, so that their guides'
    parameters exist); it copies their trainable tensors into stacked parameters of shape
    (M, *shape) and evaluates the first member's model on stacked weights, which the
    network evaluates in one batched pass.

    Call it as ``loss(x, y, n_total)`` with x of shape (M, B, d_x) and y of shape
    (M, B, d_y) (member m's mini-batch in row m); it returns a Tensor of shape (M,).
    """

    def __init__(self, losses: Sequence[nn.Module], num_particles: int = 1) -> None:
        super().__init__()
        kinds = {type(loss) for loss in losses}
        if len(kinds) != 1 or not kinds <= {MapLoss, MeanFieldLoss}:
            raise TypeError(f"StackedLoss needs MapLoss or MeanFieldLoss members, got {kinds}")
        # Held outside the module tree: the stack's state is the stacked tensors only.
        self._model = (losses[0].model,)
        self.mean_field = isinstance(losses[0], MeanFieldLoss)
        self.num_particles = num_particles if self.mean_field else 1
        self.members = [_entries(loss) for loss in losses]
        first = self.members[0]
        self.point_names = [name for name, _, _ in first[0]]
        self.latent_names = [name for name, _, _ in first[1]]
        self.loc_transforms = [t for _, _, t in first[1]]
        self.scale_transforms = [t for _, _, t in first[2]]

        def stack(part: int) -> nn.ParameterList:
            return nn.ParameterList(
                nn.Parameter(torch.stack([m[part][i][1].detach() for m in self.members]))
                for i in range(len(first[part]))
            )

        self.point = stack(0)
        self.locs = stack(1)
        self.scales = stack(2)
        # Fixed tensors that differ by member (a randomized prior function's weights):
        # stacked too, so that each member keeps its own; not trained, not in the state.
        nets = [loss.model.net for loss in losses]
        self.fixed_names = [
            name
            for name, p in nets[0].named_parameters()
            if not p.requires_grad and name not in losses[0].model.latent_shapes
        ]
        for i, name in enumerate(self.fixed_names):
            value = torch.stack([net.get_parameter(name).detach() for net in nets])
            self.register_buffer(f"_fixed_{i}", value, persistent=False)

    @property
    def model(self) -> MixtureDensityModel:
        """The first member's model, which evaluates every member's stacked weights."""
        return self._model[0]

    @property
    def fixed(self) -> list[Tensor]:
        """The stacked fixed tensors, one per name of ``fixed_names``."""
        return [getattr(self, f"_fixed_{i}") for i in range(len(self.fixed_names))]

    @property
    def n_members(self) -> int:
        return len(self.members)

    def _constrained(self, part: Sequence[Tensor], transforms: list) -> list[Tensor]:
        return [p if t is None else t(p) for p, t in zip(part, transforms)]

    def forward(self, x: Tensor, y: Tensor, n_total: int, members: Tensor | None = None) -> Tensor:
        """Negative ELBO of each member, shape (M,); with ``members`` (indices), of those
        members only, x and y holding their batches in that order (the others get no
        gradient and cost nothing)."""
        p = self.num_particles
        weights: dict[str, Tensor] = {}
        latent: dict[str, Tensor] = {}

        def pick(part: Sequence[Tensor]) -> list[Tensor]:
            return list(part) if members is None else [t[members] for t in part]

        m = self.n_members if members is None else len(members)
        log_q = x.new_zeros(m, p)
        locs = self._constrained(pick(self.locs), self.loc_transforms)
        if self.mean_field:
            scales = self._constrained(pick(self.scales), self.scale_transforms)
            for name, loc, scale in zip(self.latent_names, locs, scales):
                shape = (m, p, *loc.shape[1:])
                eps = torch.empty(shape, dtype=loc.dtype, device=loc.device).normal_()
                value = loc.unsqueeze(1) + eps * scale.unsqueeze(1)
                numel = loc[0].numel()
                log_q = (
                    log_q
                    - 0.5 * eps.flatten(2).pow(2).sum(-1)
                    - (scale.log().flatten(1).sum(-1) + numel * _HALF_LOG_2PI).unsqueeze(1)
                )
                latent[name] = value
        else:
            latent = {name: loc.unsqueeze(1) for name, loc in zip(self.latent_names, locs)}
        for name, value in zip(
            [*self.point_names, *self.fixed_names], pick(self.point) + pick(self.fixed)
        ):
            weights[name] = value if p == 1 else value.repeat_interleave(p, 0)
        for name, value in latent.items():
            weights[name] = value.flatten(0, 1)
        if p > 1:
            x, y = x.repeat_interleave(p, 0), y.repeat_interleave(p, 0)
        batch = x.shape[-2]
        log_lik = self.model.log_density(x, y, weights).sum(-1).view(m, p)
        log_lik = log_lik * (n_total / batch)
        log_prior = self.model.log_prior(latent) if latent else 0.0
        return -(log_lik + log_prior - log_q).mean(1)

    @torch.no_grad()
    def member_weights(self, member: int, eps: Mapping[str, Tensor] | None = None) -> dict:
        """Member ``member``'s weights: every point estimate and, per latent site, its
        location (MAP) or ``loc + eps * scale`` for the given standard normals of shape
        (S, *site_shape) (mean field)."""
        weights = {
            name: p[member]
            for name, p in zip([*self.point_names, *self.fixed_names], [*self.point, *self.fixed])
        }
        locs = self._constrained(self.locs, self.loc_transforms)
        if self.mean_field and eps is not None:
            scales = self._constrained(self.scales, self.scale_transforms)
            for name, loc, scale in zip(self.latent_names, locs, scales):
                weights[name] = loc[member] + eps[name] * scale[member]
        else:
            for name, loc in zip(self.latent_names, locs):
                weights[name] = loc[member]
        return weights

    @torch.no_grad()
    def unstack(self, state: Mapping[str, Tensor] | None = None) -> None:
        """Copy each member's slice of ``state`` (this module's state dict; default its
        live state) back into the member's own model and guide."""
        state = dict(self.state_dict()) if state is None else state
        for part_index, part in enumerate(("point", "locs", "scales")):
            for i in range(len(self.members[0][part_index])):
                stacked = state[f"{part}.{i}"]
                for m, member in enumerate(self.members):
                    member[part_index][i][1].copy_(stacked[m])


def _per_member_grad_clip(params: Sequence[Tensor], max_norm: float) -> None:
    """Clip each member's gradient (its slice along dim 0 of every tensor) to
    ``max_norm``, as ``clip_grad_norm_`` clips a single member's."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch.stack([g.flatten(1).pow(2).sum(-1) for g in grads]).sum(0).sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))


def _shuffles(n_members: int, n: int, device: torch.device) -> Tensor:
    """One random permutation of range(n) per member, shape (n_members, n).

    ``randperm`` per member: sorting uniforms (``rand(...).argsort``) costs about ten times
    as much, a few milliseconds an epoch at 10,000 rows (a sort against a shuffle).
    """
    return torch.stack([torch.randperm(n, device=device) for _ in range(n_members)])


def fit_stacked(
    models: Sequence[MixtureDensityModel],
    guides: Sequence[nn.Module],
    x: Tensor,
    y: Tensor,
    config: FitConfig,
    seeds: Sequence[int | None],
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
    identity: Mapping[str, object] | None = None,
) -> list[FitHistory]:
    """Fit M members (same architecture, one guide kind: see :func:`can_stack`) to (x, y)
    as one stacked network, in place.

    Parameters
    ----------
    models, guides : the members, as :meth:`~bayes_mdn.spec.ModelSpec.build` makes them (each
        initialized from its own seed); they share the standardization of x and y
    x : Tensor of shape (n, d_x)
    y : Tensor of shape (n, d_y)
    config : the loop's settings, as for :func:`~bayes_mdn.fit.fit_svi`. ``config.seed``
        seeds the loop's random stream (shuffles, input noise, ELBO draws)
    seeds : member m's seed: its validation split is ``split_indices(n, val_fraction,
        seeds[m])``, as a member fitted alone would hold out
    checkpoint, checkpoint_every, resume, identity : as for
        :func:`~bayes_mdn.fit.fit_svi`; one checkpoint file holds every member

    Returns
    -------
    One FitHistory per member. ``steps`` counts the steps until the member stopped
    (every member's steps are taken together; ``seconds`` is the shared wall time).
    Each member's model and guide hold its best state.

    Raises
    ------
    FloatingPointError
        When an active member's loss or parameters stop being finite; every member's
        best state is restored first.
    """
    check_checkpoint_args(checkpoint, checkpoint_every, resume)
    if len(models) != len(guides) or len(models) != len(seeds) or not models:
        raise ValueError("fit_stacked needs as many models, guides and seeds, at least one")
    if not can_stack(guides):
        raise TypeError(
            "fit_stacked trains AutoDelta, AutoNormal or PointGuide members of one kind, "
            f"got {sorted({type(g).__name__ for g in guides})}"
        )
    device = x.device
    n_members = len(models)
    histories = [FitHistory() for _ in models]
    start = time.perf_counter()
    data = _data_identity(x, y) if checkpoint is not None else {}
    settings = None if identity is None else _plain(dict(identity))
    with pyro_scope(), seeded(config.seed, device), _cpu_threads(config.num_threads, device):
        splits = [split_indices(len(x), config.val_fraction, s) for s in seeds]
        train_idx = torch.stack([t for t, _ in splits]).to(device)
        val_idx = [v.to(device) for _, v in splits]
        n = train_idx.shape[1]
        batch, epochs, eval_every, patience = config.schedule(n)
        steps_per_epoch = math.ceil(n / batch)
        for h in histories:
            h.epochs = epochs

        losses = []
        for model, guide, idx in zip(models, guides, train_idx):
            loss = make_loss(model, guide, replace(config, num_particles=1))
            # Autoguides create their parameters on the first call.
            first = idx[:batch]
            loss(x[first], y[first], subsample=first, n_total=n)
            losses.append(loss)
        stack = StackedLoss(losses, config.num_particles).to(device)
        params = [p for p in stack.parameters() if p.requires_grad]
        optimizer = _adam(params, config.lr, device)
        scheduler = _make_scheduler(optimizer, config, epochs * steps_per_epoch)
        scheduled = config.lr_schedule != "constant"
        step_loss = _step_module(stack, config, device, epochs * steps_per_epoch, True)

        live_state = stack.state_dict()
        best_state = {k: v.clone() for k, v in live_state.items()}
        best_score = [math.inf] * n_members
        stale = [0] * n_members
        active = [True] * n_members
        has_val = config.val_fraction > 0 and all(len(v) for v in val_idx)
        # Fixed standard normals for each member's validation draws (common random
        # numbers across checks, as fit_svi's seeded validation draws are).
        val_eps = _validation_normals(stack, config, seeds, device) if has_val else None
        first_epoch = 0
        average = ParameterAverage(stack, config.ema_decay)
        if resume and os.path.exists(checkpoint):  # type: ignore[arg-type]
            saved = _read_checkpoint(checkpoint, config, settings, data, stack)  # type: ignore[arg-type]
            first_epoch, best_score, stale, active, best_state, histories = _restore(
                saved, stack, optimizer, scheduler, device
            )
            average.load_state_dict(saved.get("average"))
            if not any(active):
                first_epoch = epochs
        elapsed = histories[0].seconds
        max_grad_norm = None if config.clip_norm is None else config.clip_norm * n
        noise_scale = config.input_noise * stack.model.x_scale
        bar = _progress(config, epochs, first_epoch)
        for epoch in bar:
            order = train_idx.gather(1, _shuffles(n_members, n, device))
            epoch_losses = torch.empty(steps_per_epoch, n_members, device=device)
            # Members that have stopped are left out of the steps: their best state is
            # kept already, and what the optimizer does to their live slice is discarded.
            live = (
                None
                if all(active)
                else torch.tensor([m for m in range(n_members) if active[m]], device=device)
            )
            if live is not None:
                order = order[live]
                epoch_losses.fill_(math.nan)
            for step in range(steps_per_epoch):
                idx = order[:, step * batch : (step + 1) * batch]
                x_batch = x[idx]
                if config.input_noise > 0:
                    x_batch = x_batch + noise_scale * torch.randn_like(x_batch)
                member_loss = step_loss(x_batch, y[idx], n, live)
                optimizer.zero_grad(set_to_none=True)
                member_loss.sum().backward()
                if max_grad_norm is not None:
                    _per_member_grad_clip(params, max_grad_norm)
                optimizer.step()
                average.update()
                if scheduled:
                    scheduler.step()
                if live is None:
                    epoch_losses[step] = member_loss.detach()
                else:
                    epoch_losses[step, live] = member_loss.detach()
            mean_loss = (epoch_losses.mean(0) / n).tolist()
            finite_params = torch.stack([torch.isfinite(p).flatten(1).all(1) for p in params])
            finite = [
                math.isfinite(v) and ok for v, ok in zip(mean_loss, finite_params.all(0).tolist())
            ]
            bad = [m for m in range(n_members) if active[m] and not finite[m]]
            if bad:
                stack.unstack(best_state)
                raise FloatingPointError(
                    f"member {bad[0]}'s loss or parameters became non-finite in epoch "
                    f"{epoch}; every member's last finite state was restored. Likely "
                    f"causes: a learning rate too high (lr={config.lr}), extreme or badly "
                    "scaled data, or min_scale too small for the data"
                )
            last = epoch + 1 == epochs
            check = has_val and ((epoch + 1) % eval_every == 0 or last)
            # Validation scores, and a best state keeps, the parameter average.
            with average.applied() if check or not has_val else contextlib.nullcontext():
                scores = _validation_scores(stack, x, y, val_idx, val_eps) if check else None
                _record_round(
                    histories,
                    [m for m in range(n_members) if active[m]],
                    epoch,
                    steps_per_epoch,
                    mean_loss,
                    scores,
                    has_val=has_val,
                    stale_unit=1,
                    patience=patience,
                    last=last,
                    tracking=(best_score, stale, active),
                    states=(best_state, live_state),
                )
            # Members that stopped before this epoch have no loss in it (NaN).
            live_losses = [v for v in mean_loss if math.isfinite(v)]
            bar.set_postfix(
                loss=f"{sum(live_losses) / max(len(live_losses), 1):.4f}",
                active=sum(active),
                refresh=False,
            )
            done = not any(active)
            if checkpoint is not None and ((epoch + 1) % checkpoint_every == 0 or last or done):
                for h in histories:
                    h.seconds = elapsed + time.perf_counter() - start
                _write(
                    checkpoint,
                    epoch + 1,
                    config,
                    settings,
                    data,
                    stack,
                    optimizer,
                    scheduler,
                    histories,
                    best_state,
                    best_score,
                    stale,
                    active,
                    device,
                    average,
                )
            if done:
                break
        stack.unstack(best_state)
    seconds = elapsed + time.perf_counter() - start
    for h in histories:
        h.seconds = seconds
    return histories


def _record_round(
    histories: Sequence[FitHistory],
    members: Sequence[int],
    index: int,
    steps: int,
    mean_loss: Sequence[float],
    scores: Sequence[float] | None,
    *,
    has_val: bool,
    stale_unit: int,
    patience: int | None,
    last: bool,
    tracking: tuple[list[float], list[int], list[bool]],
    states: tuple[dict[str, Tensor], Mapping[str, Tensor]],
) -> None:
    """Book one round of a stacked fit (an epoch, or a streamed fit's validation round).

    For each of ``members`` (the live ones): its steps and mean training loss; with a
    validation score, the score, the best state when the score improves, how stale the
    best is (rounds since it, times ``stale_unit``, in the unit of ``patience``) and an
    early stop once that reaches ``patience`` (never in the ``last`` round). Without a
    held-out split every round is the best and the whole live state is kept. ``tracking``
    (best score, staleness, live flag per member) and ``states`` (the best state, stacked
    by member, and the live one) are updated in place; ``scores`` is None in a round
    without a validation check.
    """
    best_score, stale, active = tracking
    best_state, live_state = states
    for m in members:
        h = histories[m]
        h.steps += steps
        h.train_loss.append(mean_loss[m])
        if not has_val:
            h.best_epoch = index
            continue
        if scores is None:
            continue
        h.val_nll.append(scores[m])
        h.val_epochs.append(index)
        if scores[m] < best_score[m]:
            best_score[m], h.best_epoch, stale[m] = scores[m], index, 0
            with torch.no_grad():
                for key, value in live_state.items():
                    best_state[key][m].copy_(value[m])
        else:
            stale[m] = (index - h.best_epoch) * stale_unit
        if patience is not None and stale[m] >= patience and not last:
            h.stopped_early = True
            active[m] = False
    if not has_val:
        with torch.no_grad():
            for key, value in live_state.items():
                best_state[key].copy_(value)


def _validation_normals(
    stack: StackedLoss, config: FitConfig, seeds: Sequence[int | None], device: torch.device
) -> list[dict[str, Tensor]] | None:
    if not stack.mean_field:
        return None
    out = []
    for seed in seeds:
        with seeded(0 if seed is None else seed + 1, device):
            out.append(
                {
                    name: torch.randn(
                        config.val_draws,
                        *loc.shape[1:],
                        dtype=loc.dtype,
                        device=loc.device,
                    )
                    for name, loc in zip(stack.latent_names, stack.locs)
                }
            )
    return out


@torch.no_grad()
def _validation_scores(
    stack: StackedLoss,
    x: Tensor,
    y: Tensor,
    val_idx: Sequence[Tensor],
    val_eps: list[dict[str, Tensor]] | None,
) -> list[float]:
    """Each member's negative log predictive density per point of its own held-out rows."""
    scores = []
    for m, idx in enumerate(val_idx):
        weights = stack.member_weights(m, None if val_eps is None else val_eps[m])
        log_p = stack.model.log_predictive_density(x[idx], y[idx], weights)
        scores.append(-log_p.mean().item())
    return scores


def _write(
    path: str | os.PathLike[str],
    next_epoch: int,
    config: FitConfig,
    identity: object,
    data: dict[str, object],
    stack: StackedLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    histories: list[FitHistory],
    best_state: dict,
    best_score: list[float],
    stale: list[int],
    active: list[bool],
    device: torch.device,
    average: ParameterAverage,
) -> None:
    _write_loop_state(
        path,
        next_epoch,
        config,
        identity,
        data,
        (stack, optimizer, scheduler),
        device,
        {
            "members": [h.to_dict() for h in histories],
            "best_score": list(best_score),
            "stale": list(stale),
            "active": list(active),
            "best_state": dict(best_state),
            "average": average.state_dict(),
        },
    )


def _restore(
    saved: dict,
    stack: StackedLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
) -> tuple[int, list[float], list[int], list[bool], dict, list[FitHistory]]:
    members = saved.get("members")
    if not isinstance(members, list) or len(members) != stack.n_members:
        raise ModelFileError(
            f"the checkpoint does not hold {stack.n_members} stacked members; resume with "
            "the settings that wrote it or start a new checkpoint"
        )
    stack.load_state_dict(saved["state"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["cpu"])
    if device.type == "cuda" and "cuda" in saved["rng"]:
        torch.cuda.set_rng_state(saved["rng"]["cuda"], device)
    best_state = {k: v.to(device) for k, v in saved["best_state"].items()}
    return (
        int(saved["epoch"]),
        [float(s) for s in saved["best_score"]],
        [int(s) for s in saved["stale"]],
        [bool(a) for a in saved["active"]],
        best_state,
        [FitHistory(**h) for h in members],
    )
