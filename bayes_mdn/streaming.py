"""The SVI loop over streamed data, in one process or data-parallel on several (DDP).

The rows of a :class:`~bayes_mdn.sources.Source` are read in the same order on every pass
and cut into *windows* of ``window_rows`` consecutive rows. Everything random about the
data is a function of (seed, window), never of the number of processes:

- **held-out rows**: each row gets a uniform u from ``default_rng([seed, 1, window])``;
  the rows with the smallest u, at most ``val_fraction`` of them and at most
  ``max_val_rows``, are the validation set, kept in memory. The first pass (the *scan*)
  finds them, counts the rows and takes the standardization from running moments
  (:class:`~bayes_mdn.sources.RunningMoments`, over every row, as the in-memory fit).
- **shuffling**: each epoch permutes each window's training rows with
  ``default_rng([seed, 2, epoch, window])``; consecutive global batches of
  ``batch_size`` rows are cut from that stream (a batch may span two windows; the
  last ``n_train mod batch_size`` rows of an epoch are left out of it).

Memory is a window, the held-out rows and the model: flat in the number of rows.

**Data-parallel training.** With ``devices=W`` Lightning Fabric starts W processes
(gloo on the CPU, forked on Linux with one thread a process; NCCL on GPUs, spawned: see
:func:`_strategy`) and wraps the stacked loss in
``DistributedDataParallel``. Every process reads the stream and keeps its slice of each
global batch: rows ``[r * b, (r + 1) * b)`` with ``b = batch_size / W``. Process r's loss
is ``-(n_train / b) * sum_{i in slice r} log p(y_i | x_i, w) - log p(w) + log q(w)``, and
every process draws the same weights w and input noise (the same seed, and the noise is
drawn for the global batch and sliced). DDP averages the gradients over the W processes,
so the update is the gradient of ``-(n_train / batch_size) * sum_{i in batch} log p(y_i |
x_i, w) - log p(w) + log q(w)``: exactly the one-process objective for the same global
batch (to rounding). Validation rows are split over the processes and their log
densities summed with one all-reduce. Rank 0 writes the checkpoints; a checkpoint holds
no trace of W, so it resumes on any number of processes. An error raised in a worker (a
``FloatingPointError``, a ``ValueError`` about the data) reaches the caller as itself,
raised from the launcher's report.

Why Fabric and not the Trainer: the loop is ours (stacked members that stop one by one,
validation rounds, checkpoints that resume bit for bit); Fabric brings the launcher, the
process group and DDP without taking the loop over.
"""

from __future__ import annotations

import math
import os
import pickle
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._utils import pyro_scope, resolve_device, seeded
from ._validation import check_count
from .checkpoint import _plain, _read_checkpoint, check_checkpoint_args
from .config import AUTO_PATIENCE_STEPS, AUTO_STEPS, FitConfig, FitHistory
from .fit import (
    ParameterAverage,
    _adam,
    _cpu_threads,
    _make_scheduler,
    _progress,
    _step_module,
)
from .losses import make_loss
from .model import MixtureDensityModel
from .sources import RunningMoments, Source
from .stacked import (
    StackedLoss,
    _per_member_grad_clip,
    _record_round,
    _restore,
    _validation_normals,
    _write,
)

__all__ = ["DataPlan", "fit_streamed", "scan"]

# Rows per shuffle and hold-out window (about 20 MB at 10 float64 columns).
WINDOW_ROWS = 2**18
# Most held-out rows kept in memory: a validation NLL from 20,000 rows has a standard
# error of about 0.01 nats, enough to rank early-stopping states.
MAX_VAL_ROWS = 20_000


def _windows(source: Source, window_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The source's rows re-cut into windows of exactly ``window_rows`` rows (the last
    may be shorter)."""
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    held = 0
    for x, y in source.blocks():
        xs.append(x)
        ys.append(y)
        held += len(x)
        while held >= window_rows:
            x_all, y_all = np.concatenate(xs), np.concatenate(ys)
            yield x_all[:window_rows], y_all[:window_rows]
            xs, ys = [x_all[window_rows:]], [y_all[window_rows:]]
            held -= window_rows
    if held:
        yield np.concatenate(xs), np.concatenate(ys)


def _uniforms(seed: int, window: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, 1, window]).random(n)


def _checksum(x: np.ndarray, y: np.ndarray, first_row: int) -> float:
    """A position-weighted sum: two passes agree only on the same rows in the same order."""
    weights = 1.0 + (np.arange(first_row, first_row + len(x)) % 1009)
    return float(weights @ (x.sum(1) + y.sum(1)))


@dataclass
class DataPlan:
    """What the scan of a source found: sizes, standardization and held-out rows."""

    n_rows: int
    d_x: int
    d_y: int
    x_loc: np.ndarray
    x_scale: np.ndarray
    y_loc: np.ndarray
    y_scale: np.ndarray
    val_limit: float
    x_val: np.ndarray
    y_val: np.ndarray
    checksum: float
    seed: int
    x_absmax: np.ndarray
    y_absmax: np.ndarray
    window_rows: int = WINDOW_ROWS
    scan_seconds: float = 0.0

    @property
    def n_val(self) -> int:
        return len(self.x_val)

    @property
    def n_train(self) -> int:
        return self.n_rows - self.n_val

    def identity(self, dtype: torch.dtype) -> dict[str, object]:
        """What a checkpoint records of the data (the keys of an in-memory fit's): resumed
        only on the same rows, held out alike."""
        return {
            "dtype": str(dtype),
            "shapes": [[self.n_rows, self.d_x], [self.n_rows, self.d_y]],
            "digest": f"stream checksum {self.checksum!r}, {self.n_val} held out",
        }


def scan(
    source: Source,
    seed: int,
    val_fraction: float,
    max_val_rows: int = MAX_VAL_ROWS,
    window_rows: int = WINDOW_ROWS,
) -> DataPlan:
    """One pass over ``source``: row count, running moments of every column (float64),
    the held-out rows and a checksum of the stream.

    Examples
    --------
    >>> from bayes_mdn.sources import ArraySource
    >>> x = np.arange(20.0)[:, None]
    >>> plan = scan(ArraySource(x, 2 * x), seed=0, val_fraction=0.25)
    >>> plan.n_rows, plan.n_val, plan.x_loc.tolist(), plan.y_loc.tolist()
    (20, 5, [9.5], [19.0])
    """
    start = time.perf_counter()
    mx, my = RunningMoments(source.d_x), RunningMoments(source.d_y)
    cand_u = np.empty(0)
    cand_x = np.empty((0, source.d_x))
    cand_y = np.empty((0, source.d_y))
    checksum = 0.0
    n = 0
    for k, (x, y) in enumerate(_windows(source, window_rows)):
        mx.update(x)
        my.update(y)
        checksum += _checksum(x, y, n)
        n += len(x)
        if val_fraction > 0:
            u = _uniforms(seed, k, len(x))
            keep = u < val_fraction
            cand_u = np.concatenate([cand_u, u[keep]])
            cand_x = np.concatenate([cand_x, x[keep]])
            cand_y = np.concatenate([cand_y, y[keep]])
            if len(cand_u) > 2 * max_val_rows:
                part = np.argpartition(cand_u, max_val_rows)[:max_val_rows]
                cand_u, cand_x, cand_y = cand_u[part], cand_x[part], cand_y[part]
    if n < 2:
        raise ValueError(f"fit needs at least 2 rows, the stream has {n}")
    n_val = min(len(cand_u), max_val_rows, int(round(n * val_fraction)))
    if val_fraction > 0 and n - n_val < 2:
        raise ValueError(
            f"need at least 2 training rows after holding out val_fraction={val_fraction}, "
            f"got {n} rows"
        )
    order = np.argsort(cand_u, kind="stable")[:n_val]
    # Held out: u below the limit. Rows of u equal to the last kept one are vanishingly rare
    # (float64 uniforms) and, if ever, train; a row is never both held out and trained on.
    limit = float(np.nextafter(cand_u[order[-1]], 1.0)) if n_val else 0.0
    y_scale = my.std()
    if (y_scale == 0).any():
        col = int(np.argmax(y_scale == 0))
        raise ValueError(
            f"target column {col} is constant ({my.mean[col]}): a density over a constant "
            "target is degenerate; drop that column or add measurement noise"
        )
    x_scale = mx.std()
    return DataPlan(
        n_rows=n,
        d_x=source.d_x,
        d_y=source.d_y,
        x_loc=mx.mean,
        x_scale=np.where(x_scale > 0, x_scale, 1.0),
        y_loc=my.mean,
        y_scale=y_scale,
        val_limit=limit,
        x_val=cand_x[np.sort(order)],
        y_val=cand_y[np.sort(order)],
        checksum=checksum,
        seed=seed,
        x_absmax=mx.absmax,
        y_absmax=my.absmax,
        window_rows=window_rows,
        scan_seconds=time.perf_counter() - start,
    )


def _train_batches(
    source: Source, plan: DataPlan, epoch: int, batch: int, rank: int, world: int, skip: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Epoch ``epoch``'s global batches of ``batch`` training rows, this rank's slice of
    each, from the ``skip``-th on. Checks at the end that the pass read the scanned rows."""
    local = batch // world
    lo, hi = rank * local, (rank + 1) * local
    buf_x = np.empty((0, plan.d_x))
    buf_y = np.empty((0, plan.d_y))
    step = 0
    checksum = 0.0
    n = 0
    for k, (x, y) in enumerate(_windows(source, plan.window_rows)):
        checksum += _checksum(x, y, n)
        n += len(x)
        train = _uniforms(plan.seed, k, len(x)) >= plan.val_limit
        x, y = x[train], y[train]
        perm = np.random.default_rng([plan.seed, 2, epoch, k]).permutation(len(x))
        buf_x = np.concatenate([buf_x, x[perm]])
        buf_y = np.concatenate([buf_y, y[perm]])
        start = 0
        while len(buf_x) - start >= batch:
            if step >= skip:
                sl = slice(start + lo, start + hi)
                yield buf_x[sl], buf_y[sl]
            step += 1
            start += batch
        buf_x, buf_y = buf_x[start:], buf_y[start:]
    if n != plan.n_rows or not math.isclose(checksum, plan.checksum, rel_tol=1e-9, abs_tol=1e-9):
        raise ValueError(
            f"the data changed between passes: this pass read {n} rows (checksum "
            f"{checksum:.17g}), the first read {plan.n_rows} ({plan.checksum:.17g}). A "
            "streamed source must give the same rows in the same order on every pass "
            "(for a DataLoader: shuffle=False; the fit shuffles itself)"
        )


@dataclass
class StreamJob:
    """Everything a process needs to run the streamed fit (pickled for spawned workers)."""

    source: Source
    plan: DataPlan
    # build(stats, seed) -> (model, guide): stats is (x_loc, x_scale, y_loc, y_scale)
    build: Callable[[tuple[Tensor, ...], int | None], tuple[MixtureDensityModel, nn.Module]]
    seeds: list[int | None]
    config: FitConfig
    dtype: torch.dtype
    checkpoint: str | None = None
    checkpoint_every: int = 10
    resume: bool = False
    identity: Mapping[str, object] | None = None


def _build_stack(
    job: StreamJob, device: torch.device
) -> tuple[list[MixtureDensityModel], list[nn.Module], StackedLoss]:
    plan = job.plan
    stats = tuple(
        torch.as_tensor(s, dtype=job.dtype, device=device)
        for s in (plan.x_loc, plan.x_scale, plan.y_loc, plan.y_scale)
    )
    models, guides, losses = [], [], []
    # A two-row batch from the data's own location: autoguides create their parameters
    # from the shapes of a first call.
    x0 = stats[0].expand(2, -1).clone()
    y0 = stats[2].expand(2, -1).clone()
    for seed in job.seeds:
        model, guide = job.build(stats, seed)
        loss = make_loss(model, guide, replace(job.config, num_particles=1))
        loss(x0, y0, subsample=torch.arange(2, device=device), n_total=plan.n_train)
        models.append(model)
        guides.append(guide)
        losses.append(loss)
    stack = StackedLoss(losses, job.config.num_particles).to(device)
    return models, guides, stack


def _schedule(
    config: FitConfig, n_train: int, world: int
) -> tuple[int, int, int, int, int | None]:
    """(global batch, steps per epoch, total steps, steps per validation round, patience
    in steps), the streamed counterparts of :meth:`FitConfig.schedule`."""
    batch = n_train if config.batch_size is None else min(config.batch_size, n_train)
    if batch < world:
        raise ValueError(f"a global batch of {batch} rows cannot be split over {world} devices")
    # Each process takes an equal slice of every global batch.
    batch -= batch % world
    steps_per_epoch = n_train // batch
    if config.epochs == "auto":
        epochs = max(1, math.ceil(AUTO_STEPS / steps_per_epoch))
    else:
        epochs = int(config.epochs)
    total = epochs * steps_per_epoch
    round_steps = min(config.eval_steps(n_train, batch), total)
    if config.patience == "auto":
        patience: int | None = max(3 * round_steps, AUTO_PATIENCE_STEPS)
    elif config.patience is None:
        patience = None
    else:
        patience = int(config.patience) * steps_per_epoch
    return batch, steps_per_epoch, total, round_steps, patience


@torch.no_grad()
def _val_scores(
    stack: StackedLoss,
    x_val: Tensor,
    y_val: Tensor,
    val_eps: list[dict[str, Tensor]] | None,
    n_val: int,
    reduce: Callable[[Tensor], Tensor],
) -> list[float]:
    """Each member's negative log predictive density per held-out row; this process
    holds a slice of the rows, ``reduce`` sums over processes."""
    sums = []
    for m in range(stack.n_members):
        weights = stack.member_weights(m, None if val_eps is None else val_eps[m])
        if len(x_val):
            sums.append(stack.model.log_predictive_density(x_val, y_val, weights).sum())
        else:
            sums.append(x_val.new_zeros(()))
    total = reduce(torch.stack(sums))
    return (-total / n_val).tolist()


def _run(fabric: Any, job: StreamJob) -> dict[str, Any]:
    """The loop, in each process. Returns the stacked state and histories (rank 0's
    reach the caller)."""
    config, plan = job.config, job.plan
    rank = 0 if fabric is None else fabric.global_rank
    world = 1 if fabric is None else fabric.world_size
    device = resolve_device(config.device) if fabric is None else fabric.device
    checkpoint = job.checkpoint
    settings = None if job.identity is None else _plain(dict(job.identity))
    data = plan.identity(job.dtype)
    n_members = len(job.seeds)
    histories = [FitHistory() for _ in job.seeds]
    start = time.perf_counter()
    with pyro_scope(), seeded(config.seed, device), _cpu_threads(config.num_threads, device):
        batch, steps_per_epoch, total, round_steps, patience = _schedule(
            config, plan.n_train, world
        )
        rounds = math.ceil(total / round_steps)
        for h in histories:
            h.epochs = rounds
        _, _, stack = _build_stack(job, device)
        params = [p for p in stack.parameters() if p.requires_grad]
        optimizer = _adam(params, config.lr, device)
        scheduler = _make_scheduler(optimizer, config, total)
        scheduled = config.lr_schedule != "constant"
        # A compiled step is compiled inside the module that DDP wraps.
        step_loss = _step_module(stack, config, device, total, True)
        if fabric is not None:
            trained, optimizer = fabric.setup(step_loss, optimizer)
            backward, reduce = fabric.backward, lambda t: fabric.all_reduce(t, reduce_op="sum")
        else:
            trained = step_loss

            def backward(loss: Tensor) -> None:
                loss.backward()

            def reduce(t: Tensor) -> Tensor:
                return t

        # The loop's random stream starts here, from the seed alone, in every process:
        # whatever setting up DDP drew from it before does not shift the draws.
        torch.manual_seed(config.seed)

        dtype = job.dtype
        x_val = torch.as_tensor(plan.x_val[rank::world], dtype=dtype, device=device)
        y_val = torch.as_tensor(plan.y_val[rank::world], dtype=dtype, device=device)
        has_val = plan.n_val > 0
        val_eps = _validation_normals(stack, config, job.seeds, device) if has_val else None

        live_state = stack.state_dict()
        best_state = {k: v.clone() for k, v in live_state.items()}
        best_score = [math.inf] * n_members
        stale = [0] * n_members
        active = [True] * n_members
        first_round = 0
        average = ParameterAverage(stack, config.ema_decay)
        if job.resume and checkpoint is not None and os.path.exists(checkpoint):
            saved = _read_checkpoint(checkpoint, config, settings, data, stack)
            first_round, best_score, stale, active, best_state, histories = _restore(
                saved, stack, optimizer, scheduler, device
            )
            average.load_state_dict(saved.get("average"))
            if not any(active):
                first_round = rounds
        elapsed = histories[0].seconds
        max_grad_norm = None if config.clip_norm is None else config.clip_norm * plan.n_train
        noise_scale = config.input_noise * stack.model.x_scale
        local = batch // world
        lo = rank * local

        def steps_from(step: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
            epoch, skip = divmod(step, steps_per_epoch)
            for e in range(epoch, math.ceil(total / steps_per_epoch)):
                yield from _train_batches(job.source, plan, e, batch, rank, world, skip)
                skip = 0

        stream = steps_from(first_round * round_steps)
        bar = (
            _progress(config, rounds, first_round, unit="round")
            if rank == 0
            else range(first_round, rounds)
        )
        for r in bar:
            n_steps = min(round_steps, total - r * round_steps)
            live_ids = [m for m in range(n_members) if active[m]]
            live = None if len(live_ids) == n_members else torch.tensor(live_ids, device=device)
            m = len(live_ids)
            round_losses = torch.zeros(m, device=device)
            for _ in range(n_steps):
                xb, yb = next(stream)
                x = torch.as_tensor(xb, dtype=dtype, device=device).expand(m, -1, -1)
                y = torch.as_tensor(yb, dtype=dtype, device=device).expand(m, -1, -1)
                if config.input_noise > 0:
                    # Drawn for the global batch, so every process draws the same numbers
                    # as one process would; this process adds its slice.
                    noise = torch.randn(m, batch, plan.d_x, dtype=dtype, device=device)
                    x = x + noise_scale * noise[:, lo : lo + local]
                member_loss = trained(x, y, plan.n_train, live)
                optimizer.zero_grad(set_to_none=True)
                backward(member_loss.sum())
                if max_grad_norm is not None:
                    _per_member_grad_clip(params, max_grad_norm)
                optimizer.step()
                average.update()
                if scheduled:
                    scheduler.step()
                round_losses += member_loss.detach()
            mean_loss = [math.nan] * n_members
            for i, v in zip(live_ids, reduce(round_losses / world).tolist()):
                mean_loss[i] = v / (n_steps * plan.n_train)
            finite_params = torch.stack([torch.isfinite(p).flatten(1).all(1) for p in params])
            ok = finite_params.all(0).tolist()
            bad = [i for i in live_ids if not (math.isfinite(mean_loss[i]) and ok[i])]
            if bad:
                raise FloatingPointError(
                    f"member {bad[0]}'s loss or parameters became non-finite in validation "
                    f"round {r}; the fit stopped and kept nothing. Likely causes: a learning "
                    f"rate too high (lr={config.lr}), extreme or badly scaled data, or "
                    "min_scale too small for the data"
                )
            last = r + 1 == rounds
            # Validation scores, and a best state keeps, the parameter average.
            with average.applied():
                scores = (
                    _val_scores(stack, x_val, y_val, val_eps, plan.n_val, reduce)
                    if has_val
                    else None
                )
                _record_round(
                    histories,
                    live_ids,
                    r,
                    n_steps,
                    mean_loss,
                    scores,
                    has_val=has_val,
                    stale_unit=round_steps,
                    patience=patience,
                    last=last,
                    tracking=(best_score, stale, active),
                    states=(best_state, live_state),
                )
            if rank == 0:
                shown = [v for v in mean_loss if math.isfinite(v)]
                bar.set_postfix(  # type: ignore[union-attr]
                    loss=f"{sum(shown) / max(len(shown), 1):.4f}",
                    active=sum(active),
                    refresh=False,
                )
            done = not any(active)
            if checkpoint is not None and ((r + 1) % job.checkpoint_every == 0 or last or done):
                if rank == 0:
                    for h in histories:
                        h.seconds = elapsed + time.perf_counter() - start
                    _write(
                        checkpoint,
                        r + 1,
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
                if fabric is not None:
                    fabric.barrier()
            if done:
                break
    seconds = elapsed + time.perf_counter() - start
    for h in histories:
        h.seconds = seconds
    return {
        "best_state": {k: v.detach().cpu() for k, v in best_state.items()},
        "histories": histories,
    }


class _Sealed:
    """A job handed to the launcher as one opaque object. Fabric's launcher walks its
    arguments as collections and refuses frozen dataclasses (FitConfig) inside them;
    it does not look inside this. A forked worker gets the job as it is in memory (no
    copy of in-memory rows); a spawned one gets it pickled, by value: plain ``pickle``,
    not torch's multiprocessing pickler, which would put the tensors of a user's backbone
    in memory shared with this process."""

    def __init__(self, job: StreamJob) -> None:
        self.job = job

    def __getstate__(self) -> bytes:
        return pickle.dumps(self.job)

    def __setstate__(self, state: bytes) -> None:
        self.job = pickle.loads(state)


def _worker(fabric: Any, sealed: _Sealed, out: str) -> None:
    # DDP warns that the gradient of a stacked (M, out, in) weight, which autograd lays out
    # transposed, does not match its bucket's strides; it copies, once per step.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
    try:
        result = _run(fabric, sealed.job)
    except Exception as err:
        # The launcher re-raises a worker's error as text; leave the error itself for the
        # caller (the first process to fail writes it), then fail as the launcher expects.
        try:
            with open(f"{out}.error.{fabric.global_rank}", "xb") as f:
                pickle.dump(err, f)
        except Exception:  # an unpicklable error: the launcher's text still tells it
            pass
        raise
    # Through a file, not the launcher's return queue: Fabric joins the processes before
    # it reads the queue, and a result larger than a pipe's buffer would never be sent.
    if fabric.global_rank == 0:
        with open(out, "wb") as f:
            pickle.dump(result, f)
    _close_process_group()


def _close_process_group() -> None:
    """Destroy the process group while the interpreter is still whole.

    Lightning registers this at exit for NCCL only. A gloo group left to the interpreter's
    finalization can abort the process (SIGABRT, "terminate called without an active
    exception"), now and then: Gloo's worker threads still hold work whose tensors are
    freed while the interpreter is torn down. The barrier keeps either process from
    tearing down while the other still has a collective in flight.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _strategy(device: torch.device, num_threads: int | None, compiles: bool = False) -> str:
    """Fabric's launcher: ``"ddp_fork"`` for one-thread CPU workers on Linux that do not
    compile their step, else ``"ddp_spawn"``.

    A spawned worker starts a fresh interpreter and imports torch, Pyro and this package
    again: about 9 s on a 2-core machine (docs/notes.md), more than the training of many
    fits. A forked worker starts from a copy of this process in well under a second. Fork
    is safe only where nothing in the copy is broken by it: not on GPUs, nor once CUDA is
    initialised in this process even for a CPU fit (CUDA does not survive a fork), not on
    macOS (its system libraries are not fork-safe), and not where the workers run
    multi-threaded torch operations (GNU OpenMP's thread pool does not survive a fork),
    hence only with ``num_threads=1``, the default, and not where the workers compile their
    step (``compiles``): forked workers that compiled with Inductor after this process had
    compiled hung on a cold cache (its compile workers do not survive a fork). Python 3.12 and
    later warn (``DeprecationWarning``, hidden by default) when a process with other
    threads forks; here those are allocator and thread-pool threads of the libraries,
    whose state the workers do not use (a one-thread worker runs no OpenMP region, and
    Parquet is decoded without Arrow's pool).
    """
    import multiprocessing
    import sys

    if (
        device.type == "cpu"
        and not torch.cuda.is_initialized()
        and num_threads == 1
        and not compiles
        and sys.platform.startswith("linux")
        and "fork" in multiprocessing.get_all_start_methods()
    ):
        return "ddp_fork"
    return "ddp_spawn"


def fit_streamed(
    job: StreamJob, devices: int = 1
) -> tuple[list[MixtureDensityModel], list[nn.Module], list[FitHistory]]:
    """Fit the members ``job`` describes on its streamed source, on ``devices`` processes.

    Returns the members' models and guides, built in this process and holding each
    member's best state (by held-out NLL; the last state without held-out rows), and one
    :class:`~bayes_mdn.config.FitHistory` per member whose entries are *validation rounds*
    of ``FitConfig.eval_steps`` optimizer steps (an epoch of a large stream is many
    thousand steps): ``epochs`` counts the planned rounds, ``best_epoch`` and
    ``val_epochs`` are round indices.
    """
    check_checkpoint_args(job.checkpoint, job.checkpoint_every, job.resume)
    check_count("devices", devices)
    device = resolve_device(job.config.device)
    if devices == 1:
        result = _run(None, job)
    else:
        try:
            from lightning_fabric import Fabric
        except ImportError as err:  # pragma: no cover - a dependency of [scale]
            raise ImportError(
                "devices > 1 needs Lightning Fabric: pip install 'bayes-mdn[scale]'"
            ) from err
        if device.type == "cuda" and torch.cuda.device_count() < devices:
            raise ValueError(
                f"devices={devices} but this machine has {torch.cuda.device_count()} GPUs"
            )
        fabric = Fabric(
            accelerator="cuda" if device.type == "cuda" else "cpu",
            devices=devices,
            # "auto" never compiles a stacked CPU step (FitConfig.compiles).
            strategy=_strategy(device, job.config.num_threads, job.config.compile is True),
        )
        # Each worker puts the loop on fabric.device: its own GPU, or the CPU.
        with tempfile.TemporaryDirectory(prefix="bayes_mdn_ddp_") as tmp:
            out = os.path.join(tmp, "result.pickle")
            try:
                fabric.launch(_worker, _Sealed(job), out)
            except Exception as launch_error:
                errors = sorted(p for p in os.listdir(tmp) if ".error." in p)
                if not errors:
                    raise
                # The worker's own error (a FloatingPointError, a ValueError naming the
                # data, ...), raised from the launcher's report of it.
                with open(os.path.join(tmp, errors[0]), "rb") as f:
                    raise pickle.load(f) from launch_error
            with open(out, "rb") as f:
                result = pickle.load(f)
    models, guides, stack = _build_stack(job, device)
    with torch.no_grad():
        stack.unstack({k: v.to(device) for k, v in result["best_state"].items()})
    return models, guides, result["histories"]
