"""The settings and the record of the SVI loop.

:class:`FitConfig` holds every setting of :func:`~bayes_mdn.fit.fit_svi`, checked when
built, and resolves the automatic budget (counted in optimizer steps) for a data size;
:class:`FitHistory` records what a fit did, epoch by epoch. Every training loop (one fit,
the stacked ensemble, the streamed fit) and the checkpoints share these types.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from typing import Literal

from ._utils import resolve_device
from ._validation import check_count, check_seed

__all__ = [
    "AUTO_PATIENCE_STEPS",
    "AUTO_STEPS",
    "COMPILE_STEPS",
    "EVAL_STEPS",
    "LR_SCHEDULES",
    "FitConfig",
    "FitHistory",
]

LR_SCHEDULES = ("onecycle", "cosine", "constant")

# The automatic budget, counted in optimizer steps (see FitConfig).
AUTO_STEPS = 8000
AUTO_PATIENCE_STEPS = 1000
EVAL_STEPS = 25
# compile="auto" compiles a one-network CPU fit planned for at least this many steps
# (see FitConfig.compiles).
COMPILE_STEPS = 20_000


def cxx_available() -> bool:
    """Whether the C++ compiler that Inductor calls on Linux (``$CXX``, else ``g++``) is
    on the PATH."""
    return shutil.which(os.environ.get("CXX") or "g++") is not None


@dataclass(frozen=True)
class FitConfig:
    """Settings of the SVI loop, checked when built.

    Parameters
    ----------
    epochs : maximum number of passes over the training data, or ``"auto"``: as many as
        ``AUTO_STEPS`` optimizer steps take (at least one pass), so that the budget is
        counted in steps whatever the size of the data (a fixed epoch count is a few
        hundred steps on a hundred rows and hundreds of thousands on a million)
    batch_size : rows per step; None uses the full training set each step
    lr : peak learning rate of Adam
    lr_schedule : "onecycle" (warm up, then anneal), "cosine" (anneal) or "constant"
    clip_norm : largest norm of the gradient of the per-point loss (the ELBO divided by
        the number of training rows), None for no clipping
    num_particles : ELBO particles per step, evaluated in one vectorized pass
    val_fraction : share of rows held out for early stopping (0 disables it)
    patience : epochs without a better validation score before stopping; None never;
        ``"auto"``: the epochs that ``AUTO_PATIENCE_STEPS`` steps take (at least 3 validation
        checks). The validation score is computed every ``eval_every`` epochs: every
        epoch when an epoch has at least :meth:`eval_steps` steps, else every
        ceil(eval_steps / steps per epoch) epochs, so that small data sets are not
        evaluated after every single step and large held-out sets do not cost more than
        about a tenth of the training
    val_draws : posterior draws used for the validation log predictive density
    ema_decay : decay of an exponential moving average of the trained parameters, updated
        after every optimizer step (Polyak averaging): validation scores the average and
        the fit keeps it (the best average by validation score, or the last one without
        a held-out split), not the last iterate, whose Adam noise a member stopped early
        at a high learning rate would otherwise keep. 0.99 averages over about the last
        100 steps; the first updates use a smaller decay, (1 + t) / (10 + t) at update t,
        so the average does not linger at the initialization. None keeps the last
        iterate.
    input_noise : standard deviation of Gaussian noise added to each standardized input
        at every step, 0 for none. Noise regularization (Rothfuss et al., 2019) smooths
        p(y | x) along x; it is the most effective regularizer for MDNs in their study.
    jit : deprecated, does nothing (removed in 0.3); ``fit_svi`` and ``BayesianMDN.fit``
        warn when it is set. Pyro's
        ``JitTrace_ELBO`` cannot run on module-local parameters (it looks them up in the
        global param store), the built-in guides' objectives are computed directly
        (:class:`~bayes_mdn.losses.MapLoss`, :class:`~bayes_mdn.losses.MeanFieldLoss`),
        and ``compile`` below is what compiles the step.
    compile : ``torch.compile`` the loss module of the training step (Inductor; the
        backward through AOTAutograd): True, False or ``"auto"``, which compiles long fits
        where that measured faster (see :meth:`compiles`). A compiled fit gives the eager
        fit's numbers up to float rounding, its random draws included (tested); the
        compile time is part of the fit. ``True`` on the CPU needs a C++ compiler.
    seed : seed of every random choice of the fit, an integer in [0, 2**63); None for
        fresh randomness
    device : "auto", "cpu", "cuda" or "cuda:N"
    progress : show a tqdm progress bar
    num_threads : torch intra-op threads while fitting on the CPU (restored afterwards);
        None leaves torch's setting alone. MDN-sized steps are too small to gain from
        splitting each operation across cores, and lose badly when another process
        holds a core (measured in docs/notes.md).
    """

    epochs: int | Literal["auto"] = "auto"
    batch_size: int | None = 500
    lr: float = 3e-3
    lr_schedule: Literal["onecycle", "cosine", "constant"] = "cosine"
    clip_norm: float | None = 10.0
    num_particles: int = 1
    val_fraction: float = 0.0
    patience: int | Literal["auto"] | None = "auto"
    val_draws: int = 16
    ema_decay: float | None = 0.99
    input_noise: float = 0.05
    jit: bool = False
    compile: bool | Literal["auto"] = "auto"
    seed: int | None = 0
    device: str = "auto"
    progress: bool = True
    num_threads: int | None = 1

    def __post_init__(self) -> None:
        def positive_int(name: str, value: object, allow_none: bool = False) -> None:
            if not (value is None and allow_none):
                check_count(name, value)

        if self.epochs != "auto":
            positive_int("epochs", self.epochs)
        positive_int("batch_size", self.batch_size, allow_none=True)
        positive_int("num_particles", self.num_particles)
        if self.patience != "auto":
            positive_int("patience", self.patience, allow_none=True)
        positive_int("val_draws", self.val_draws)
        positive_int("num_threads", self.num_threads, allow_none=True)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"
            )
        if not (isinstance(self.input_noise, (int, float)) and 0 <= self.input_noise < math.inf):
            raise ValueError(f"input_noise must be a finite number >= 0, got {self.input_noise!r}")
        if self.ema_decay is not None and not (
            isinstance(self.ema_decay, (int, float))
            and not isinstance(self.ema_decay, bool)
            and 0 < self.ema_decay < 1
        ):
            raise ValueError(f"ema_decay must be None or in (0, 1), got {self.ema_decay!r}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be None or > 0, got {self.clip_norm!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if not (isinstance(self.compile, bool) or self.compile == "auto"):
            raise ValueError(f"compile must be True, False or 'auto', got {self.compile!r}")
        # Frozen: the checked seed (a NumPy integer becomes an int) is set through object.
        object.__setattr__(self, "seed", check_seed(self.seed))
        resolve_device(self.device)

    def to_dict(self) -> dict:
        return asdict(self)

    def eval_steps(self, n_train: int, batch: int) -> int:
        """Optimizer steps between validation checks: ``EVAL_STEPS``, or more where a
        check (every held-out row under ``val_draws`` draws, forward only) would cost
        more than about a tenth of the training steps between two checks (a row-draw of
        a training step costs about five of a check's: forward, backward and update), and
        at most a quarter of ``AUTO_PATIENCE_STEPS``, so that early stopping still sees
        several checks."""
        if self.val_fraction <= 0:
            return EVAL_STEPS
        n_val = n_train * self.val_fraction / (1 - self.val_fraction)
        cost = 2 * n_val * self.val_draws / (batch * self.num_particles)
        return max(EVAL_STEPS, min(AUTO_PATIENCE_STEPS // 4, math.ceil(cost)))

    def compiles(self, device: object, planned_steps: int, stacked: bool = False) -> bool:
        """Whether a fit on ``device`` planned for ``planned_steps`` optimizer steps
        compiles its step, ``compile`` resolved. ``stacked``: the step trains several
        members as one stacked network.

        ``"auto"`` compiles where that was measured to pay: the step of one network (not
        a stacked ensemble, nor a streamed fit, which always stacks) on a Linux CPU with
        Inductor's C++ compiler (``$CXX``, else ``g++``) on the PATH, in a fit planned for
        at least ``COMPILE_STEPS`` steps (more than the ``epochs="auto"`` budget, so
        long fits with an explicit ``epochs`` only). There the compiled step measured 1.4
        to 1.6 times faster. Compiling took 7 s with Inductor's on-disk cache warm, as it
        is after the first compiled fit on a machine, and about 21 s cold, so it pays
        after about 15,000 steps warm and 35,000 to 55,000 cold. The stacked step
        measured no faster compiled (docs/notes.md, ``python -m benchmarks.compile_step``).
        CUDA fits stay eager under ``"auto"``: no GPU was at hand to measure them.
        """
        if self.compile != "auto":
            return bool(self.compile)
        return (
            planned_steps >= COMPILE_STEPS
            and resolve_device(device).type == "cpu"
            and not stacked
            and sys.platform.startswith("linux")
            and cxx_available()
        )

    def schedule(self, n_train: int) -> tuple[int, int, int, int | None]:
        """(batch rows, epochs, eval_every epochs, patience epochs) for ``n_train`` rows,
        with the ``"auto"`` settings resolved."""
        batch = n_train if self.batch_size is None else min(self.batch_size, n_train)
        steps_per_epoch = math.ceil(n_train / batch)
        if self.epochs == "auto":
            epochs = max(1, math.ceil(AUTO_STEPS / steps_per_epoch))
        else:
            epochs = int(self.epochs)
        eval_every = max(1, math.ceil(self.eval_steps(n_train, batch) / steps_per_epoch))
        if self.patience == "auto":
            patience: int | None = max(
                3 * eval_every, math.ceil(AUTO_PATIENCE_STEPS / steps_per_epoch)
            )
        else:
            patience = self.patience
        return batch, epochs, eval_every, patience


@dataclass
class FitHistory:
    """What happened during a fit, one entry per epoch.

    Attributes
    ----------
    train_loss : negative ELBO per training point, averaged over the epoch's steps
    val_nll : negative log predictive density per held-out point (empty without a split)
    val_epochs : the epoch of each ``val_nll`` entry (validation runs every
        ``eval_every`` epochs, see :class:`FitConfig`)
    best_epoch : epoch whose state was kept (0-based)
    stopped_early : True when patience ran out before ``epochs``
    steps : optimizer steps taken
    epochs : the planned number of epochs (``"auto"`` resolved)
    seconds : wall-clock time of the loop
    """

    train_loss: list[float] = field(default_factory=list)
    val_nll: list[float] = field(default_factory=list)
    val_epochs: list[int] = field(default_factory=list)
    best_epoch: int = -1
    stopped_early: bool = False
    steps: int = 0
    epochs: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)
