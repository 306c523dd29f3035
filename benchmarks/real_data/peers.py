"""The peers bayes_mdn is measured against, each with ``fit(X, y)`` and ``log_prob(X, y)``.

Every peer returns log densities in y's original units: those that standardize y inside
subtract log(y_scale), the log-Jacobian of the standardization. Hyperparameters are fixed
here, the same on every data set, and stated in ``docs/real_data.md``; ``config()`` returns
them as the string that keys the result cache.

Only :class:`GaussianLinear` and :class:`MLEMDN` need nothing beyond the library's own
dependencies; NGBoost, zuko and statsmodels are imported when their peer is fitted
(``pip install -e ".[benchmark]"``).
"""

from __future__ import annotations

import copy
import math
from statistics import NormalDist
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "MLEMDN",
    "PEERS",
    "ConditionalKDE",
    "GaussianLinear",
    "NGBoostNormal",
    "ZukoNSF",
    "validation_split",
]

LOG_2PI = math.log(2 * math.pi)


def _config(obj: Any, names: tuple[str, ...]) -> str:
    args = ", ".join(f"{n}={getattr(obj, n)!r}" for n in names)
    return f"{type(obj).__name__}({args})"


def validation_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, validation) holding out ``round(fraction * n)`` rows, at least one."""
    perm = np.random.default_rng([seed, 7]).permutation(n)
    n_val = max(1, int(round(fraction * n)))
    return perm[n_val:], perm[:n_val]


class _Standardizer:
    """z-scores of x (per column, train statistics) and of y; constant columns left at 0."""

    def __init__(self, X: np.ndarray, y: np.ndarray) -> None:
        self.x_loc, self.x_scale = X.mean(0), X.std(0)
        self.x_scale = np.where(self.x_scale > 0, self.x_scale, 1.0)
        self.y_loc, self.y_scale = float(y.mean()), float(y.std())
        if not self.y_scale > 0:
            raise ValueError("y is constant: no density to fit")

    def x(self, X: np.ndarray) -> np.ndarray:
        return (X - self.x_loc) / self.x_scale

    def y(self, y: np.ndarray) -> np.ndarray:
        return (y - self.y_loc) / self.y_scale


class GaussianLinear:
    """Ordinary least squares with an intercept, read as y | x ~ N(x'b, s^2).

    s^2 is the maximum-likelihood residual variance RSS / n; the interval is the plug-in
    Normal one (parameter uncertainty ignored, as in the log density).
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed  # unused: the fit is deterministic

    def config(self) -> str:
        return "GaussianLinear(OLS, sigma2=RSS/n)"

    def _design(self, X: np.ndarray) -> np.ndarray:
        return np.column_stack([np.ones(len(X)), X])

    def fit(self, X: np.ndarray, y: np.ndarray) -> GaussianLinear:
        A = self._design(X)
        self.coef_, *_ = np.linalg.lstsq(A, y, rcond=None)
        self.sigma_ = float(np.sqrt(np.mean((y - A @ self.coef_) ** 2)))
        return self

    def _mean(self, X: np.ndarray) -> np.ndarray:
        return self._design(X) @ self.coef_

    def log_prob(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        z = (y - self._mean(X)) / self.sigma_
        return -0.5 * z**2 - math.log(self.sigma_) - 0.5 * LOG_2PI

    def interval(self, X: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
        half = NormalDist().inv_cdf(0.5 + level / 2) * self.sigma_
        m = self._mean(X)
        return m - half, m + half


def _mixture_log_prob(out: Tensor, y: Tensor, min_scale: float) -> Tensor:
    """log sum_k pi_k N(y; mu_k, sigma_k^2) from raw outputs (n, 3K) and y of shape (n,)."""
    logits, loc, raw = out.chunk(3, dim=-1)
    scale = nn.functional.softplus(raw) + min_scale
    comp = torch.distributions.Normal(loc, scale).log_prob(y[:, None])
    return torch.logsumexp(torch.log_softmax(logits, -1) + comp, -1)


def _mixture_interval(out: Tensor, level: float, min_scale: float) -> tuple[Tensor, Tensor]:
    """Central interval of each row's mixture by bisection of the exact CDF."""
    logits, loc, raw = out.chunk(3, dim=-1)
    w = torch.softmax(logits, -1)
    scale = nn.functional.softplus(raw) + min_scale

    def quantile(q: float) -> Tensor:
        lo = (loc - 10 * scale).min(-1).values
        hi = (loc + 10 * scale).max(-1).values
        for _ in range(60):
            mid = (lo + hi) / 2
            cdf = (w * torch.special.ndtr((mid[:, None] - loc) / scale)).sum(-1)
            lo = torch.where(cdf < q, mid, lo)
            hi = torch.where(cdf < q, hi, mid)
        return (lo + hi) / 2

    return quantile((1 - level) / 2), quantile((1 + level) / 2)


class MLEMDN:
    """A plain PyTorch mixture density network fitted by maximum likelihood.

    K Gaussian components, two tanh hidden layers, Adam on mini-batches; x and y are
    z-scored inside. 10 % of the training rows are held out; every ``eval_every`` steps
    the validation NLL is computed, and training stops after ``patience`` evaluations
    without improvement, restoring the best weights.
    """

    def __init__(
        self,
        seed: int = 0,
        n_components: int = 3,
        hidden: int = 32,
        lr: float = 3e-3,
        batch_size: int = 128,
        max_steps: int = 5000,
        eval_every: int = 25,
        patience: int = 20,
        val_fraction: float = 0.1,
        min_scale: float = 1e-3,
    ) -> None:
        self.seed = seed
        self.n_components = n_components
        self.hidden = hidden
        self.lr = lr
        self.batch_size = batch_size
        self.max_steps = max_steps
        self.eval_every = eval_every
        self.patience = patience
        self.val_fraction = val_fraction
        self.min_scale = min_scale

    def config(self) -> str:
        return _config(
            self,
            (
                "n_components",
                "hidden",
                "lr",
                "batch_size",
                "max_steps",
                "eval_every",
                "patience",
                "val_fraction",
                "min_scale",
            ),
        )

    def fit(self, X: np.ndarray, y: np.ndarray) -> MLEMDN:
        self.std_ = _Standardizer(X, y)
        x = torch.as_tensor(self.std_.x(X), dtype=torch.float32)
        t = torch.as_tensor(self.std_.y(y), dtype=torch.float32)
        fit_idx, val_idx = validation_split(len(x), self.val_fraction, self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        h = self.hidden
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            self.net_ = nn.Sequential(
                nn.Linear(x.shape[1], h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(),
                nn.Linear(h, 3 * self.n_components),
            )  # fmt: skip
        opt = torch.optim.Adam(self.net_.parameters(), lr=self.lr)
        xf, tf = x[fit_idx], t[fit_idx]
        xv, tv = x[val_idx], t[val_idx]
        batch = min(self.batch_size, len(xf))
        best, best_state, bad = math.inf, copy.deepcopy(self.net_.state_dict()), 0
        self.steps_ = 0
        while self.steps_ < self.max_steps and bad < self.patience:
            perm = torch.randperm(len(xf), generator=gen)
            for i in range(0, len(xf) - batch + 1, batch):
                idx = perm[i : i + batch]
                loss = -_mixture_log_prob(self.net_(xf[idx]), tf[idx], self.min_scale).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                self.steps_ += 1
                if self.steps_ % self.eval_every == 0:
                    with torch.no_grad():
                        val = -_mixture_log_prob(self.net_(xv), tv, self.min_scale).mean().item()
                    if val < best:
                        best, best_state, bad = val, copy.deepcopy(self.net_.state_dict()), 0
                    else:
                        bad += 1
                if self.steps_ >= self.max_steps or bad >= self.patience:
                    break
        self.net_.load_state_dict(best_state)
        self.best_val_nll_ = best
        return self

    def _out(self, X: np.ndarray) -> Tensor:
        with torch.no_grad():
            return self.net_(torch.as_tensor(self.std_.x(X), dtype=torch.float32))

    def log_prob(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(self.std_.y(y), dtype=torch.float32)
        lp = _mixture_log_prob(self._out(X), t, self.min_scale).double().numpy()
        return lp - math.log(self.std_.y_scale)

    def interval(self, X: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = _mixture_interval(self._out(X).double(), level, self.min_scale)
        s, m = self.std_.y_scale, self.std_.y_loc
        return lo.numpy() * s + m, hi.numpy() * s + m


class NGBoostNormal:
    """NGBoost (Duan et al. 2020) with a Normal distribution and its default learner.

    Depth-3 regression trees, natural gradients, learning rate 0.01, up to ``n_estimators``
    rounds; 10 % of the training rows are passed as ``X_val``/``Y_val`` and boosting stops
    after ``early_stopping_rounds`` rounds without a better validation NLL. Prediction
    uses the rounds up to the best validation iteration.
    """

    def __init__(
        self,
        seed: int = 0,
        n_estimators: int = 2000,
        learning_rate: float = 0.01,
        early_stopping_rounds: int = 50,
        val_fraction: float = 0.1,
    ) -> None:
        self.seed = seed
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.early_stopping_rounds = early_stopping_rounds
        self.val_fraction = val_fraction

    def config(self) -> str:
        import ngboost

        base = _config(
            self, ("n_estimators", "learning_rate", "early_stopping_rounds", "val_fraction")
        )
        return f"{base}|ngboost={ngboost.__version__}"

    def fit(self, X: np.ndarray, y: np.ndarray) -> NGBoostNormal:
        from ngboost import NGBRegressor
        from ngboost.distns import Normal

        fit_idx, val_idx = validation_split(len(X), self.val_fraction, self.seed)
        self.model_ = NGBRegressor(
            Dist=Normal,
            n_estimators=self.n_estimators,
            learning_rate=self.learning_rate,
            verbose=False,
            random_state=self.seed,
        )
        self.model_.fit(
            X[fit_idx],
            y[fit_idx],
            X_val=X[val_idx],
            Y_val=y[val_idx],
            early_stopping_rounds=self.early_stopping_rounds,
        )
        best = self.model_.best_val_loss_itr
        # pred_param stops before base model number max_iter: keep 0..best.
        self.max_iter_ = None if best is None else best + 1
        return self

    def _dist(self, X: np.ndarray) -> Any:
        return self.model_.pred_dist(X, max_iter=self.max_iter_)

    def log_prob(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.asarray(self._dist(X).logpdf(y), dtype=float)

    def interval(self, X: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
        d = self._dist(X)
        return d.ppf((1 - level) / 2), d.ppf((1 + level) / 2)


class ZukoNSF:
    """A conditional neural spline flow from zuko: ``zuko.flows.NSF(features=1, context=d)``.

    ``transforms`` monotonic rational-quadratic spline transforms (``bins`` bins on
    [-5, 5]), conditioners of ``hidden`` units; x and y z-scored inside. Adam on
    mini-batches with the same held-out 10 % and early stopping rule as the MLE MDN.
    The interval comes from ``n_interval_samples`` flow samples per point.
    """

    def __init__(
        self,
        seed: int = 0,
        transforms: int = 3,
        hidden: tuple[int, ...] = (64, 64),
        bins: int = 8,
        lr: float = 1e-3,
        batch_size: int = 128,
        max_steps: int = 5000,
        eval_every: int = 25,
        patience: int = 20,
        val_fraction: float = 0.1,
        n_interval_samples: int = 1000,
    ) -> None:
        self.seed = seed
        self.transforms = transforms
        self.hidden = hidden
        self.bins = bins
        self.lr = lr
        self.batch_size = batch_size
        self.max_steps = max_steps
        self.eval_every = eval_every
        self.patience = patience
        self.val_fraction = val_fraction
        self.n_interval_samples = n_interval_samples

    def config(self) -> str:
        import zuko

        names = (
            "transforms",
            "hidden",
            "bins",
            "lr",
            "batch_size",
            "max_steps",
            "eval_every",
            "patience",
            "val_fraction",
        )
        return f"{_config(self, names)}|zuko={zuko.__version__}"

    def fit(self, X: np.ndarray, y: np.ndarray) -> ZukoNSF:
        import zuko

        self.std_ = _Standardizer(X, y)
        x = torch.as_tensor(self.std_.x(X), dtype=torch.float32)
        t = torch.as_tensor(self.std_.y(y), dtype=torch.float32)[:, None]
        fit_idx, val_idx = validation_split(len(x), self.val_fraction, self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            self.flow_ = zuko.flows.NSF(
                features=1,
                context=x.shape[1],
                transforms=self.transforms,
                bins=self.bins,
                hidden_features=self.hidden,
            )
        opt = torch.optim.Adam(self.flow_.parameters(), lr=self.lr)
        xf, tf = x[fit_idx], t[fit_idx]
        xv, tv = x[val_idx], t[val_idx]
        batch = min(self.batch_size, len(xf))
        best, best_state, bad = math.inf, copy.deepcopy(self.flow_.state_dict()), 0
        self.steps_ = 0
        while self.steps_ < self.max_steps and bad < self.patience:
            perm = torch.randperm(len(xf), generator=gen)
            for i in range(0, len(xf) - batch + 1, batch):
                idx = perm[i : i + batch]
                loss = -self.flow_(xf[idx]).log_prob(tf[idx]).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                self.steps_ += 1
                if self.steps_ % self.eval_every == 0:
                    with torch.no_grad():
                        val = -self.flow_(xv).log_prob(tv).mean().item()
                    if val < best:
                        best, best_state, bad = val, copy.deepcopy(self.flow_.state_dict()), 0
                    else:
                        bad += 1
                if self.steps_ >= self.max_steps or bad >= self.patience:
                    break
        self.flow_.load_state_dict(best_state)
        self.best_val_nll_ = best
        return self

    def log_prob(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(self.std_.x(X), dtype=torch.float32)
        t = torch.as_tensor(self.std_.y(y), dtype=torch.float32)[:, None]
        with torch.no_grad():
            lp = self.flow_(x).log_prob(t).double().numpy()
        return lp - math.log(self.std_.y_scale)

    def interval(self, X: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
        x = torch.as_tensor(self.std_.x(X), dtype=torch.float32)
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(self.seed)
            s = self.flow_(x).sample((self.n_interval_samples,))[..., 0].double()
        q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=s.dtype)
        lo, hi = torch.quantile(s, q, dim=0)
        m, sc = self.std_.y_loc, self.std_.y_scale
        return lo.numpy() * sc + m, hi.numpy() * sc + m


class ConditionalKDE:
    """Conditional kernel density estimate (statsmodels ``KDEMultivariateConditional``).

    Gaussian kernels for continuous columns, Aitchison-Aitken for two-valued ones;
    bandwidths by leave-one-out maximum likelihood (``bw="cv_ml"``) on z-scored data. That
    search costs O(n^2) per evaluation, so the peer is skipped (``max_train_rows``) on
    larger tables. No interval: statsmodels has no conditional quantile.
    """

    max_train_rows = 1000

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed  # unused: the fit is deterministic

    def config(self) -> str:
        import statsmodels

        return (
            f"ConditionalKDE(bw='cv_ml', max_train_rows={self.max_train_rows})"
            f"|statsmodels={statsmodels.__version__}"
        )

    def fit(self, X: np.ndarray, y: np.ndarray) -> ConditionalKDE:
        from statsmodels.nonparametric.kernel_density import KDEMultivariateConditional

        self.std_ = _Standardizer(X, y)
        types = "".join("u" if len(np.unique(col)) == 2 else "c" for col in X.T)
        self.kde_ = KDEMultivariateConditional(
            endog=[self.std_.y(y)],
            exog=[self.std_.x(X)[:, j] for j in range(X.shape[1])],
            dep_type="c",
            indep_type=types,
            bw="cv_ml",
        )
        return self

    def log_prob(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):
            p = self.kde_.pdf(endog_predict=self.std_.y(y)[:, None], exog_predict=self.std_.x(X))
            return np.log(p) - math.log(self.std_.y_scale)


# name in the suite -> peer class; each is constructed as cls(seed=split_seed).
PEERS: dict[str, type] = {
    "mle_mdn": MLEMDN,
    "ngboost": NGBoostNormal,
    "zuko_nsf": ZukoNSF,
    "linear": GaussianLinear,
    "kde": ConditionalKDE,
}
