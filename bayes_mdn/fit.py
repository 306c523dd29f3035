"""Stochastic variational inference for a :class:`~bayes_mdn.model.MixtureDensityModel`.

A plain torch optimizer trains the ELBO loss module (module-local Pyro parameters, no
global param store), on shuffled mini-batches whose likelihood the data plate scales
to the full data set, with gradient clipping, a learning-rate schedule, and early
stopping on the held-out log predictive density that restores the best state.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal
from torch import Tensor, nn
from torch.distributions import transform_to
from torch.distributions.transforms import ComposeTransform, IndependentTransform

from ._archive import ModelFileError, TensorSpec, read_archive, write_archive
from ._utils import pyro_scope, resolve_device, seeded
from ._validation import check_seed
from .guides import PointGuide, draw_latents, is_deterministic
from .model import OBS_SITE, MixtureDensityModel

__all__ = [
    "LR_SCHEDULES",
    "FitConfig",
    "FitHistory",
    "MapLoss",
    "MeanFieldLoss",
    "check_checkpoint_args",
    "checkpoint_identity",
    "fit_nuts",
    "fit_svi",
    "fused_loss_applies",
]

LR_SCHEDULES = ("onecycle", "cosine", "constant")
# The guides whose ELBO MapLoss and MeanFieldLoss compute directly (exact types: a
# subclass may add sites); the stacked loop trains these kinds only.
_FUSED_GUIDES = (AutoDelta, AutoNormal, PointGuide)


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
    input_noise : standard deviation of Gaussian noise added to each standardized input
        at every step, 0 for none. Noise regularization (Rothfuss et al., 2019) smooths
        p(y | x) along x; it is the most effective regularizer for MDNs in their study.
    jit : compile the ELBO with ``JitTrace_ELBO``. Not available: under module-local
        parameters, Pyro 1.9's ``JitTrace_ELBO`` looks its parameters up in the global
        param store and fails (KeyError). The deterministic and mean-field guides
        ignore it, their objectives being computed directly (:class:`MapLoss`,
        :class:`MeanFieldLoss`, faster than the JIT-compiled ELBO); ``"lowrank"``
        refuses it with a ValueError when the fit starts.
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
    input_noise: float = 0.05
    jit: bool = False
    seed: int | None = 0
    device: str = "auto"
    progress: bool = True
    num_threads: int | None = 1

    def __post_init__(self) -> None:
        def positive_int(name: str, value: object, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

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
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be None or > 0, got {self.clip_norm!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
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


# The automatic budget, counted in optimizer steps (see FitConfig).
AUTO_STEPS = 8000
AUTO_PATIENCE_STEPS = 1000
EVAL_STEPS = 25


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
    """Negative log posterior-predictive density per point, log-mean-exp over draws.

    Rows are evaluated in chunks (``model.log_predictive_density``), so memory stays
    bounded however large the validation split.
    """
    draws = 1 if is_deterministic(guide) else num_draws
    weights = draw_latents(guide, draws)
    return -model.log_predictive_density(x, y, weights).mean().item()


def _scaled_log_likelihood(
    model: MixtureDensityModel,
    x: Tensor,
    y: Tensor,
    weights: dict[str, Tensor],
    n_total: int | None,
) -> Tensor:
    """The data term of the ELBO: (n_total / n) * sum_i log p(y_i | x_i, w), in y's units.

    Weights may carry one leading particle dimension P, giving shape (P,); else a scalar.
    """
    log_lik = model.log_density(x, y, weights)
    size = len(x) if n_total is None else n_total
    if size != len(x):
        # As Pyro's subsampled plate does: scale each term, then sum.
        log_lik = log_lik * (size / len(x))
    return log_lik.sum(-1)


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class _ConstrainedParams:
    """Reads the constrained values of PyroParams, as ``attrgetter(name)(module)`` does,
    without going through ``PyroModule.__getattr__`` on every step.

    That lookup resolves the constraint and issues a (module-local) ``pyro.param``
    effect per parameter, about 0.15 ms per step at two sites: a tenth of a small
    step. Here each parameter's unconstrained ``nn.Parameter`` and its transform are
    looked up once; ``load_state_dict`` copies into those same tensors, so they stay
    current.
    """

    def __init__(self, module: nn.Module, names: Sequence[str]) -> None:
        self.entries = []
        for name in names:
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            constraint, _ = owner._pyro_params[leaf]
            transform = transform_to(constraint)
            # The identity on real sites (every weight): skip the call altogether.
            if isinstance(transform, IndependentTransform):
                transform = transform.base_transform
            identity = isinstance(transform, ComposeTransform) and not transform.parts
            self.entries.append(
                (name, getattr(owner, leaf + "_unconstrained"), None if identity else transform)
            )

    def __call__(self) -> dict[str, Tensor]:
        return {
            name: value if transform is None else transform(value)
            for name, value, transform in self.entries
        }


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
        self._params: _ConstrainedParams | None = None

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        *,
        subsample: Tensor | None = None,
        n_total: int | None = None,
    ) -> Tensor:
        weights = self._weights(x, y, subsample, n_total)
        log_lik = _scaled_log_likelihood(self.model, x, y, weights, n_total)
        return -(log_lik + self.model.log_prior(weights))

    def _weights(
        self, x: Tensor, y: Tensor, subsample: Tensor | None, n_total: int | None
    ) -> dict[str, Tensor]:
        if isinstance(self.guide, PointGuide):
            return {}
        if self._params is None:
            if self.guide.prototype_trace is None:
                # AutoDelta creates its parameters when it first runs the model.
                self.guide(x, y, subsample=subsample, n_total=n_total)
            self._params = _ConstrainedParams(self.guide, self.model.latent_names)
        return self._params()


class MeanFieldLoss(nn.Module):
    """The negative ELBO of a mean-field Gaussian guide (``AutoNormal``), computed directly.

    The same estimator as ``Trace_ELBO`` with every site reparameterized: per particle,
    draw w = loc + scale * eps for each latent site from the guide's own parameters
    (``guide.locs.<site>``, ``guide.scales.<site>``), then take
    -(n_total / n) * sum log p(y | x, w) - log p(w) + log q(w), averaged over
    ``num_particles`` particles evaluated in one vectorized pass. The standard normals
    are drawn in the order and shapes ``Trace_ELBO`` draws them (site by site, all
    particles of a site at once), so a seeded fit follows the ``Trace_ELBO`` fit. It
    skips the tracing of model and guide, the distribution objects and the per-site host
    syncs. Its ``state_dict`` has the keys of ``Trace_ELBO()(model, guide)``.

    Call it as the ELBO module: ``loss(x, y, subsample=idx, n_total=n)``, with x of shape
    (n, d_x) and y of shape (n, d_y); it returns a scalar Tensor.
    """

    def __init__(
        self, model: MixtureDensityModel, guide: nn.Module, num_particles: int = 1
    ) -> None:
        super().__init__()
        if not isinstance(guide, AutoNormal):
            raise TypeError(f"MeanFieldLoss needs an AutoNormal guide, got {type(guide).__name__}")
        if (
            not isinstance(num_particles, int)
            or isinstance(num_particles, bool)
            or num_particles < 1
        ):
            raise ValueError(f"num_particles must be an integer >= 1, got {num_particles!r}")
        self.model = model
        self.guide = guide
        self.num_particles = num_particles
        self._locs: _ConstrainedParams | None = None
        self._scales: _ConstrainedParams | None = None

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        *,
        subsample: Tensor | None = None,
        n_total: int | None = None,
    ) -> Tensor:
        guide = self.guide
        if self._locs is None or self._scales is None:
            if guide.prototype_trace is None:
                # Create the guide's parameters without drawing from it, so the first step
                # consumes the random stream exactly as Trace_ELBO's first step does.
                guide._setup_prototype(x, y, subsample=subsample, n_total=n_total)
            self._locs = _ConstrainedParams(guide.locs, self.model.latent_names)
            self._scales = _ConstrainedParams(guide.scales, self.model.latent_names)
        particles = self.num_particles
        weights = {}
        log_q = x.new_zeros(())
        scales = self._scales()
        for name, loc in self._locs().items():
            scale = scales[name]
            shape = loc.shape if particles == 1 else (particles, *loc.shape)
            eps = torch.empty(shape, dtype=loc.dtype, device=loc.device).normal_()
            value = loc + eps * scale
            # log q(w) with (w - loc) / scale = eps: the value of Normal(loc, scale)
            # .log_prob(w) and, as a function of loc and scale, the same gradient (equal
            # to rounding), in two cheap terms; eps carries no gradient.
            square = eps.flatten(eps.dim() - loc.dim()).pow(2).sum(-1)
            log_q = log_q - 0.5 * square - (scale.log().sum() + loc.numel() * _HALF_LOG_2PI)
            weights[name] = value
        log_lik = _scaled_log_likelihood(self.model, x, y, weights, n_total)
        elbo = log_lik + self.model.log_prior(weights) - log_q
        return -elbo.mean() if particles > 1 else -elbo


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


def fused_loss_applies(model: nn.Module, guide: nn.Module) -> bool:
    """True when :class:`MapLoss` or :class:`MeanFieldLoss` computes exactly the
    ``Trace_ELBO`` objective of this model and guide.

    The fused losses know the built-in model's sites and densities and nothing else, so
    the check is structural: the model is exactly :class:`MixtureDensityModel` (a
    subclass may add sample sites or factors, or change a density), the guide exactly
    ``AutoDelta``, ``AutoNormal`` or :class:`~bayes_mdn.guides.PointGuide`, and a trace of
    the model on one row holds exactly its latent sites, the data plate and the observed
    site, in order.
    Anything else trains through ``Trace_ELBO``.

    Examples
    --------
    >>> from bayes_mdn.guides import make_guide
    >>> from bayes_mdn.nets import MixtureDensityNetwork
    >>> net = MixtureDensityNetwork(d_x=1, d_y=1, n_components=2, hidden=(4,))
    >>> one = torch.ones(1)
    >>> model = MixtureDensityModel(net, x_loc=0 * one, x_scale=one, y_loc=0 * one, y_scale=one)
    >>> fused_loss_applies(model, make_guide(model, "normal"))
    True
    >>> fused_loss_applies(model, make_guide(model, "lowrank"))
    False
    """
    if type(model) is not MixtureDensityModel:
        return False
    if type(guide) not in _FUSED_GUIDES:
        return False
    like = model.x_loc
    x = torch.zeros(1, model.net.d_x, dtype=like.dtype, device=like.device)
    y = torch.zeros(1, model.net.d_y, dtype=like.dtype, device=like.device)
    with pyro_scope(), torch.no_grad(), seeded(0, like.device):
        trace = poutine.trace(model).get_trace(x, y)
    # The data plate records its subsample as a sample site of its own, named "data".
    sites = [name for name, site in trace.nodes.items() if site["type"] == "sample"]
    return sites == [*model.latent_names, "data", OBS_SITE]


def _make_loss(model: MixtureDensityModel, guide: nn.Module, config: FitConfig) -> nn.Module:
    """The loss module the loop minimizes: ``loss(x, y, subsample=idx, n_total=n)``.

    Where :func:`fused_loss_applies`, deterministic guides get :class:`MapLoss`, the same
    objective as ``Trace_ELBO`` at a fraction of the per-step cost (particles and JIT
    change nothing for a point mass), and ``AutoNormal`` gets :class:`MeanFieldLoss`, the
    same estimator from the same draws as ``Trace_ELBO``. Every other model and guide
    gets ``Trace_ELBO`` itself, particles vectorized in one pass; ``config.jit`` is
    refused there (see :class:`FitConfig`).
    """
    if fused_loss_applies(model, guide):
        if is_deterministic(guide):
            return MapLoss(model, guide)
        return MeanFieldLoss(model, guide, config.num_particles)
    if config.jit:
        raise ValueError(
            f"jit=True does not work with the {type(guide).__name__} guide: Pyro's "
            "JitTrace_ELBO needs the global param store, and bayes_mdn keeps parameters "
            "module-local; use jit=False (guide='normal' and 'delta' are computed directly "
            "and ignore jit)"
        )
    elbo = Trace_ELBO(
        num_particles=config.num_particles,
        vectorize_particles=config.num_particles > 1,
        max_plate_nesting=1,
    )
    return elbo(model, guide)


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
        the CPU). The checkpoint must come from the same loop settings (``progress``
        aside), the same ``identity``, a model and guide of the same parameter names,
        shapes and dtypes and with the same constants (buffers such as the prior scales
        and the standardization), and the same data; else ``ValueError`` names each
        setting that differs, with the checkpoint's value and the new one.
    identity : the settings that shape the model and guide but that the loop cannot see
        (activation, min_scale, init_scale, ...: :class:`~bayes_mdn.BayesianMDN` passes
        its constructor arguments, see :func:`checkpoint_identity`). JSON-like values
        (numbers, strings, None, lists, mappings); anything else is compared by its
        ``repr``. Stored in each checkpoint and compared on resume; None skips that
        comparison (the structural ones remain).

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
    check_checkpoint_args(checkpoint, checkpoint_every, resume)
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

        loss_fn = _make_loss(model, guide, config)
        # Autoguides create their parameters on the first call.
        loss_fn(x_train[:batch], y_train[:batch], subsample=train_idx[:batch], n_total=n)
        params = [p for p in loss_fn.parameters() if p.requires_grad]
        optimizer = _adam(params, config.lr, device)
        scheduler = _make_scheduler(optimizer, config, epochs * steps_per_epoch)
        # A constant rate needs no step (the scheduler's Python call is ~1% of a step).
        scheduled = config.lr_schedule != "constant"

        best_score = math.inf
        # Detached aliases of the live parameters: the optimizer and load_state_dict update
        # them in place, so keeping a state is a copy_ per tensor (a deepcopy of the state
        # dict every epoch cost ~0.9 ms, 6% of a small fit's time).
        live_state = loss_fn.state_dict()
        best_state = {k: v.clone() for k, v in live_state.items()}
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
                loss = loss_fn(x_batch, y_train[idx], subsample=idx, n_total=n)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
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
                # Without a validation split the last finite state is the one kept.
                _copy_state(live_state, best_state)
                history.best_epoch = epoch
                bar.set_postfix(loss=f"{epoch_loss:.4f}", refresh=False)
            elif (epoch + 1) % eval_every == 0 or last:
                with seeded(0 if config.seed is None else config.seed + 1, device):
                    score = validation_nll(model, guide, x_val, y_val, config.val_draws)
                history.val_nll.append(score)
                history.val_epochs.append(epoch)
                if score < best_score:
                    best_score, history.best_epoch, stale = score, epoch, 0
                    _copy_state(live_state, best_state)
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


# -- checkpoints ---------------------------------------------------------------------------
#: Layout of checkpoint files; 2 added the model identity and the data's dtype and shapes.
CHECKPOINT_VERSION = 2
_CHECKPOINT_KIND = "checkpoint"
# Settings that leave every number of a fit unchanged, so a resume may change them.
_RESUME_FREE = ("progress",)
# Estimator arguments that are bookkeeping, not part of what is fitted.
# n_jobs: members fitted in worker processes give the numbers of an in-process fit;
# devices: a data-parallel fit follows the one-process objective (bayes_mdn.streaming).
_IDENTITY_FREE = (
    "progress",
    "checkpoint",
    "checkpoint_every",
    "resume",
    "num_threads",
    "n_jobs",
    "devices",
)


def checkpoint_identity(params: Mapping[str, object]) -> dict[str, object]:
    """The ``identity`` of :func:`fit_svi` for an estimator with these constructor
    arguments: all of them but the bookkeeping ones (progress, checkpoint,
    checkpoint_every, resume, num_threads, n_jobs, devices), so that an argument added later is part of
    a checkpoint's identity without being listed anywhere.

    Examples
    --------
    >>> sorted(checkpoint_identity({"hidden": (8,), "progress": True, "resume": True}))
    ['hidden']
    """
    return {k: v for k, v in params.items() if k not in _IDENTITY_FREE}


def _plain(value: object) -> object:
    """``value`` as the JSON-like form in which it is stored and compared: tuples become
    lists (so ``hidden=(8,)`` and ``[8]`` agree), paths strings, NumPy and torch scalars
    numbers, anything else its ``repr``."""
    if isinstance(value, float) and math.isnan(value):
        return "nan"  # a checkpoint never stores NaN; as text it still compares
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "shape", None) in ((), torch.Size()):
        return _plain(item())
    return repr(value)


def check_checkpoint_args(checkpoint: object, checkpoint_every: object, resume: object) -> None:
    """Eager checks of the checkpoint arguments of :func:`fit_svi`."""
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(
            f"checkpoint must be None, a str or os.PathLike, got {type(checkpoint).__name__}"
        )
    if (
        not isinstance(checkpoint_every, int)
        or isinstance(checkpoint_every, bool)
        or checkpoint_every < 1
    ):
        raise ValueError(f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be True or False, got {resume!r}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint file to resume from, got checkpoint=None")


def _copy_state(source: dict[str, Tensor], target: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for key, value in source.items():
            target[key].copy_(value)


def _all_finite(params: Sequence[Tensor]) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


def _data_identity(x: Tensor, y: Tensor) -> dict[str, object]:
    """dtype, shapes and fingerprint of the data, so that a checkpoint is never resumed
    on other data, and a change of dtype or size is named as such."""
    h = hashlib.sha256()
    for t in (x, y):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return {
        "dtype": str(x.dtype),
        "shapes": [list(x.shape), list(y.shape)],
        "digest": h.hexdigest(),
    }


def _resume_config(config: FitConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in _RESUME_FREE}


def _write_checkpoint(
    path: str | os.PathLike[str],
    next_epoch: int,
    config: FitConfig,
    identity: object,
    data: dict[str, object],
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    history: FitHistory,
    best_state: dict,
    best_score: float,
    stale: int,
    device: torch.device,
) -> None:
    _write_loop_state(
        path,
        next_epoch,
        config,
        identity,
        data,
        (loss_fn, optimizer, scheduler),
        device,
        {
            "history": history.to_dict(),
            "best_state": dict(best_state),
            "best_score": best_score,
            "stale": stale,
        },
    )


def _write_loop_state(
    path: str | os.PathLike[str],
    next_epoch: int,
    config: FitConfig,
    identity: object,
    data: dict[str, object],
    trained: tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler],
    device: torch.device,
    extra: dict[str, object],
) -> None:
    """Write a checkpoint of a training loop (one fit, a stacked ensemble or a streamed
    fit): what every loop resumes from, the trained module's, optimizer's and scheduler's
    states and the random state, plus the loop's own bookkeeping in ``extra``."""
    loss_fn, optimizer, scheduler = trained
    # The random state inside the loop's seeded scope: the next epoch's shuffle and
    # particle draws continue from exactly here after a resume.
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    write_archive(
        path,
        _CHECKPOINT_KIND,
        CHECKPOINT_VERSION,
        {
            "config": _resume_config(config),
            "identity": identity,
            "data": data,
            "epoch": next_epoch,
            "state": dict(loss_fn.state_dict()),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng,
            **extra,
        },
    )


def _read_checkpoint(
    path: str | os.PathLike[str],
    config: FitConfig,
    identity: object,
    data: dict[str, object],
    loss_fn: nn.Module,
) -> dict:
    """Read a checkpoint after checking, before its tensors are read, that it was written
    by this fit: same settings, same structure, same data; then that its constants
    (buffers) agree. Raises ``ValueError`` naming every difference."""
    where = repr(os.fspath(path))
    live = loss_fn.state_dict()

    def check(saved: dict) -> None:
        if not isinstance(saved, dict) or not all(
            isinstance(saved.get(k), dict) for k in ("config", "data", "state", "best_state")
        ):
            raise ModelFileError(f"{where} is not a checkpoint this bayes_mdn can resume")
        problems = _setting_differences(saved, config, identity)
        if not problems:
            problems = _structure_differences(saved["state"], live)
        data_problem = None
        old = saved["data"]
        if old.get("dtype") != data["dtype"]:
            if not problems:
                problems.append(f"data dtype: checkpoint {old.get('dtype')}, now {data['dtype']}")
        elif old.get("shapes") != data["shapes"]:
            data_problem = (
                f"x and y of shapes {_shapes(old.get('shapes'))}, now {_shapes(data['shapes'])}"
            )
        elif old.get("digest") != data["digest"]:
            data_problem = "x or y differ"
        if problems:
            also = f" and for other data ({data_problem})" if data_problem else ""
            raise ValueError(
                f"cannot resume from {where}: it was written with other settings "
                f"({'; '.join(problems)}){also}; resume with the same settings or start a "
                "new checkpoint"
            )
        if data_problem:
            raise ValueError(
                f"cannot resume from {where}: it was written for other data ({data_problem}); "
                "resume with the same data or start a new checkpoint"
            )
        if _structure_differences(saved["best_state"], live):
            raise ModelFileError(f"{where} is corrupted: its best state does not fit the model")

    saved = read_archive(path, _CHECKPOINT_KIND, CHECKPOINT_VERSION, check=check)
    constants = [
        name
        for name, _ in loss_fn.named_buffers()
        if name in live and not torch.equal(saved["state"][name], live[name].detach().cpu())
    ]
    if constants:
        detail = "; ".join(
            f"{name}: checkpoint {_brief(saved['state'][name])}, now {_brief(live[name])}"
            for name in constants
        )
        raise ValueError(
            f"cannot resume from {where}: its model has other constants ({detail}), as from "
            "another prior scale or standardization; resume with the same model or start a "
            "new checkpoint"
        )
    return saved


def _setting_differences(saved: dict, config: FitConfig, identity: object) -> list[str]:
    """'name: checkpoint old, now new' for each loop setting or identity entry that differs
    (the identity only when this fit passes one)."""
    old = dict(saved["config"])
    now = _resume_config(config)
    if identity is not None:
        saved_identity = saved.get("identity")
        old = (saved_identity if isinstance(saved_identity, dict) else {}) | old
        now = dict(identity) | now  # type: ignore[call-overload]
    return [
        f"{k}: checkpoint {old.get(k)!r}, now {now.get(k)!r}"
        for k in sorted(old.keys() | now.keys())
        if old.get(k) != now.get(k)
    ]


def _structure_differences(saved: dict, live: Mapping[str, Tensor]) -> list[str]:
    """What differs between the parameters and buffers a checkpoint stores and those of
    the loss module now: names, dtypes (once per pair of dtypes), shapes."""
    problems = []
    old_only = sorted(saved.keys() - live.keys())
    new_only = sorted(live.keys() - saved.keys())
    if old_only:
        problems.append(f"parameters only in the checkpoint: {_few(old_only)}")
    if new_only:
        problems.append(f"parameters only in the model now: {_few(new_only)}")
    dtypes: dict[tuple[torch.dtype, torch.dtype], str] = {}
    shapes: list[str] = []
    for name in sorted(saved.keys() & live.keys()):
        old, new = saved[name], live[name]
        if not isinstance(old, (TensorSpec, Tensor)):
            problems.append(f"{name}: the checkpoint holds no tensor")
            continue
        if old.dtype != new.dtype:
            dtypes.setdefault((old.dtype, new.dtype), name)
        elif tuple(old.shape) != tuple(new.shape):
            shapes.append(
                f"shape of {name}: checkpoint {tuple(old.shape)}, now {tuple(new.shape)}"
            )
    problems += [f"dtype: checkpoint {a}, now {b}" for a, b in dtypes]
    problems += shapes[:5] + (
        [f"{len(shapes) - 5} more tensors of other shapes"] if len(shapes) > 5 else []
    )
    return problems


def _few(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _shapes(shapes: object) -> str:
    if isinstance(shapes, list) and all(isinstance(s, list) for s in shapes):
        return " and ".join(str(tuple(s)) for s in shapes)
    return repr(shapes)


def _brief(t: Tensor) -> str:
    t = t.detach().cpu()
    return f"{t.item():g}" if t.numel() == 1 else f"a tensor of shape {tuple(t.shape)}"


def _restore_loop(
    saved: dict,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
) -> tuple[int, float, int, dict, FitHistory]:
    """Put a checkpoint's loop state back; returns (first epoch, best score, stale
    epochs, best state, history)."""
    loss_fn.load_state_dict(saved["state"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["cpu"])
    if device.type == "cuda" and "cuda" in saved["rng"]:
        torch.cuda.set_rng_state(saved["rng"]["cuda"], device)
    best_state = {k: v.to(device) for k, v in saved["best_state"].items()}
    history = FitHistory(**saved["history"])
    return (
        int(saved["epoch"]),
        float(saved["best_score"]),
        int(saved["stale"]),
        best_state,
        history,
    )


def fit_nuts(
    model: MixtureDensityModel,
    x: Tensor,
    y: Tensor,
    num_samples: int = 200,
    warmup_steps: int = 200,
    num_chains: int = 2,
    max_tree_depth: int = 5,
    seed: int | None = 0,
    init_values: dict[str, Tensor] | None = None,
    progress: bool = False,
) -> tuple[dict[str, Tensor], dict[str, object]]:
    """A reference posterior of the latent weights by NUTS (Pyro's ``MCMC``).

    The model's point-estimated parameters stay as they are (fit them first, e.g. by
    :func:`fit_svi`); only the latent sites are sampled. Chains run one after another in
    this process, each seeded ``seed + chain``: forked or spawned worker processes are
    fragile with module-local Pyro parameters and gain nothing on a 2-core machine.

    Cost: every NUTS step evaluates the full-data gradient up to ``2**max_tree_depth``
    times, through Pyro's tracing (milliseconds per evaluation even for tiny nets), so
    a depth of 10 costs about 30 times a depth of 5 (measured times:
    docs/notes.md). Cost grows with data size times tree size,
    and multimodal mixture posteriors mix slowly (a K = 2 fit on the inverse-sine problem
    had a bulk ESS of 7 in 300 draws), so beyond a few hundred latent weights or a few
    thousand points NUTS stops being practical here: use SVI and check it with the PSIS
    k-hat of :func:`bayes_mdn.diagnostics.variational_khat`.

    Parameters
    ----------
    model : MixtureDensityModel with at least one latent site
    x : Tensor of shape (n, d_x)
    y : Tensor of shape (n, d_y)
    num_samples, warmup_steps : kept draws and adaptation steps per chain
    num_chains : independent chains (needed for R-hat)
    max_tree_depth : NUTS tree depth cap; 5 keeps a step under 32 gradient evaluations
    seed : seed of chain 0; None for fresh randomness
    init_values : starting point of every chain, {site: Tensor (*site_shape)}; default
        the network's initialization (or pass a fitted guide's median)
    progress : show Pyro's progress bar

    Returns
    -------
    samples : dict from site name to Tensor of shape (num_chains, num_samples, *site_shape)
    info : dict with "divergences" (per chain), "seconds" and the settings used
    """
    from pyro.infer import MCMC, NUTS
    from pyro.infer.autoguide import init_to_value

    if not model.latent_shapes:
        raise ValueError("NUTS needs latent weights: the model has bayesian='none'")
    for name, value in (
        ("num_samples", num_samples),
        ("warmup_steps", warmup_steps),
        ("num_chains", num_chains),
        ("max_tree_depth", max_tree_depth),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if x.dim() != 2 or y.dim() != 2 or len(x) != len(y):
        raise ValueError(
            f"x and y must be (n, d_x) and (n, d_y) with the same n, got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    init = model.initial_values() if init_values is None else dict(init_values)
    start = time.perf_counter()
    chains: list[dict[str, Tensor]] = []
    divergences: list[int] = []
    for chain in range(num_chains):
        chain_seed = None if seed is None else seed + chain
        with pyro_scope(), seeded(chain_seed, x.device):
            kernel = NUTS(
                model,
                max_tree_depth=max_tree_depth,
                jit_compile=False,
                init_strategy=init_to_value(values=init),
            )
            mcmc = MCMC(
                kernel,
                num_samples=num_samples,
                warmup_steps=warmup_steps,
                num_chains=1,
                disable_progbar=not progress,
            )
            mcmc.run(x, y)
        chains.append({k: v.detach() for k, v in mcmc.get_samples().items()})
        divergences.append(len(mcmc.diagnostics().get("divergences", {}).get("chain 0", [])))
    samples = {name: torch.stack([c[name] for c in chains]) for name in model.latent_shapes}
    info: dict[str, object] = {
        "divergences": divergences,
        "seconds": time.perf_counter() - start,
        "num_chains": num_chains,
        "num_samples": num_samples,
        "warmup_steps": warmup_steps,
        "max_tree_depth": max_tree_depth,
    }
    return samples, info
