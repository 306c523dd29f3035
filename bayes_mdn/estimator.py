"""``BayesianMDN``: the scikit-learn style front door to the library."""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import torch
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import Tensor

from . import predict as _predict
from ._archive import write_archive
from ._utils import pyro_scope, resolve_device, seeded
from ._validation import (
    as_2d_float,
    as_levels,
    check_dtype_range,
    check_dtype_resolution,
    check_seed,
    standardization,
)
from .fit import (
    FitConfig,
    FitHistory,
    check_checkpoint_args,
    checkpoint_identity,
    fit_nuts,
    fit_svi,
)
from .guides import GUIDES, EmpiricalGuide, EnsembleGuide, make_guide
from .model import BAYESIAN_LAYERS, MixtureDensityModel
from .nets import ACTIVATIONS, COVARIANCES, MixtureDensityNetwork, MixtureParams
from .sources import ArraySource, Source, as_source
from .stacked import can_stack, fit_stacked
from .streaming import StreamJob, fit_streamed, scan

__all__ = ["BayesianMDN", "auto_components"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}
METHODS = ("svi", "nuts")
#: Kind and layout version of the model files ``save`` writes and :func:`bayes_mdn.load`
#: reads; the version is bumped whenever a file of the old layout could not be read
#: correctly by the new code.
MODEL_FILE_KIND = "model"
MODEL_FORMAT_VERSION = 1


class BayesianMDN(RegressorMixin, BaseEstimator):
    """A Bayesian mixture density network for p(y | x), fitted by SVI in Pyro.

    Parameters
    ----------
    n_components : int or "auto"
        Number of Gaussian components K. ``"auto"`` grows K with the training rows n as
        round(n ** (1/3)), between 3 and 20 (:func:`auto_components`): the cube-root rate
        at which histogram and mixture resolution grow with data (Scott's rule), so a
        hundred rows get a few components and tens of thousands get 20.
    n_members : int
        Independently fitted members pooled into one predictive mixture (a deep
        ensemble; with Bayesian members, an ensemble of posteriors). Each member has its
        own initialization (seed + m), mini-batches and validation split. One fit sits in
        one mode of the posterior and is confidently wrong where there are no data;
        pooled members disagree there, which is what honest epistemic uncertainty needs.
        With the ``"delta"`` and ``"normal"`` guides the members are trained together as
        one stacked network (:mod:`bayes_mdn.stacked`): one optimizer step updates every
        member by its own gradient, at a fraction of the cost of separate fits; each
        member still stops early on its own validation score. Other guides fit the
        members one by one (see ``n_jobs``).
    n_jobs : int or None
        Worker processes that fit the members one by one (joblib), as scikit-learn reads
        it: None is one (this process), -1 every core. Parallel members give the same
        numbers as sequential ones. Stacked members (guides ``"delta"`` and
        ``"normal"``) are trained in this process and ignore it.
    devices : int
        Processes of a data-parallel fit (DDP through Lightning Fabric: gloo on the CPU,
        NCCL on GPUs with ``device="cuda"``, one GPU each). Above 1 the fit runs the
        streamed loop (:mod:`bayes_mdn.streaming`) even for in-memory arrays; each
        process takes an equal slice of every mini-batch and the objective is the
        one-process objective of that mini-batch. Needs the ``scale`` extra. Spawned
        processes re-import the calling script: guard it with
        ``if __name__ == "__main__":``.
    hidden : sequence of int
        Hidden layer widths. A narrow last hidden layer keeps the Bayesian output layer
        small, which mean-field posteriors handle better.
    activation : {"relu", "tanh", "elu", "gelu", "silu"}
        ReLU by default: its features grow linearly away from the data, so members that
        agree inside the data disagree outside it, where tanh features saturate and
        members agree confidently (measured on the data-with-a-hole problem of notebook
        02; see docs/defaults.md).
    bayesian : {"none", "last", "all"} or sequence of str
        Layers whose weights get a Gaussian prior and a posterior: none (maximum
        likelihood), the output layer, or every layer (a backbone's included); or the
        parameters whose names match any of these glob patterns, such as
        ``["head.*", "backbone.4.*"]`` (see :func:`bayes_mdn.model.latent_parameters`).
    guide : {"delta", "normal", "lowrank"}
        Variational family: MAP point estimates, mean-field Gaussian, or low-rank
        plus diagonal Gaussian.
    covariance : {"diagonal", "full"}
        Component covariance for vector targets (identical for one-dimensional y).
    prior_scale : float
        A latent weight matrix gets the prior Normal(0, prior_scale / sqrt(fan_in)), a
        latent bias Normal(0, prior_scale). The default is weak on purpose, for data sets of
        thousands of rows: on the inverse-sine problem (5,000 rows) narrower priors (1 to 8)
        shrink the output layer and cost 0.02 to 0.14 nats of test NLL. On a few hundred
        rows a unit prior (``prior_scale=1``) can help (Old Faithful, measured without
        prior functions: docs/defaults.md); notebook 03 compares models under one.
    min_scale : float
        Floor on component standard deviations, in standardized units of y. It stops
        components from collapsing onto single points; keep it below the narrowest
        feature of p(y | x) (0.02 is 2 % of the target's spread).
    prior_function : float
        Scale of each member's randomized prior function (Osband et al., 2018), in
        standard deviations of y; 0 for none. Every member adds to its component means a
        fixed random network of its own (same widths and activation, never trained; see
        :class:`~bayes_mdn.nets.MixtureDensityNetwork`). In the data the trained network
        cancels it; where there are no data it stays, so the members of an ensemble
        disagree there: a prior over functions that a last-layer posterior lacks. On the
        data-with-a-hole problem of notebook 02, 0.5 raised the 90 % interval's coverage
        in the hole from about 0.76 to about 0.90 (three seeds) with coverage and NLL in
        the data unchanged (docs/defaults.md).
    init_scale : float
        Initial posterior standard deviation of the Gaussian guides; their means start at
        the network's initialization.
    rank : int or None
        Rank of the ``"lowrank"`` guide; None picks sqrt(number of latent weights).
    epochs, batch_size, lr, lr_schedule, clip_norm, num_particles, val_fraction,
    patience, val_draws, input_noise, jit :
        The SVI loop of each member, see :class:`bayes_mdn.fit.FitConfig`. By default the
        budget is counted in optimizer steps (``epochs="auto"``) and each member holds out
        ``val_fraction`` of the rows and stops when their log predictive density has not
        improved for ``patience="auto"`` steps, keeping its best state.
    num_draws : int
        Posterior draws behind every prediction (one for deterministic guides).
    dtype : {"float32", "float64"}
    device : {"auto", "cpu", "cuda", "cuda:N"}
    seed : int or None
        Seeds the initialization, the fit and, unless a call passes its own, the
        posterior draws of every prediction. None gives fresh randomness each time.
    progress : bool
        Show a progress bar while fitting.
    num_threads : int or None
        Torch threads while fitting on the CPU (restored afterwards); None leaves torch's
        setting alone. See :class:`bayes_mdn.fit.FitConfig`.
    checkpoint : str, os.PathLike or None
        File where ``fit`` writes a checkpoint of the SVI loop (atomically), so that an
        interrupted fit can continue; None writes none. Stacked members share this one
        file; members fitted one by one write ``<checkpoint>.member<m>`` each.
    checkpoint_every : int
        Epochs between checkpoints (the last epoch is always written).
    resume : bool
        Continue from ``checkpoint`` when the file exists, ending at the same parameters
        as an uninterrupted fit; the checkpoint's settings and data must match. See
        :func:`bayes_mdn.fit.fit_svi`.
    num_chains, nuts_warmup, nuts_samples, max_tree_depth :
        The NUTS run of ``method="nuts"``: independent chains (run one after another),
        adaptation steps and kept draws per chain, and the tree depth cap. See
        :func:`bayes_mdn.fit.fit_nuts` for what they cost.
    method : {"svi", "nuts"}
        ``"svi"``: the guide is the posterior. ``"nuts"``: SVI first fits the point-estimated
        layers and gives a starting point, then NUTS samples the latent weights and
        ``guide_`` becomes an :class:`~bayes_mdn.guides.EmpiricalGuide` over those draws,
        so every prediction method works unchanged. Slow: a reference for small problems.
    backbone : torch.nn.Module or None
        Your own network in front of the hidden layers and the mixture head: any module
        that maps a batch of X's rows, shape (n, n_features_in_), to features of shape
        (n, F) (F is found by one call on zeros). It may reshape its input first (for
        example ``nn.Unflatten(1, (1, 8, 8))`` in front of a convolutional net for 8 x 8
        images passed as 64 columns). Each ensemble member starts from a copy of it as
        given, so pretrained weights are kept (and a freshly built module should be built
        under a fixed torch seed for a reproducible fit); its parameters are named ``backbone.*``
        and ``bayesian="all"`` or name patterns make them latent. X is standardized per
        column first, as without a backbone. Saving stores its weights (no pickle);
        :func:`bayes_mdn.load` then needs ``backbone=`` a module built the same way, and
        checks that it matches. See :class:`~bayes_mdn.nets.MixtureDensityNetwork` for
        what it must support (``torch.func.vmap``).

    Attributes
    ----------
    model_ : MixtureDensityModel
        The first member's model (every member has its architecture and standardization).
    guide_ : torch.nn.Module
        The posterior: an :class:`~bayes_mdn.guides.EnsembleGuide` over the members, or
        the one member's guide when ``n_members=1``.
    history_ : FitHistory
        The first member's history.
    histories_ : list of FitHistory
        One per member.
    n_components_ : int
        K used (``n_components`` with ``"auto"`` resolved).
    n_members_ : int
        Members fitted (one with ``method="nuts"``).
    n_steps_ : int
        The members' optimizer steps added up (``sum(h.steps for h in histories_)``;
        stacked members take theirs together, see ``n_members``).
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Only when X was a DataFrame with string column names.
    n_outputs_ : int
    nuts_info_ : dict
        Only after ``method="nuts"``: divergences per chain, seconds and settings.

    Notes
    -----
    ``fit`` also takes data that does not fit in memory: a
    :class:`~bayes_mdn.sources.ParquetSource`, a ``torch.utils.data.DataLoader`` or
    another re-iterable of ``(x, y)`` batches, with ``y=None``. It reads the stream once
    for the row count, standardization and held-out rows, then trains on mini-batches cut
    from windows of the stream (:mod:`bayes_mdn.streaming`), in memory flat in the number
    of rows. Members then share their held-out rows and mini-batches; the ``"lowrank"``
    guide and ``method="nuts"`` are for in-memory data only.

    Inputs and targets are standardized inside the model, so targets in any units (say
    scaled by 1e-6 or 1e6) fit alike and densities come back in the user's units. A
    constant target column has no density and raises ``ValueError`` in ``fit``. A fitted
    estimator is saved with :meth:`save` and read back with :func:`bayes_mdn.load`.

    Examples
    --------
    >>> from bayes_mdn.datasets import make_inverse_sine
    >>> X, y = make_inverse_sine(300, seed=0)
    >>> mdn = BayesianMDN(n_components=3, hidden=(16,), epochs=5, progress=False)
    >>> mdn.fit(X, y).predict(X[:2]).shape
    (2,)
    """

    def __init__(
        self,
        n_components: int | Literal["auto"] = "auto",
        n_members: int = 5,
        n_jobs: int | None = None,
        devices: int = 1,
        hidden: Sequence[int] = (64, 16),
        activation: str = "relu",
        bayesian: Literal["none", "last", "all"] = "last",
        guide: Literal["delta", "normal", "lowrank"] = "normal",
        covariance: Literal["diagonal", "full"] = "diagonal",
        prior_scale: float = 32.0,
        min_scale: float = 0.02,
        prior_function: float = 0.5,
        init_scale: float = 1e-3,
        rank: int | None = None,
        epochs: int | Literal["auto"] = "auto",
        batch_size: int | None = 500,
        lr: float = 3e-3,
        lr_schedule: Literal["onecycle", "cosine", "constant"] = "cosine",
        clip_norm: float | None = 10.0,
        num_particles: int = 1,
        val_fraction: float = 0.1,
        patience: int | Literal["auto"] | None = "auto",
        val_draws: int = 16,
        input_noise: float = 0.05,
        jit: bool = False,
        num_draws: int = 100,
        dtype: Literal["float32", "float64"] = "float32",
        device: str = "auto",
        seed: int | None = 0,
        progress: bool = True,
        num_threads: int | None = 1,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 10,
        resume: bool = False,
        num_chains: int = 2,
        nuts_warmup: int = 200,
        nuts_samples: int = 200,
        max_tree_depth: int = 5,
        method: Literal["svi", "nuts"] = "svi",
        backbone: torch.nn.Module | None = None,
    ) -> None:
        self.n_components = n_components
        self.n_members = n_members
        self.n_jobs = n_jobs
        self.devices = devices
        self.hidden = hidden
        self.activation = activation
        self.bayesian = bayesian
        self.guide = guide
        self.covariance = covariance
        self.prior_scale = prior_scale
        self.min_scale = min_scale
        self.prior_function = prior_function
        self.init_scale = init_scale
        self.rank = rank
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.lr_schedule = lr_schedule
        self.clip_norm = clip_norm
        self.num_particles = num_particles
        self.val_fraction = val_fraction
        self.patience = patience
        self.val_draws = val_draws
        self.input_noise = input_noise
        self.jit = jit
        self.num_draws = num_draws
        self.dtype = dtype
        self.device = device
        self.seed = seed
        self.progress = progress
        self.num_threads = num_threads
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self.resume = resume
        self.num_chains = num_chains
        self.nuts_warmup = nuts_warmup
        self.nuts_samples = nuts_samples
        self.max_tree_depth = max_tree_depth
        self.method = method
        self.backbone = backbone

    # -- scikit-learn protocol -------------------------------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        return list(cls._get_param_names())

    def __sklearn_tags__(self):  # type: ignore[no-untyped-def]
        tags = super().__sklearn_tags__()
        tags.target_tags.single_output = True
        tags.target_tags.multi_output = True
        # score is the mean log predictive density, not R^2: a density score has no fixed
        # floor such as scikit-learn's "better than the mean" checks assume.
        tags.regressor_tags.poor_score = True
        tags.non_deterministic = self.seed is None
        tags.input_tags.allow_nan = False
        return tags

    def _check_columns(self, X: Any, reset: bool) -> None:
        """Record (``reset``) or check the feature names of a DataFrame ``X``."""
        validate_data(self, X, reset=reset, skip_check_array=True, ensure_2d=False)

    # -- configuration checks --------------------------------------------------------
    def _check_options(self) -> FitConfig:
        if self.backbone is not None and not isinstance(self.backbone, torch.nn.Module):
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
        if self.n_components != "auto" and (
            not isinstance(self.n_components, int)
            or isinstance(self.n_components, bool)
            or (self.n_components < 1)
        ):
            raise ValueError(
                f"n_components must be 'auto' or an integer >= 1, got {self.n_components!r}"
            )
        if isinstance(self.hidden, (str, bytes)) or not all(
            isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in self.hidden
        ):
            raise ValueError(f"hidden must be a sequence of integers >= 1, got {self.hidden!r}")
        for name in ("prior_scale", "min_scale", "init_scale"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        value = self.prior_function
        if isinstance(value, bool) or not (
            isinstance(value, (int, float)) and np.isfinite(value) and value >= 0
        ):
            raise ValueError(f"prior_function must be a finite number >= 0, got {value!r}")
        if self.bayesian == "none" and self.guide != "delta":
            raise ValueError(
                f"guide={self.guide!r} needs latent weights, but bayesian='none' makes every "
                "weight a point estimate: use guide='delta' or bayesian='last'/'all'"
            )
        if (
            not isinstance(self.n_members, int)
            or isinstance(self.n_members, bool)
            or self.n_members < 1
        ):
            raise ValueError(f"n_members must be an integer >= 1, got {self.n_members!r}")
        if self.n_jobs is not None and (
            not isinstance(self.n_jobs, int) or isinstance(self.n_jobs, bool) or self.n_jobs == 0
        ):
            raise ValueError(f"n_jobs must be None or a non-zero integer, got {self.n_jobs!r}")
        if not isinstance(self.devices, int) or isinstance(self.devices, bool) or self.devices < 1:
            raise ValueError(f"devices must be an integer >= 1, got {self.devices!r}")
        if not isinstance(self.num_draws, int) or self.num_draws < 1:
            raise ValueError(f"num_draws must be an integer >= 1, got {self.num_draws!r}")
        check_checkpoint_args(self.checkpoint, self.checkpoint_every, self.resume)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method == "nuts":
            if self.bayesian == "none":
                raise ValueError(
                    "method='nuts' samples latent weights, but bayesian='none' has none: "
                    "use bayesian='last' or 'all'"
                )
            for name in ("num_chains", "nuts_warmup", "nuts_samples", "max_tree_depth"):
                value = getattr(self, name)
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        return FitConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            lr_schedule=self.lr_schedule,
            clip_norm=self.clip_norm,
            num_particles=self.num_particles,
            val_fraction=self.val_fraction,
            patience=self.patience,
            val_draws=self.val_draws,
            input_noise=self.input_noise,
            jit=self.jit,
            seed=self.seed,
            device=self.device,
            progress=self.progress,
            num_threads=self.num_threads,
        )

    # -- fitting ---------------------------------------------------------------------
    def fit(self, X: Any, y: Any = None) -> BayesianMDN:
        """Fit the model to inputs X of shape (n, d_x) and targets y of shape (n,) or (n, d_y).

        X may instead be a data source that yields (x, y) batches, with ``y=None``: a
        :class:`~bayes_mdn.sources.ParquetSource`, a ``torch.utils.data.DataLoader`` (with
        ``shuffle=False``) or another re-iterable of pairs. It is streamed, never loaded
        whole (see the class notes and :mod:`bayes_mdn.streaming`).

        Returns
        -------
        self
        """
        config = self._check_options()
        if isinstance(X, (str, bytes, os.PathLike)):
            raise TypeError(
                f"fit takes arrays or a data source, got the path {X!r}: read a Parquet "
                "file with bayes_mdn.ParquetSource(path, x=[...], y=[...]) and pass that"
            )
        source = as_source(X)
        if source is not None:
            if y is not None:
                raise ValueError(
                    f"X is a data source ({source.describe()}) that yields (x, y) itself; "
                    "call fit(source) with y=None"
                )
            return self._fit_streamed(source, config)
        if y is None:
            raise ValueError(
                "BayesianMDN requires y to be passed, but the target y is None: fit(X, y) "
                "learns a density of y given X"
            )
        self._check_columns(X, reset=True)
        x_arr, _ = as_2d_float(X, "X", allow_1d=False)
        y_arr, y_1d = as_2d_float(y, "y", allow_1d=True)
        for name, arr in (("X", x_arr), ("y", y_arr)):
            check_dtype_range(arr, name, self.dtype)
            check_dtype_resolution(arr, name, self.dtype)
        if len(x_arr) != len(y_arr):
            raise ValueError(
                f"X and y must have the same number of rows, got {len(x_arr)} and {len(y_arr)}"
            )
        if len(x_arr) < 2:
            raise ValueError(f"fit needs at least 2 rows, got n_samples = {len(x_arr)}")
        y_std = y_arr.std(0)
        if (y_std == 0).any():
            col = int(np.argmax(y_std == 0))
            raise ValueError(
                f"y column {col} is constant ({y_arr[0, col]}): a density over a constant "
                "target is degenerate; drop that column or add measurement noise"
            )
        if self.devices > 1:
            return self._fit_streamed(ArraySource(x_arr, y_arr, y_1d=y_1d), config)
        n_val = int(round(len(x_arr) * config.val_fraction))
        if len(x_arr) - n_val < 2:
            raise ValueError(
                f"need at least 2 training rows after holding out val_fraction="
                f"{config.val_fraction}, got {len(x_arr)} rows"
            )
        device = resolve_device(config.device)
        dtype = DTYPES[self.dtype]
        x = torch.as_tensor(x_arr, dtype=dtype, device=device)
        yt = torch.as_tensor(y_arr, dtype=dtype, device=device)
        x_loc, x_scale, y_loc, y_scale = (
            torch.as_tensor(s, dtype=dtype, device=device) for s in standardization(x_arr, y_arr)
        )
        stats = (x_loc, x_scale, y_loc, y_scale)
        self.n_components_ = (
            auto_components(len(x_arr) - n_val)
            if self.n_components == "auto"
            else int(self.n_components)
        )
        # method="nuts" samples one model's latent weights: one SVI member is its start.
        n_members = 1 if self.method == "nuts" else self.n_members
        seeds = [None if self.seed is None else self.seed + m for m in range(n_members)]
        members = [self._build_model(x.shape[1], yt.shape[1], stats, s) for s in seeds]
        jobs = [
            (seed, replace(config, seed=seed), _member_path(self.checkpoint, m, n_members))
            for m, seed in enumerate(seeds)
        ]
        n_jobs = min(_n_workers(self.n_jobs), n_members)
        if n_members > 1 and can_stack([guide for _, guide in members]):
            histories = fit_stacked(
                [model for model, _ in members],
                [guide for _, guide in members],
                x,
                yt,
                config,
                seeds,
                checkpoint=self.checkpoint,
                checkpoint_every=self.checkpoint_every,
                resume=self.resume,
                identity=checkpoint_identity(self.get_params()),
            )
        elif n_jobs == 1:
            histories = [
                self._fit_member(x, yt, model, guide, config, checkpoint)
                for (model, guide), (_, config, checkpoint) in zip(members, jobs)
            ]
        else:
            histories = _fit_in_workers(self, x, yt, stats, members, jobs, n_jobs)
        models = [model for model, _ in members]
        guides = [guide for _, guide in members]
        self.histories_: list[FitHistory] = histories
        self.history_: FitHistory = histories[0]
        self.n_members_ = n_members
        self.n_steps_ = sum(h.steps for h in histories)
        model = models[0]
        guide = guides[0] if n_members == 1 else EnsembleGuide(models, guides)
        if self.method == "nuts":
            with pyro_scope(), torch.no_grad():
                start = {k: v.detach() for k, v in guide.median().items()}
            samples, self.nuts_info_ = fit_nuts(
                model,
                x,
                yt,
                num_samples=self.nuts_samples,
                warmup_steps=self.nuts_warmup,
                num_chains=self.num_chains,
                max_tree_depth=self.max_tree_depth,
                seed=self.seed,
                init_values=start,
                progress=self.progress,
            )
            guide = EmpiricalGuide(samples)
        self.model_ = model
        self.guide_ = guide
        self.n_features_in_ = x.shape[1]
        self.n_outputs_ = yt.shape[1]
        self._y_1d = y_1d
        return self

    def _fit_streamed(self, source: Source, config: FitConfig) -> BayesianMDN:
        """Fit on a streamed source (:mod:`bayes_mdn.streaming`), on ``devices``
        processes."""
        if self.method != "svi":
            raise ValueError(
                f"method={self.method!r} needs the data in memory; streamed data and "
                "devices > 1 are fitted with method='svi'"
            )
        if self.guide not in ("delta", "normal"):
            raise ValueError(
                f"guide={self.guide!r} is fitted on in-memory data only; streamed data and "
                "devices > 1 use guide='delta' or 'normal'"
            )
        if config.seed is None:
            # Every process must draw the same numbers: fix one fresh seed for all.
            config = replace(config, seed=int(np.random.SeedSequence().generate_state(1)[0]))
        seed = config.seed
        assert seed is not None
        plan = scan(source, seed, config.val_fraction)
        largest = float(torch.finfo(DTYPES[self.dtype]).max)
        for what, names, absmax in (
            ("input", source.x_names, plan.x_absmax),
            ("target", source.y_names, plan.y_absmax),
        ):
            if (absmax > largest).any():
                col = int(np.argmax(absmax > largest))
                name = repr(names[col]) if names is not None else f"column {col}"
                raise ValueError(
                    f"{what} {name} holds values up to {absmax[col]:.3g}, beyond the "
                    f"{self.dtype} range ({largest:.3g}): use dtype='float64' or rescale"
                )
        self.n_components_ = (
            auto_components(plan.n_train)
            if self.n_components == "auto"
            else int(self.n_components)
        )
        job = StreamJob(
            source=source,
            plan=plan,
            build=functools.partial(self._build_model, plan.d_x, plan.d_y),
            seeds=[seed + m for m in range(self.n_members)],
            config=config,
            dtype=DTYPES[self.dtype],
            checkpoint=None if self.checkpoint is None else os.fspath(self.checkpoint),
            checkpoint_every=self.checkpoint_every,
            resume=self.resume,
            identity=checkpoint_identity(self.get_params()),
        )
        models, guides, histories = fit_streamed(job, self.devices)
        self.histories_ = histories
        self.history_ = histories[0]
        self.n_members_ = len(models)
        self.n_steps_ = sum(h.steps for h in histories)
        self.model_ = models[0]
        self.guide_ = guides[0] if len(models) == 1 else EnsembleGuide(models, guides)
        self.n_features_in_ = plan.d_x
        self.n_outputs_ = plan.d_y
        self._y_1d = source.y_1d
        # For arrays fit() has set or cleared the DataFrame's column names. A source's
        # columns are not recorded as feature names, as a CSV fit's are not: predictions
        # take arrays in the order of its x columns.
        if not isinstance(source, ArraySource) and hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        self.n_rows_ = plan.n_rows
        return self

    def _fit_member(
        self,
        x: Tensor,
        y: Tensor,
        model: MixtureDensityModel,
        guide: torch.nn.Module,
        config: FitConfig,
        checkpoint: str | None,
    ) -> FitHistory:
        """Fit one member in place (model and guide hold its fitted state afterwards)."""
        return fit_svi(
            model,
            guide,
            x,
            y,
            config,
            checkpoint=checkpoint,
            checkpoint_every=self.checkpoint_every,
            resume=self.resume,
            identity=checkpoint_identity(self.get_params()),
        )

    # -- persistence -----------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write this fitted estimator to ``path`` atomically; read it with
        :func:`bayes_mdn.load`.

        The file is a bayes_mdn archive (safetensors, no pickle): a JSON header with the
        constructor arguments, the fitted metadata, the library and format versions, and
        the model's and guide's tensors. Parent folders are created; an existing file is
        replaced only once the new one is completely written.

        Raises
        ------
        NotFittedError
            Before ``fit``.
        TypeError
            When ``path`` is not a str or os.PathLike.
        ValueError
            When a parameter holds NaN or infinite values (nothing is written).
        """
        from . import __version__

        self._check_fitted()
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
        params = self.get_params()
        if params.get("checkpoint") is not None:
            params["checkpoint"] = os.fspath(params["checkpoint"])
        if params.get("backbone") is not None:
            # The module itself is code: the file names its class and stores its weights
            # with the model's; load(path, backbone=...) supplies a module to hold them.
            params["backbone"] = {"class": backbone_class(params["backbone"])}
        if not isinstance(params.get("bayesian"), str):
            params["bayesian"] = list(params["bayesian"])
        header = {
            "library_version": __version__,
            "params": params,
            "fitted": {
                "n_features_in_": self.n_features_in_,
                "n_outputs_": self.n_outputs_,
                "y_1d": bool(self._y_1d),
                "history": self.history_.to_dict(),
                "histories": [h.to_dict() for h in self.histories_],
                "n_components_": self.n_components_,
                "feature_names_in_": [str(c) for c in getattr(self, "feature_names_in_", [])],
            },
            "model": dict(self.model_.state_dict()),
            "guide": dict(self.guide_.state_dict()),
        }
        write_archive(path, MODEL_FILE_KIND, MODEL_FORMAT_VERSION, header)

    def _build_model(
        self,
        d_x: int,
        d_y: int,
        stats: tuple[Tensor, Tensor, Tensor, Tensor],
        init_seed: int | None,
    ) -> tuple[MixtureDensityModel, torch.nn.Module]:
        """The network, Pyro model and guide these settings describe (not yet fitted).

        ``stats`` is (x_loc, x_scale, y_loc, y_scale), on the device and dtype the model
        should live on; ``init_seed`` seeds the network's initialization.
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
                n_components=self.n_components_,
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

    # -- prediction ------------------------------------------------------------------
    def _check_fitted(self) -> None:
        """Raise scikit-learn's ``NotFittedError`` (a ValueError and AttributeError)
        before ``fit``."""
        check_is_fitted(self, "model_")

    def _x(self, X: Any) -> Tensor:
        self._check_fitted()
        self._check_columns(X, reset=False)
        arr, _ = as_2d_float(X, "X", allow_1d=False)
        if arr.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {arr.shape[1]} features, but BayesianMDN is expecting "
                f"{self.n_features_in_} features as input"
            )
        ref = self.model_.prior_scale
        check_dtype_range(arr, "X", ref.dtype)
        return torch.as_tensor(arr, dtype=ref.dtype, device=ref.device)

    def _y(self, y: Any, n: int) -> Tensor:
        arr, _ = as_2d_float(y, "y", allow_1d=True)
        if arr.shape[1] != self.n_outputs_:
            raise ValueError(
                f"y has {arr.shape[1]} outputs, but this model was fitted with {self.n_outputs_}"
            )
        if len(arr) != n:
            raise ValueError(f"X and y must have the same number of rows, got {n} and {len(arr)}")
        ref = self.model_.prior_scale
        check_dtype_range(arr, "y", ref.dtype)
        return torch.as_tensor(arr, dtype=ref.dtype, device=ref.device)

    def _draws(self, num_draws: int | None) -> int:
        return self.num_draws if num_draws is None else num_draws

    def _seed(self, seed: int | Literal["default"] | None) -> int | None:
        if isinstance(seed, str) and seed == "default":
            return self.seed
        return check_seed(seed, also="'default' (the estimator's seed)")

    def _out(self, t: Tensor) -> np.ndarray:
        """To NumPy, dropping the output axis (the last) for 1-D targets."""
        arr = t.detach().cpu().numpy().astype(np.float64)
        return arr[..., 0] if self._y_1d else arr

    def predict(self, X: Any, num_draws: int | None = None, seed: Any = "default") -> np.ndarray:
        """Posterior-predictive mean, shape (n,) for 1-D y, else (n, d_y)."""
        x = self._x(X)
        m = _predict.predictive_mean(
            self.model_, self.guide_, x, self._draws(num_draws), self._seed(seed)
        )
        return self._out(m)

    def predict_std(
        self, X: Any, num_draws: int | None = None, seed: Any = "default"
    ) -> np.ndarray:
        """Posterior-predictive standard deviation, shape (n,) or (n, d_y)."""
        x = self._x(X)
        s = _predict.predictive_std(
            self.model_, self.guide_, x, self._draws(num_draws), self._seed(seed)
        )
        return self._out(s)

    def predict_quantiles(
        self, X: Any, q: Any, num_draws: int | None = None, seed: Any = "default"
    ) -> np.ndarray:
        """Quantiles of the exact predictive CDF: shape (n, m) or (n, m, d_y) for m levels."""
        x = self._x(X)
        q_t = torch.as_tensor(as_levels(q, "q"), dtype=x.dtype)
        out = _predict.predictive_quantiles(
            self.model_, self.guide_, x, q_t.to(x.device), self._draws(num_draws), self._seed(seed)
        )
        return self._out(out)

    def predict_interval(
        self, X: Any, level: float = 0.9, num_draws: int | None = None, seed: Any = "default"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Central predictive interval (lower, upper), each of shape (n,) or (n, d_y)."""
        x = self._x(X)
        lo, hi = _predict.predictive_interval(
            self.model_, self.guide_, x, level, self._draws(num_draws), self._seed(seed)
        )
        return self._out(lo), self._out(hi)

    def predict_modes(
        self, X: Any, num_draws: int = 16, seed: Any = "default"
    ) -> list[np.ndarray]:
        """Modes of the predictive density at each x, highest first.

        Returns a list of n arrays, each of shape (n_modes,) for 1-D y or
        (n_modes, d_y).
        """
        x = self._x(X)
        modes, _ = _predict.predictive_modes(
            self.model_, self.guide_, x, num_draws, self._seed(seed)
        )
        out = []
        for row in modes.cpu().numpy():
            row = row[~np.isnan(row).any(-1)]
            out.append(row[:, 0] if self._y_1d else row)
        return out

    def sample(
        self, X: Any, n_samples: int = 100, seed: Any = "default", sampler: str = "predictive"
    ) -> np.ndarray:
        """Posterior-predictive draws: shape (n_samples, n) or (n_samples, n, d_y).

        ``sampler="predictive"`` draws through ``pyro.infer.Predictive``; ``"direct"`` calls
        the same sampler without Pyro's tracing (see
        :func:`bayes_mdn.predict.sample_predictive`); docs/benchmarks.md times both.
        """
        x = self._x(X)
        s = _predict.sample_predictive(
            self.model_, self.guide_, x, n_samples, self._seed(seed), sampler=sampler
        )
        return self._out(s)

    def log_prob(
        self, X: Any, y: Any, num_draws: int | None = None, seed: Any = "default"
    ) -> np.ndarray:
        """Log posterior-predictive density log p(y | x, D) per point, shape (n,)."""
        x = self._x(X)
        yt = self._y(y, len(x))
        lp = _predict.log_predictive_density(
            self.model_, self.guide_, x, yt, self._draws(num_draws), self._seed(seed)
        )
        return lp.cpu().numpy()

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """Mean log predictive density per point (higher is better; nats).

        This is the estimator's scikit-learn score (``cross_val_score``, ``GridSearchCV``
        and ``Pipeline.score`` use it), not the R^2 of ``RegressorMixin``: for a density
        model the log score is the proper scoring rule. ``sample_weight`` of shape (n,)
        gives a weighted mean.
        """
        log_p = self.log_prob(X, y)
        if sample_weight is None:
            return float(log_p.mean())
        w, _ = as_2d_float(sample_weight, "sample_weight", allow_1d=True)
        if w.shape != (len(log_p), 1) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(
                f"sample_weight must be {len(log_p)} non-negative numbers with a positive "
                f"sum, got shape {w.shape}"
            )
        return float(np.average(log_p, weights=w[:, 0]))

    def predictive_mixture(
        self, X: Any, num_draws: int | None = None, seed: Any = "default"
    ) -> MixtureParams:
        """The predictive at each x as one Gaussian mixture of S*K components (tensors)."""
        x = self._x(X)
        return _predict.predictive_mixture(
            self.model_, self.guide_, x, self._draws(num_draws), self._seed(seed)
        )

    def uncertainty(
        self, X: Any, num_draws: int | None = None, seed: Any = "default"
    ) -> dict[str, np.ndarray]:
        """Predictive variance split into aleatoric and epistemic parts, each (n,) or (n, d_y)."""
        x = self._x(X)
        parts = _predict.uncertainty_decomposition(
            self.model_, self.guide_, x, self._draws(num_draws), self._seed(seed)
        )
        return {k: self._out(v) for k, v in parts.items()}

    def predict_covariance(
        self, X: Any, num_draws: int | None = None, seed: Any = "default"
    ) -> np.ndarray:
        """Covariance matrix of the posterior predictive, shape (n, d_y, d_y).

        Kept 3-D even for 1-D y (then (n, 1, 1)): a covariance is a matrix.
        """
        x = self._x(X)
        cov = _predict.predictive_covariance(
            self.model_, self.guide_, x, self._draws(num_draws), self._seed(seed)
        )
        return cov.cpu().numpy()

    def predict_cdf(
        self, X: Any, y: Any, num_draws: int | None = None, seed: Any = "default"
    ) -> np.ndarray:
        """Exact marginal predictive CDF at y (PIT values): shape (n,) for 1-D y, else (n, d_y).

        Column j is P(Y_j <= y_j | x, D); for a calibrated model each column is
        uniform on (0, 1) over held-out data.
        """
        x = self._x(X)
        yt = self._y(y, len(x))
        pit = _predict.predictive_cdf(
            self.model_, self.guide_, x, yt, self._draws(num_draws), self._seed(seed)
        )
        return self._out(pit)

    def to_inference_data(self, X: Any, y: Any, num_draws: int | None = None) -> Any:
        """ArviZ data of this fit on (X, y) (InferenceData on ArviZ 0.x, DataTree on 1.x):
        posterior, posterior_predictive, pointwise log_likelihood, observed and constant data.

        See :func:`bayes_mdn.diagnostics.to_inference_data`.
        """
        from .diagnostics import to_inference_data

        return to_inference_data(self, X, y, num_draws=num_draws)


def _member_path(
    checkpoint: str | os.PathLike[str] | None, member: int, n_members: int
) -> str | None:
    """The checkpoint file of ensemble member ``member``: the path itself for one member,
    ``<path>.member<m>`` for several (each member's loop resumes on its own)."""
    if checkpoint is None:
        return None
    path = os.fspath(checkpoint)
    return path if n_members == 1 else f"{path}.member{member}"


def auto_components(n_train: int) -> int:
    """The number of mixture components ``n_components="auto"`` gives ``n_train`` rows:
    round(n_train ** (1/3)), between 3 and 20.

    Examples
    --------
    >>> [auto_components(n) for n in (100, 1_000, 5_000, 100_000)]
    [5, 10, 17, 20]
    """
    return int(min(20, max(3, round(n_train ** (1 / 3)))))


def _n_workers(n_jobs: int | None) -> int:
    """Processes for ``n_jobs`` as scikit-learn reads it: None is 1, -1 every core."""
    if n_jobs is None:
        return 1
    if n_jobs < 0:
        return max(1, (os.cpu_count() or 1) + 1 + n_jobs)
    return n_jobs


def _fit_member_in_worker(
    estimator: BayesianMDN,
    x: Tensor,
    y: Tensor,
    stats: tuple[Tensor, Tensor, Tensor, Tensor],
    seed: int | None,
    config: FitConfig,
    checkpoint: str | None,
) -> tuple[dict[str, Tensor], dict[str, Tensor], FitHistory]:
    # The member is built here, as the parent builds its twin: an autoguide does not
    # travel between processes (it keeps its model out of its pickled state).
    model, guide = estimator._build_model(x.shape[1], y.shape[1], stats, seed)
    history = estimator._fit_member(x, y, model, guide, config, checkpoint)
    # Tensors travel back, not modules.
    return dict(model.state_dict()), dict(guide.state_dict()), history


def _fit_in_workers(
    estimator: BayesianMDN,
    x: Tensor,
    y: Tensor,
    stats: tuple[Tensor, Tensor, Tensor, Tensor],
    members: list[tuple[MixtureDensityModel, torch.nn.Module]],
    jobs: list[tuple[int | None, FitConfig, str | None]],
    n_jobs: int,
) -> list[FitHistory]:
    """Fit the members in ``n_jobs`` worker processes (joblib's loky backend), each member
    exactly as :meth:`BayesianMDN._fit_member` fits it in this process, then copy each
    fitted state into this process's twin of it (``members``)."""
    from joblib import Parallel, delayed

    results = Parallel(n_jobs=n_jobs)(
        delayed(_fit_member_in_worker)(estimator, x, y, stats, *job) for job in jobs
    )
    histories = []
    for (model, guide), (model_state, guide_state, history) in zip(members, results):
        model.load_state_dict(model_state)
        if guide_state:
            # Autoguides create their parameters on the first call.
            with pyro_scope(), torch.no_grad():
                guide(x[:2], y[:2])
            guide.load_state_dict(guide_state)
        histories.append(history)
    return histories


def backbone_class(backbone: torch.nn.Module) -> str:
    """The qualified class name a saved model records for its backbone."""
    kind = type(backbone)
    return f"{kind.__module__}.{kind.__qualname__}"


def _backbone_width(
    backbone: torch.nn.Module, d_x: int, device: torch.device, dtype: torch.dtype
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
