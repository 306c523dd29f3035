"""Stochastic variational inference for a :class:`~bayes_mdn.model.MixtureDensityModel`.

A plain torch optimizer trains the ELBO loss module (module-local Pyro parameters, no
global param store), on shuffled mini-batches whose likelihood the data plate scales
to the full data set, with gradient clipping, a learning-rate schedule, a moving average
of the parameters (Polyak averaging), and early stopping on the held-out log predictive
density of that average that restores its best state.

This module owns the loop (:func:`fit_svi`) and its parts that the stacked and streamed
loops share (the validation split, optimizer, schedule, thread scope, progress bar). The
loop's settings live in :mod:`bayes_mdn.config`, the loss modules in
:mod:`bayes_mdn.losses`, checkpoints in :mod:`bayes_mdn.checkpoint` and NUTS in
:mod:`bayes_mdn.mcmc`; the public names of those are importable from here too.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ._utils import pyro_scope, seeded
from .checkpoint import (
    CHECKPOINT_VERSION,
    _data_identity,
    _plain,
    _read_checkpoint,
    _restore_loop,
    _write_checkpoint,
    check_checkpoint_args,
    checkpoint_identity,
)
from .config import (
    AUTO_PATIENCE_STEPS,
    AUTO_STEPS,
    EVAL_STEPS,
    LR_SCHEDULES,
    FitConfig,
    FitHistory,
)
from .guides import draw_latents, is_deterministic
from .losses import MapLoss, MeanFieldLoss, fused_loss_applies, make_loss
from .mcmc import NUTSConfig, fit_nuts
from .model import MixtureDensityModel

__all__ = [
    "AUTO_PATIENCE_STEPS",
    "AUTO_STEPS",
    "CHECKPOINT_VERSION",
    "EVAL_STEPS",
    "LR_SCHEDULES",
    "FitConfig",
    "FitHistory",
    "MapLoss",
    "MeanFieldLoss",
    "NUTSConfig",
    "ParameterAverage",
    "check_checkpoint_args",
    "checkpoint_identity",
    "fit_nuts",
    "fit_svi",
    "fused_loss_applies",
    "make_loss",
]


#: What ``jit=True`` (deprecated, no effect) warns.
JIT_DEPRECATED = (
    "jit is deprecated and does nothing (the built-in losses are computed directly and "
    "Pyro's JitTrace_ELBO cannot run on module-local parameters; compile=True compiles "
    "the step); it will be removed in bayes_mdn 0.3"
)


def split_indices(n: int, val_fraction: float, seed: int | None) -> tuple[Tensor, Tensor]:
    """A seeded random split of range(n) into training and validation indices."""
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n - n_val < 1:
        raise ValueError(f"val_fraction={val_fraction} leaves no training rows out of {n}")
    with seeded(seed):
        perm = torch.randperm(n)
    return perm[n_val:], perm[:n_val]


def _adam(params: Sequence[Tensor], lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam, with the fused kernel where torch has one (CPU and CUDA): one call updates
    every tensor, where the default per-tensor loop pays Python overhead per tensor and
    step. The same update rule; rounding may differ in the last bits."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


def _step_module(
    module: nn.Module, config: FitConfig, device: torch.device, planned: int, stacked: bool
) -> nn.Module:
    """The loss module the training steps call: ``module`` itself, or a
    :class:`_CompiledStep` of it when ``config.compiles(device, planned, stacked)``. The
    module keeps the parameters either way (states, checkpoints and validation read it).
    ``compile="auto"`` compiles only the library's own losses (:class:`MapLoss`,
    :class:`MeanFieldLoss` and their stack), not Pyro's ``Trace_ELBO`` of other guides."""
    if not config.compiles(device, planned, stacked):
        return module
    auto = config.compile == "auto"
    # "auto" never compiles a stacked step (FitConfig.compiles), so here module is one
    # network's loss.
    if auto and not isinstance(module, (MapLoss, MeanFieldLoss)):
        return module
    return _CompiledStep(module, fallback=auto)


class _CompiledStep(nn.Module):
    """``torch.compile`` of a loss module for the steps of the first batch shape it sees
    (the full batch); other shapes (a short last batch, members that have stopped) run
    the module eagerly instead of compiling again. Random draws inside the step (the
    ELBO's reparameterized samples) come from torch's own generator (Inductor's
    ``fallback_random``), so that a seeded compiled fit draws what the eager one does.

    With ``fallback`` (``compile="auto"``) the first call compiles the forward and, by a
    trial gradient that changes no parameter, the backward inside a ``try``, then puts
    the random state back: a compile that fails warns and the fit goes on eagerly, with
    the draws of an eager fit. With ``compile=True`` errors are raised."""

    def __init__(self, module: nn.Module, fallback: bool = False) -> None:
        super().__init__()
        self.module = module
        self.fallback = fallback
        # Not registered as a submodule: the parameters are the module's, listed once.
        self.__dict__["compiled"] = None if fallback else self._compile()
        self.shape: torch.Size | None = None

    def _compile(self):
        return torch.compile(self.module, dynamic=False, options={"fallback_random": True})

    def _try_compile(self, x: Tensor, *args, **kwargs) -> None:
        state = torch.random.get_rng_state()
        try:
            compiled = self._compile()
            params = [p for p in self.module.parameters() if p.requires_grad]
            out = compiled(x, *args, **kwargs)
            torch.autograd.grad(out.sum(), params, allow_unused=True)
            self.__dict__["compiled"] = compiled
        except Exception as err:  # any compiler failure; real errors recur eagerly
            warnings.warn(
                f"compiling the training step failed ({type(err).__name__}: "
                f"{str(err)[:200]}); fitting eagerly instead (compile=False skips the "
                "attempt)",
                RuntimeWarning,
                stacklevel=3,
            )
        finally:
            torch.random.set_rng_state(state)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.shape is None:
            self.shape = x.shape
            if self.fallback:
                self._try_compile(x, *args, **kwargs)
        compiled = self.__dict__["compiled"]
        step = compiled if compiled is not None and x.shape == self.shape else self.module
        return step(x, *args, **kwargs)


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


class ParameterAverage:
    """Exponential moving average of a module's trainable parameters (Polyak averaging),
    for ``FitConfig.ema_decay``; with ``decay`` None it does nothing.

    :meth:`update` after each optimizer step; :meth:`applied` puts the average into the
    module's parameters for a ``with`` block (validation, keeping a best state) and the
    live ones back after it. The weight of update t is 1 - min(decay, (1 + t) / (10 + t)),
    so early averages are not anchored at the initialization.
    """

    def __init__(self, module: nn.Module, decay: float | None) -> None:
        self.decay = decay
        named = [(k, p) for k, p in module.named_parameters() if p.requires_grad]
        self.names = [k for k, _ in named]
        self.params = [p for _, p in named]
        self.updates = 0
        self.average = [p.detach().clone() for p in self.params] if decay else []

    @torch.no_grad()
    def update(self) -> None:
        if not self.decay:
            return
        self.updates += 1
        weight = 1.0 - min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, p in zip(self.average, self.params):
            avg.lerp_(p, weight)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        if not self.decay:
            yield
            return
        with torch.no_grad():
            live = [p.detach().clone() for p in self.params]
            for p, avg in zip(self.params, self.average):
                p.copy_(avg)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.params, live):
                    p.copy_(value)

    def state_dict(self) -> dict | None:
        """What a checkpoint keeps: None when averaging is off."""
        if not self.decay:
            return None
        return {"updates": self.updates, "average": dict(zip(self.names, self.average))}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, object] | None) -> None:
        """Put back a :meth:`state_dict`; None (a checkpoint written without an average)
        restarts the average from the current parameters."""
        if not self.decay:
            return
        if state is None:
            self.updates = 0
            for avg, p in zip(self.average, self.params):
                avg.copy_(p)
            return
        saved = state["average"]
        if not isinstance(saved, Mapping) or sorted(saved) != sorted(self.names):
            raise ValueError("the checkpoint's parameter average does not match the model")
        self.updates = int(state["updates"])  # type: ignore[call-overload]
        for name, avg in zip(self.names, self.average):
            avg.copy_(saved[name])


@torch.no_grad()
def validation_nll(
    model: MixtureDensityModel, guide: nn.Module, x: Tensor, y: Tensor, num_draws: int
) -> float:
    """Negative log posterior-predictive density per point, log-mean-exp over draws.

    Rows are evaluated in chunks (``model.log_predictive_density``), so memory stays
    bounded however large the validation split.
    """
    draws = 1 if is_deterministic(guide) else num_draws
    weights = draw_latents(guide, draws)
    return -model.log_predictive_density(x, y, weights).mean().item()


@contextlib.contextmanager
def _cpu_threads(num_threads: int | None, device: torch.device) -> Iterator[None]:
    """Use ``num_threads`` torch threads for a CPU fit, then restore the caller's."""
    if num_threads is None or device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_svi(
    model: MixtureDensityModel,
    guide: nn.Module,
    x: Tensor,
    y: Tensor,
    config: FitConfig = FitConfig(),
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
    identity: Mapping[str, object] | None = None,
) -> FitHistory:
    """Fit ``guide`` (and the model's point-estimated weights) to (x, y) by SVI.

    Parameters
    ----------
    model : MixtureDensityModel, already on the target device
    guide : its guide (see :func:`bayes_mdn.guides.make_guide`)
    x : Tensor of shape (n, d_x)
    y : Tensor of shape (n, d_y)
    config : FitConfig
    checkpoint : file for checkpoints of the loop, written atomically every
        ``checkpoint_every`` epochs and after the last one: model and guide state,
        optimizer, learning-rate schedule, random state, epoch, history, best state and
        early-stopping counters. None writes none.
    checkpoint_every : epochs between checkpoints
    resume : continue from ``checkpoint`` when that file exists (else start afresh). The
        resumed fit ends at the same parameters as an uninterrupted one (bit-identical on
        the CPU when both run compiled or both eager; equal up to float rounding when
        ``compile`` resolves differently). The checkpoint must come from the same loop
        settings (``progress`` and ``compile`` aside), the same ``identity``, a model and
        guide of the same parameter names, shapes and dtypes and with the same constants
        (buffers such as the prior scales and the standardization), and the same data;
        else ``ValueError`` names each setting that differs, with the checkpoint's value
        and the new one.
    identity : the settings that shape the model and guide but that the loop cannot see
        (activation, min_scale, init_scale, ...: :class:`~bayes_mdn.BayesianMDN` passes
        its constructor arguments, see :func:`~bayes_mdn.checkpoint.checkpoint_identity`).
        JSON-like values (numbers, strings, None, lists, mappings); anything else is
        compared by its ``repr``. Stored in each checkpoint and compared on resume; None
        skips that comparison (the structural ones remain).

    Returns
    -------
    FitHistory. The model and guide hold the best state seen (by validation score,
    or the last state without a validation split); with ``config.ema_decay`` that state
    is the parameter average (:class:`ParameterAverage`), not an iterate.

    Raises
    ------
    FloatingPointError
        When the loss stops being finite. The last finite state is restored first,
        so no NaN parameters are left behind.
    """
    check_checkpoint_args(checkpoint, checkpoint_every, resume)
    if config.jit:
        warnings.warn(JIT_DEPRECATED, FutureWarning, stacklevel=2)
    device = x.device
    history = FitHistory()
    start = time.perf_counter()
    data = _data_identity(x, y) if checkpoint is not None else {}
    settings = None if identity is None else _plain(dict(identity))
    with pyro_scope(), seeded(config.seed, device), _cpu_threads(config.num_threads, device):
        train_idx, val_idx = split_indices(len(x), config.val_fraction, config.seed)
        train_idx, val_idx = train_idx.to(device), val_idx.to(device)
        x_train, y_train = x[train_idx], y[train_idx]
        x_val, y_val = x[val_idx], y[val_idx]
        n = len(x_train)
        batch, epochs, eval_every, patience = config.schedule(n)
        history.epochs = epochs
        steps_per_epoch = math.ceil(n / batch)

        loss_fn = make_loss(model, guide, config)
        # Autoguides create their parameters on the first call.
        loss_fn(x_train[:batch], y_train[:batch], subsample=train_idx[:batch], n_total=n)
        params = [p for p in loss_fn.parameters() if p.requires_grad]
        optimizer = _adam(params, config.lr, device)
        scheduler = _make_scheduler(optimizer, config, epochs * steps_per_epoch)
        step_loss = _step_module(loss_fn, config, device, epochs * steps_per_epoch, False)
        # A constant rate needs no step (the scheduler's Python call is ~1% of a step).
        scheduled = config.lr_schedule != "constant"

        best_score = math.inf
        # Detached aliases of the live parameters: the optimizer and load_state_dict update
        # them in place, so keeping a state is a copy_ per tensor (a deepcopy of the state
        # dict every epoch cost about 6% of a small fit's time).
        live_state = loss_fn.state_dict()
        best_state = {k: v.clone() for k, v in live_state.items()}
        average = ParameterAverage(loss_fn, config.ema_decay)
        stale = 0
        first_epoch = 0
        if resume and os.path.exists(checkpoint):  # type: ignore[arg-type]
            saved = _read_checkpoint(
                checkpoint,  # type: ignore[arg-type]
                config,
                settings,
                data,
                loss_fn,
            )
            first_epoch, best_score, stale, best_state, history = _restore_loop(
                saved, loss_fn, optimizer, scheduler, device
            )
            average.load_state_dict(saved.get("average"))
            if history.stopped_early:
                first_epoch = epochs
        elapsed = history.seconds
        # The ELBO is a sum over n rows: clip its gradient at the per-point threshold times n.
        max_grad_norm = None if config.clip_norm is None else config.clip_norm * n
        # input_noise is in standardized units; the model standardizes x itself.
        noise_scale = config.input_noise * model.x_scale
        bar = _progress(config, epochs, first_epoch)
        for epoch in bar:
            perm = torch.randperm(n, device=device)
            losses = torch.empty(steps_per_epoch, device=device)
            for step in range(steps_per_epoch):
                idx = perm[step * batch : (step + 1) * batch]
                x_batch = x_train[idx]
                if config.input_noise > 0:
                    x_batch = x_batch + noise_scale * torch.randn_like(x_batch)
                loss = step_loss(x_batch, y_train[idx], subsample=idx, n_total=n)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                average.update()
                if scheduled:
                    scheduler.step()
                losses[step] = loss.detach()
            history.steps += steps_per_epoch
            epoch_loss = (losses.mean() / n).item()
            # The loss of a step is taken before its update, so a finite loss can still
            # leave non-finite parameters behind: check both before keeping any state.
            if not (math.isfinite(epoch_loss) and _all_finite(params)):
                finite = torch.isfinite(losses)
                bad = int((~finite).nonzero()[0]) if not finite.all() else steps_per_epoch - 1
                what = (
                    "the parameters became non-finite"
                    if finite.all()
                    else f"the loss became {losses[bad].item()}"
                )
                loss_fn.load_state_dict(best_state)
                raise FloatingPointError(
                    f"{what} at step {epoch * steps_per_epoch + bad} (epoch {epoch}); the "
                    "last finite state was restored. Likely causes: a learning rate too high "
                    f"(lr={config.lr}), extreme or badly scaled data, or min_scale too small "
                    "for the data"
                )
            history.train_loss.append(epoch_loss)
            last = epoch + 1 == epochs
            if not len(val_idx):
                # Without a validation split the last (average) state is the one kept.
                with average.applied():
                    _copy_state(live_state, best_state)
                history.best_epoch = epoch
                bar.set_postfix(loss=f"{epoch_loss:.4f}", refresh=False)
            elif (epoch + 1) % eval_every == 0 or last:
                with average.applied():
                    with seeded(0 if config.seed is None else config.seed + 1, device):
                        score = validation_nll(model, guide, x_val, y_val, config.val_draws)
                    improved = score < best_score
                    if improved:
                        _copy_state(live_state, best_state)
                history.val_nll.append(score)
                history.val_epochs.append(epoch)
                if improved:
                    best_score, history.best_epoch, stale = score, epoch, 0
                else:
                    # stale counts epochs since the best validation score.
                    stale = epoch - history.best_epoch
                bar.set_postfix(loss=f"{epoch_loss:.4f}", val=f"{score:.4f}", refresh=False)
                if patience is not None and stale >= patience and not last:
                    history.stopped_early = True
            if checkpoint is not None and (
                (epoch + 1) % checkpoint_every == 0 or last or history.stopped_early
            ):
                history.seconds = elapsed + time.perf_counter() - start
                _write_checkpoint(
                    checkpoint,
                    epoch + 1,
                    config,
                    settings,
                    data,
                    loss_fn,
                    optimizer,
                    scheduler,
                    history,
                    best_state,
                    best_score,
                    stale,
                    device,
                    average,
                )
            if history.stopped_early:
                break
        loss_fn.load_state_dict(best_state)
    history.seconds = elapsed + time.perf_counter() - start
    return history


def _progress(config: FitConfig, epochs: int, first_epoch: int = 0, unit: str = "epoch"):
    from tqdm.auto import tqdm

    return tqdm(
        range(first_epoch, epochs),
        initial=first_epoch,
        total=epochs,
        disable=not config.progress,
        desc="fit",
        unit=unit,
    )


def _copy_state(source: dict[str, Tensor], target: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for key, value in source.items():
            target[key].copy_(value)


def _all_finite(params: Sequence[Tensor]) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())
