"""``BayesianMDN``: the scikit-learn style front door to the library."""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

import numpy as np
import torch
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import Tensor

from ._archive import write_archive
from ._utils import pyro_scope, resolve_device
from ._validation import (
    as_2d_float,
    as_levels,
    check_count,
    check_dtype_range,
    check_dtype_resolution,
    check_seed,
    standardization,
)
from .ensemble import fit_members, n_workers
from .fit import (
    JIT_DEPRECATED,
    FitConfig,
    FitHistory,
    check_checkpoint_args,
    checkpoint_identity,
    fit_nuts,
)
from .guides import EmpiricalGuide, EnsembleGuide
from .mcmc import NUTSConfig
from .model import MixtureDensityModel
from .nets import MixtureParams
from .posterior import Posterior
from .sources import ArraySource, Source, as_source
from .spec import ModelSpec, auto_components, backbone_class
from .streaming import StreamJob, fit_streamed, scan

__all__ = ["BayesianMDN", "auto_components", "backbone_class"]

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
        one-process objective of that mini-batch. Needs the ``scale`` extra. On Linux
        CPUs with ``num_threads=1`` the processes are forked from this one; elsewhere,
        and with ``compile=True``, they are spawned, and spawned processes re-import the
        calling script: guard it with ``if __name__ == "__main__":``.
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
        in the hole from 0.83 to 0.88 (mean over five seeds) with coverage and NLL in the
        data unchanged. Where future inputs lie inside dense training data it buys nothing
        and costs a little: about 0.007 nats per point on the inverse-sine toy, and more
        optimizer steps (docs/defaults.md); 0 turns it off.
    init_scale : float
        Initial posterior standard deviation of the Gaussian guides; their means start at
        the network's initialization.
    rank : int or None
        Rank of the ``"lowrank"`` guide; None picks sqrt(number of latent weights).
    epochs, batch_size, lr, lr_schedule, clip_norm, num_particles, val_fraction,
    patience, val_draws, ema_decay, input_noise :
        The SVI loop of each member, see :class:`bayes_mdn.fit.FitConfig`. By default the
        budget is counted in optimizer steps (``epochs="auto"``) and each member holds out
        ``val_fraction`` of the rows and stops when their log predictive density has not
        improved for ``patience="auto"`` steps, keeping its best state. What is validated
        and kept is an exponential moving average of the parameters over about the last
        100 steps (``ema_decay=0.99``), not the last step's.
    jit : bool
        Deprecated and does nothing (removed in 0.3); ``True`` warns. See
        :class:`~bayes_mdn.config.FitConfig`.
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
    compile : bool or "auto"
        ``torch.compile`` the training step: ``"auto"`` compiles long fits where that
        measured faster (one network, not the stacked ensemble, on a Linux CPU, from 20,000
        planned steps; CUDA fits, not measured, stay eager), True or False force it. The same
        numbers up to float rounding. See :meth:`bayes_mdn.fit.FitConfig.compiles`.
    checkpoint, checkpoint_every, resume :
        Deprecated (removed in 0.3): pass them to :meth:`fit`, whose call they belong to.
        Set here they still work, with a ``FutureWarning``.
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
    nuts : NUTSConfig, dict or None
        The NUTS run of ``method="nuts"`` (:class:`~bayes_mdn.mcmc.NUTSConfig`: chains,
        warm-up steps, kept draws, tree depth; a dict of those settings works too); None
        takes its defaults. See :func:`bayes_mdn.mcmc.fit_nuts` for what they cost.
    num_chains, nuts_warmup, nuts_samples, max_tree_depth :
        Deprecated (removed in 0.3): the NUTS settings, now grouped in ``nuts``. Set here
        they still work, with a ``FutureWarning``.

    Attributes
    ----------
    posterior_ : Posterior
        The fitted posterior (:class:`~bayes_mdn.posterior.Posterior`): every prediction,
        score and diagnostic reads it; ``model_`` and ``guide_`` are its parts.
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
        ema_decay: float | None = 0.99,
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
        nuts: NUTSConfig | Mapping[str, int] | None = None,
        compile: bool | Literal["auto"] = "auto",
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
        self.ema_decay = ema_decay
        self.input_noise = input_noise
        self.jit = jit
        self.num_draws = num_draws
        self.dtype = dtype
        self.device = device
        self.seed = seed
        self.progress = progress
        self.num_threads = num_threads
        self.compile = compile
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self.resume = resume
        self.num_chains = num_chains
        self.nuts_warmup = nuts_warmup
        self.nuts_samples = nuts_samples
        self.max_tree_depth = max_tree_depth
        self.method = method
        self.backbone = backbone
        self.nuts = nuts

    # -- scikit-learn protocol -------------------------------------------------------
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
    def model_spec(self) -> ModelSpec:
        """The model these parameters describe (architecture, prior, guide), checked.

        Raises ``ValueError`` or ``TypeError`` naming the first bad parameter. ``fit``
        builds every member from it (:meth:`ModelSpec.build`).
        """
        # Every field of the spec is the estimator parameter of the same name.
        return ModelSpec(**{f.name: getattr(self, f.name) for f in fields(ModelSpec)})

    def fit_config(self) -> FitConfig:
        """The SVI loop these parameters describe, checked (see :class:`FitConfig`)."""
        # Every field of the config is the estimator parameter of the same name.
        return FitConfig(**{f.name: getattr(self, f.name) for f in fields(FitConfig)})

    def check_params(self) -> tuple[ModelSpec, FitConfig]:
        """Check every parameter, as ``fit`` does before it reads any data.

        Returns
        -------
        (ModelSpec, FitConfig)
            The model specification and the loop configuration they describe.

        Raises
        ------
        ValueError or TypeError
            Naming the first bad parameter, the values it takes and the value it got.
        """
        spec = self.model_spec()
        check_count("n_members", self.n_members)
        if self.n_jobs is not None and (
            not isinstance(self.n_jobs, int) or isinstance(self.n_jobs, bool) or self.n_jobs == 0
        ):
            raise ValueError(f"n_jobs must be None or a non-zero integer, got {self.n_jobs!r}")
        check_count("devices", self.devices)
        check_count("num_draws", self.num_draws)
        check_checkpoint_args(self.checkpoint, self.checkpoint_every, self.resume)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method == "nuts":
            if self.bayesian == "none":
                raise ValueError(
                    "method='nuts' samples latent weights, but bayesian='none' has none: "
                    "use bayesian='last' or 'all'"
                )
            self._nuts_config(warn=False)
        return spec, self.fit_config()

    def nuts_config(self) -> NUTSConfig:
        """The NUTS run these parameters describe (``nuts``, or the deprecated flat
        arguments), checked (see :class:`~bayes_mdn.mcmc.NUTSConfig`)."""
        return self._nuts_config(warn=False)

    def _nuts_config(self, warn: bool) -> NUTSConfig:
        """The NUTS settings: ``nuts``, or the deprecated flat arguments when set (with a
        FutureWarning when ``warn``)."""
        nuts = self.nuts
        if nuts is None:
            config = NUTSConfig()
        elif isinstance(nuts, NUTSConfig):
            config = nuts
        elif isinstance(nuts, Mapping):
            unknown = sorted(set(nuts) - set(asdict(NUTSConfig())))
            if unknown:
                raise ValueError(
                    f"nuts has unknown settings {unknown}; it takes {list(asdict(NUTSConfig()))}"
                )
            config = NUTSConfig(**nuts)
        else:
            raise TypeError(
                f"nuts must be a NUTSConfig, a dict of its settings or None, got "
                f"{type(nuts).__name__}"
            )
        changed = self._deprecated_set(_FLAT_NUTS)
        if not changed:
            return config
        if nuts is not None:
            raise ValueError(
                f"the NUTS settings are given twice, as nuts= and as {sorted(changed)}: "
                "give them once, in nuts="
            )
        if warn:
            new = _ellipsis([_FLAT_NUTS[name] for name in changed])
            _warn_deprecated(changed, f"pass nuts=NUTSConfig({new})")
        return replace(config, **{_FLAT_NUTS[name]: getattr(self, name) for name in changed})

    def _deprecated_set(self, names: Sequence[str]) -> list[str]:
        """The deprecated constructor arguments among ``names`` set to other than their
        defaults."""
        defaults = inspect.signature(BayesianMDN.__init__).parameters
        return [name for name in names if getattr(self, name) != defaults[name].default]

    # -- fitting ---------------------------------------------------------------------
    def fit(
        self,
        X: Any,
        y: Any = None,
        *,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_every: int | None = None,
        resume: bool | None = None,
    ) -> BayesianMDN:
        """Fit the model to inputs X of shape (n, d_x) and targets y of shape (n,) or (n, d_y).

        X may instead be a data source that yields (x, y) batches, with ``y=None``: a
        :class:`~bayes_mdn.sources.ParquetSource`, a ``torch.utils.data.DataLoader`` (with
        ``shuffle=False``) or another re-iterable of pairs. It is streamed, never loaded
        whole (see the class notes and :mod:`bayes_mdn.streaming`).

        Parameters
        ----------
        X : array-like of shape (n, d_x), or a data source
        y : array-like of shape (n,) or (n, d_y), or None for a data source
        checkpoint : str, os.PathLike or None
            File where the SVI loop writes a checkpoint (atomically), so that an
            interrupted fit can continue; None writes none. Stacked and streamed members
            share this one file; members fitted one by one write
            ``<checkpoint>.member<m>`` each. It belongs to this call, not to the model:
            ``get_params``, ``clone`` and saved files do not carry it. (A search such as
            ``GridSearchCV`` passes fit arguments to every candidate alike, so give it
            none.)
        checkpoint_every : int or None
            Epochs between checkpoints (the last epoch is always written); None: 10.
        resume : bool or None
            Continue from ``checkpoint`` when the file exists, ending at the same
            parameters as an uninterrupted fit; the checkpoint's settings and data must
            match (see :func:`bayes_mdn.fit.fit_svi`). None: False.

        Returns
        -------
        self
        """
        spec, config = self.check_params()
        ck = self._checkpointing(checkpoint, checkpoint_every, resume)
        if config.jit:
            warnings.warn(JIT_DEPRECATED, FutureWarning, stacklevel=2)
            config = replace(config, jit=False)
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
            return self._fit_streamed(source, spec, config, ck)
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
            return self._fit_streamed(ArraySource(x_arr, y_arr, y_1d=y_1d), spec, config, ck)
        n_val = int(round(len(x_arr) * config.val_fraction))
        if len(x_arr) - n_val < 2:
            raise ValueError(
                f"need at least 2 training rows after holding out val_fraction="
                f"{config.val_fraction}, got {len(x_arr)} rows"
            )
        device = resolve_device(config.device)
        dtype = spec.torch_dtype
        x = torch.as_tensor(x_arr, dtype=dtype, device=device)
        yt = torch.as_tensor(y_arr, dtype=dtype, device=device)
        x_loc, x_scale, y_loc, y_scale = (
            torch.as_tensor(s, dtype=dtype, device=device) for s in standardization(x_arr, y_arr)
        )
        stats = (x_loc, x_scale, y_loc, y_scale)
        n_components = spec.components(len(x_arr) - n_val)
        build = functools.partial(spec.build, x.shape[1], yt.shape[1], n_components)
        # method="nuts" samples one model's latent weights: one SVI member is its start.
        n_members = 1 if self.method == "nuts" else self.n_members
        models, guides, histories = fit_members(
            build,
            x,
            yt,
            stats,
            config,
            [None if self.seed is None else self.seed + m for m in range(n_members)],
            n_jobs=n_workers(self.n_jobs),
            checkpoint=ck.path,
            checkpoint_every=ck.every,
            resume=ck.resume,
            identity=checkpoint_identity(self.get_params()),
        )
        model = models[0]
        guide = guides[0] if n_members == 1 else EnsembleGuide(models, guides)
        if self.method == "nuts":
            with pyro_scope(), torch.no_grad():
                start = {k: v.detach() for k, v in guide.median().items()}
            samples, self.nuts_info_ = fit_nuts(
                model,
                x,
                yt,
                **asdict(self._nuts_config(warn=True)),
                seed=self.seed,
                init_values=start,
                progress=self.progress,
            )
            guide = EmpiricalGuide(samples)
        return self._set_fitted(Posterior(model, guide, self.num_draws), histories, y_1d)

    def _fit_streamed(
        self, source: Source, spec: ModelSpec, config: FitConfig, ck: _Checkpointing
    ) -> BayesianMDN:
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
        largest = float(torch.finfo(spec.torch_dtype).max)
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
        job = StreamJob(
            source=source,
            plan=plan,
            build=functools.partial(spec.build, plan.d_x, plan.d_y, spec.components(plan.n_train)),
            seeds=[seed + m for m in range(self.n_members)],
            config=config,
            dtype=spec.torch_dtype,
            checkpoint=ck.path,
            checkpoint_every=ck.every,
            resume=ck.resume,
            identity=checkpoint_identity(self.get_params()),
        )
        models, guides, histories = fit_streamed(job, self.devices)
        guide = guides[0] if len(models) == 1 else EnsembleGuide(models, guides)
        self._set_fitted(Posterior(models[0], guide, self.num_draws), histories, source.y_1d)
        # For arrays fit() has set or cleared the DataFrame's column names. A source's
        # columns are not recorded as feature names, as a CSV fit's are not: predictions
        # take arrays in the order of its x columns.
        if not isinstance(source, ArraySource) and hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        self.n_rows_ = plan.n_rows
        return self

    def _checkpointing(
        self,
        checkpoint: str | os.PathLike[str] | None,
        checkpoint_every: int | None,
        resume: bool | None,
    ) -> _Checkpointing:
        """The checkpoint settings of one ``fit`` call: its own arguments, else the
        deprecated constructor arguments of the same names (with a FutureWarning)."""
        set_old = self._deprecated_set(("checkpoint", "checkpoint_every", "resume"))
        if set_old:
            _warn_deprecated(set_old, f"pass it to fit(X, y, {_ellipsis(set_old)})")
        path = self.checkpoint if checkpoint is None else checkpoint
        every = self.checkpoint_every if checkpoint_every is None else checkpoint_every
        resume = self.resume if resume is None else resume
        check_checkpoint_args(path, every, resume)
        return _Checkpointing(None if path is None else os.fspath(path), every, resume)

    def _set_fitted(
        self, posterior: Posterior, histories: Sequence[FitHistory], y_1d: bool
    ) -> BayesianMDN:
        """Record a fit: the posterior and what scikit-learn and ``save`` read of it."""
        guide = posterior.guide
        self.posterior_ = posterior
        self.histories_: list[FitHistory] = list(histories)
        self.history_: FitHistory = self.histories_[0]
        self.n_members_ = len(guide) if isinstance(guide, EnsembleGuide) else 1
        self.n_steps_ = sum(h.steps for h in self.histories_)
        net = posterior.model.net
        self.n_components_ = net.n_components
        self.n_features_in_ = net.d_x
        self.n_outputs_ = net.d_y
        self._y_1d = bool(y_1d)
        return self

    def __setstate__(self, state: dict[str, Any]) -> None:
        # An estimator pickled by 0.1 holds model_ and guide_, which are now the parts of
        # posterior_.
        if "posterior_" not in state and "model_" in state and "guide_" in state:
            state = dict(state)
            state["posterior_"] = Posterior(
                state.pop("model_"), state.pop("guide_"), state.get("num_draws", 100)
            )
        # Arguments added after 0.1 take their defaults.
        state.setdefault("nuts", None)
        state.setdefault("backbone", None)
        state.setdefault("devices", 1)
        state.setdefault("compile", "auto")
        super().__setstate__(state)

    @property
    def model_(self) -> MixtureDensityModel:
        """The posterior's model (``posterior_.model``)."""
        return self.posterior_.model

    @property
    def guide_(self) -> torch.nn.Module:
        """The posterior's guide (``posterior_.guide``)."""
        return self.posterior_.guide

    @classmethod
    def from_posterior(
        cls,
        posterior: Posterior,
        histories: Sequence[FitHistory] = (),
        *,
        y_1d: bool = False,
        feature_names_in: Sequence[str] | None = None,
        **params: Any,
    ) -> BayesianMDN:
        """A fitted estimator around a posterior obtained elsewhere.

        This is how :func:`bayes_mdn.load` rebuilds a saved estimator, and how a model and
        guide fitted with the lower layers (:func:`bayes_mdn.fit.fit_svi`) get the
        estimator's predictions, scores, diagnostics and ``save``.

        Parameters
        ----------
        posterior : Posterior
            Its model's network gives ``n_features_in_``, ``n_outputs_`` and
            ``n_components_``.
        histories : sequence of FitHistory
            One per member; an empty history when none is given.
        y_1d : bool
            Whether predictions drop the output axis, as for a fit on y of shape (n,).
        feature_names_in : sequence of str or None
            The DataFrame column names predictions check, as after a fit on a DataFrame.
        **params
            Constructor arguments of the estimator, which must describe the posterior's
            model (checked: ``save`` records them and :func:`bayes_mdn.load` rebuilds the
            network from them). ``num_draws`` defaults to the posterior's and
            ``n_members`` to its number of members.

        Raises
        ------
        ValueError
            When the parameters describe another network (other widths, K, covariance,
            backbone, Bayesian layers or dtype), another number of members, or another
            kind of posterior (``method``) than the one given.

        Examples
        --------
        >>> from bayes_mdn import make_inverse_sine
        >>> X, y = make_inverse_sine(200, seed=0)
        >>> mdn = BayesianMDN(n_components=3, hidden=(8,), epochs=2, progress=False).fit(X, y)
        >>> twin = BayesianMDN.from_posterior(mdn.posterior_, y_1d=True, **mdn.get_params())
        >>> bool((twin.predict(X[:3]) == mdn.predict(X[:3])).all())
        True
        """
        if not isinstance(posterior, Posterior):
            raise TypeError(f"posterior must be a Posterior, got {type(posterior).__name__}")
        guide = posterior.guide
        members = len(guide) if isinstance(guide, EnsembleGuide) else 1
        params.setdefault("num_draws", posterior.num_draws)
        params.setdefault("n_members", members)
        if params.get("method", "svi") == "svi" and params["n_members"] != members:
            raise ValueError(
                f"n_members={params['n_members']!r}, but the posterior holds {members} member(s)"
            )
        est = cls(**params)
        nuts = isinstance(guide, EmpiricalGuide)
        if nuts != (est.method == "nuts"):
            raise ValueError(
                f"method={est.method!r}, but the posterior's guide is a "
                f"{type(guide).__name__}: stored MCMC draws (EmpiricalGuide) go with "
                "method='nuts', fitted guides with method='svi'"
            )
        spec, _ = est.check_params()
        problems = spec.mismatches(posterior.model)
        if nuts:
            config = est.nuts_config()
            if (config.num_chains, config.num_samples) != (guide.num_chains, guide.num_samples):
                problems.append(
                    f"nuts describes {config.num_chains} chains of {config.num_samples} draws, "
                    f"the guide holds {guide.num_chains} of {guide.num_samples}"
                )
        if problems:
            raise ValueError(
                "the parameters do not describe the posterior's model (save would write a "
                "file load refuses): " + "; ".join(problems[:5])
            )
        est._set_fitted(posterior, list(histories) or [FitHistory()], y_1d)
        if feature_names_in:
            est.feature_names_in_ = np.asarray([str(c) for c in feature_names_in], dtype=object)
        return est

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
        if params.get("nuts") is None:
            # Left out, so that files without NUTS settings stay readable by 0.1.
            del params["nuts"]
        elif isinstance(params["nuts"], NUTSConfig):
            params["nuts"] = asdict(params["nuts"])
        else:
            params["nuts"] = dict(params["nuts"])
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

    # -- prediction ------------------------------------------------------------------
    def _check_fitted(self) -> None:
        """Raise scikit-learn's ``NotFittedError`` (a ValueError and AttributeError)
        before ``fit``."""
        check_is_fitted(self, "posterior_")

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
        m = self.posterior_.mean(x, self._draws(num_draws), self._seed(seed))
        return self._out(m)

    def predict_std(
        self, X: Any, num_draws: int | None = None, seed: Any = "default"
    ) -> np.ndarray:
        """Posterior-predictive standard deviation, shape (n,) or (n, d_y)."""
        x = self._x(X)
        s = self.posterior_.std(x, self._draws(num_draws), self._seed(seed))
        return self._out(s)

    def predict_quantiles(
        self, X: Any, q: Any, num_draws: int | None = None, seed: Any = "default"
    ) -> np.ndarray:
        """Quantiles of the exact predictive CDF: shape (n, m) or (n, m, d_y) for m levels."""
        x = self._x(X)
        q_t = torch.as_tensor(as_levels(q, "q"), dtype=x.dtype)
        out = self.posterior_.quantiles(
            x, q_t.to(x.device), self._draws(num_draws), self._seed(seed)
        )
        return self._out(out)

    def predict_interval(
        self, X: Any, level: float = 0.9, num_draws: int | None = None, seed: Any = "default"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Central predictive interval (lower, upper), each of shape (n,) or (n, d_y)."""
        x = self._x(X)
        lo, hi = self.posterior_.interval(x, level, self._draws(num_draws), self._seed(seed))
        return self._out(lo), self._out(hi)

    def predict_modes(
        self, X: Any, num_draws: int = 16, seed: Any = "default"
    ) -> list[np.ndarray]:
        """Modes of the predictive density at each x, highest first.

        Returns a list of n arrays, each of shape (n_modes,) for 1-D y or
        (n_modes, d_y).
        """
        x = self._x(X)
        modes, _ = self.posterior_.modes(x, num_draws, self._seed(seed))
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
        :meth:`bayes_mdn.posterior.Posterior.sample`); docs/benchmarks.md times both.
        """
        x = self._x(X)
        s = self.posterior_.sample(x, n_samples, self._seed(seed), sampler=sampler)
        return self._out(s)

    def log_prob(
        self, X: Any, y: Any, num_draws: int | None = None, seed: Any = "default"
    ) -> np.ndarray:
        """Log posterior-predictive density log p(y | x, D) per point, shape (n,)."""
        x = self._x(X)
        yt = self._y(y, len(x))
        lp = self.posterior_.log_prob(x, yt, self._draws(num_draws), self._seed(seed))
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
        return self.posterior_.mixture(x, self._draws(num_draws), self._seed(seed)).params

    def uncertainty(
        self, X: Any, num_draws: int | None = None, seed: Any = "default"
    ) -> dict[str, np.ndarray]:
        """Predictive variance split into aleatoric and epistemic parts, each (n,) or (n, d_y)."""
        x = self._x(X)
        parts = self.posterior_.uncertainty(x, self._draws(num_draws), self._seed(seed))
        return {k: self._out(v) for k, v in parts.items()}

    def predict_covariance(
        self, X: Any, num_draws: int | None = None, seed: Any = "default"
    ) -> np.ndarray:
        """Covariance matrix of the posterior predictive, shape (n, d_y, d_y).

        Kept 3-D even for 1-D y (then (n, 1, 1)): a covariance is a matrix.
        """
        x = self._x(X)
        cov = self.posterior_.covariance(x, self._draws(num_draws), self._seed(seed))
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
        pit = self.posterior_.cdf(x, yt, self._draws(num_draws), self._seed(seed))
        return self._out(pit)

    def to_inference_data(self, X: Any, y: Any, num_draws: int | None = None) -> Any:
        """ArviZ data of this fit on (X, y) (InferenceData on ArviZ 0.x, DataTree on 1.x):
        posterior, posterior_predictive, pointwise log_likelihood, observed and constant data.

        See :func:`bayes_mdn.diagnostics.to_inference_data`.
        """
        from .diagnostics import to_inference_data

        return to_inference_data(self, X, y, num_draws=num_draws)


#: The deprecated flat NUTS arguments and the NUTSConfig fields that replace them.
_FLAT_NUTS = {
    "num_chains": "num_chains",
    "nuts_warmup": "warmup_steps",
    "nuts_samples": "num_samples",
    "max_tree_depth": "max_tree_depth",
}


def _ellipsis(names: Sequence[str]) -> str:
    return ", ".join(f"{name}=..." for name in names)


def _warn_deprecated(names: Sequence[str], instead: str) -> None:
    """The FutureWarning of deprecated constructor arguments, shown at the line that called
    ``fit`` (the caller of the method that calls this)."""
    warnings.warn(
        f"BayesianMDN({_ellipsis(names)}) is deprecated and will be removed in bayes_mdn 0.3: "
        f"{instead} instead",
        FutureWarning,
        stacklevel=4,
    )


@dataclass(frozen=True)
class _Checkpointing:
    """Where and how often one ``fit`` call writes checkpoints, and whether it resumes."""

    path: str | None
    every: int
    resume: bool
