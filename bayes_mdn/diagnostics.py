"""Diagnostics of a fitted model through ArviZ: InferenceData, PSIS-LOO, LOO-PIT, the
PSIS k-hat of the variational fit, calibration numbers, model comparison, reports.

Every ArviZ call of the library lives in this module, behind a small private seam that
dispatches on the installed ArviZ line: 0.x (``az.InferenceData``, Python >= 3.10) or 1.x
(an xarray ``DataTree``, Python >= 3.12). The public functions take and return the same
things on both lines, except the container itself, and give the same numbers: PSIS follows
ArviZ 1.x's Pareto-tail rule on both (see ``_tail_draws``), and the model-comparison table
keeps the 0.x columns.

A model with no latent weights (``bayesian="none"``) or a deterministic guide (MAP) has
no posterior to draw from: LOO over a single draw would be meaningless, so those fits
get the held-out log predictive density instead, and the report says so.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import xarray as xr
from pyro import poutine
from torch import Tensor, nn

from . import scores
from ._files import atomic_path, write_json
from ._utils import pyro_scope, seeded
from ._validation import as_2d_float, check_count
from .guides import EmpiricalGuide, EnsembleGuide, is_deterministic
from .model import MixtureDensityModel
from .posterior import Posterior

with warnings.catch_warnings():
    # ArviZ 0.x announces its 1.x refactor on import; the notice is for its maintainers' users
    # of the new API, not for ours.
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

if TYPE_CHECKING:
    from typing import TypeAlias

    from xarray import DataTree

    # What to_inference_data returns: InferenceData on ArviZ 0.x, a DataTree on 1.x.
    InferenceLike: TypeAlias = "az.InferenceData | DataTree"

__all__ = [
    "OBSERVED",
    "calibration_report",
    "compare_models",
    "has_posterior",
    "loo",
    "mcmc_convergence",
    "pointwise_log_likelihood",
    "read_inference_data",
    "run_diagnostics",
    "save_inference_data",
    "to_inference_data",
    "variational_khat",
]

OBSERVED = "y"
_LEVELS = (0.5, 0.8, 0.9, 0.95)
_MAX_ELEMENTS = 2**23
_ARVIZ_MAJOR = int(az.__version__.split(".")[0])
# The seam calls both lines' signatures; a type checker sees only the installed line's.
_az: Any = az
_SAMPLE_DIMS = ("chain", "draw")
# The tail-ESS quantiles of ArviZ 0.x; 1.x defaults to its ci_prob (0.89) instead.
_TAIL_PROB = (0.05, 0.95)


# The ArviZ seam: the only functions that know which ArviZ line is installed. Public
# functions below call these and nothing else of ArviZ.


def _from_dict(
    groups: Mapping[str, Mapping[str, np.ndarray]],
    coords: Mapping[str, Any],
    dims: Mapping[str, list[str]],
    attrs: Mapping[str, Any],
) -> Any:
    """InferenceData (0.x) or DataTree (1.x) of {group: {variable: array}}; ``attrs`` are
    the container's own attributes."""
    if _ARVIZ_MAJOR >= 1:
        return _az.from_dict(dict(groups), coords=coords, dims=dims, attrs={"/": dict(attrs)})
    return _az.from_dict(**groups, coords=coords, dims=dims, attrs=dict(attrs))


def _groups(idata: Any) -> list[str]:
    """Names of the groups of an InferenceData or DataTree (``posterior``, ...)."""
    if _ARVIZ_MAJOR >= 1:
        return list(idata.children)
    return list(idata.groups())


def _to_netcdf(idata: Any, path: str) -> None:
    idata.to_netcdf(path, engine="h5netcdf")


def _from_netcdf(path: str) -> Any:
    """Read a netCDF file fully into memory, so the file can be replaced or removed."""
    if _ARVIZ_MAJOR >= 1:
        tree = xr.open_datatree(path, engine="h5netcdf")
        try:
            return tree.load()
        finally:
            tree.close()
    idata = _az.from_netcdf(path, engine="h5netcdf")
    for group in idata.groups():
        getattr(idata, group).load()
    return idata


def _draw_dataset(values: np.ndarray) -> xr.Dataset:
    dims = (*_SAMPLE_DIMS, *(f"dim_{i}" for i in range(values.ndim - 2)))
    return xr.Dataset({"v": (dims, values)})


def _rhat(values: np.ndarray) -> np.ndarray:
    """Rank-normalized split R-hat of draws shaped (chain, draw, ...): shape (...)."""
    return np.asarray(_az.rhat(_draw_dataset(values))["v"].values)


def _ess(values: np.ndarray, method: str) -> np.ndarray:
    """ESS ("bulk", "tail" or "mean") of draws shaped (chain, draw, ...): shape (...)."""
    kwargs: dict[str, Any] = {"prob": _TAIL_PROB} if method == "tail" else {}
    return np.asarray(_az.ess(_draw_dataset(values), method=method, **kwargs)["v"].values)


def _r_eff(idata: Any) -> float:
    """Relative efficiency of the posterior draws, as both ArviZ lines define it for LOO:
    1 for one chain, else the mean over every posterior scalar of ESS(mean) / draws."""
    post = idata.posterior
    chains, draws = post.sizes["chain"], post.sizes["draw"]
    if chains == 1:
        return 1.0
    ess = [_ess(np.asarray(v.values), "mean").ravel() for v in post.data_vars.values()]
    return float(np.concatenate(ess).mean() / (chains * draws))


def _tail_draws(n_draws: int, r_eff: float) -> int:
    """Draws in the Pareto tail that PSIS smooths: ArviZ 1.x's rule, used on both lines.

    ArviZ 0.x rounds the same quantity, min(S/5, 3 sqrt(S/r_eff)), up and 1.x rounds it
    down, so the lines disagree whenever it is not a whole number (S = 500 one-chain draws:
    68 against 67). 1.x refuses fewer than 5 tail draws (S < 25); 0.x then reports k = inf
    and leaves the weights unsmoothed, which :func:`_psis` does on both lines.
    """
    if n_draws * r_eff > 225:
        return int(np.floor(3 * (n_draws / r_eff) ** 0.5))
    return int(np.floor(n_draws / 5))


def _arviz0_reff(n_draws: int, tail: int) -> float:
    # The r_eff that makes ArviZ 0.x take ``tail`` tail draws: it takes
    # ceil(min(S/5, 3 sqrt(S/r_eff))), and this r_eff puts 3 sqrt(S/r_eff) at tail - 1/2,
    # below S/5 because the 1.x tail never exceeds S/5.
    return 9.0 * n_draws / (max(tail, 1) - 0.5) ** 2


def _psis(log_ratios: np.ndarray, r_eff: float) -> tuple[np.ndarray, np.ndarray]:
    """Pareto-smoothed log importance weights, normalized over draws, and Pareto k.

    ``log_ratios`` of shape (S, n), draws first (chain-major when flattened from
    (chain, draw)); returns log weights of shape (S, n) and k of shape (n,), inf where
    the tail is too short to fit.
    """
    n_draws = log_ratios.shape[0]
    tail = _tail_draws(n_draws, r_eff)
    if tail < 5:
        log_weights = log_ratios - np.logaddexp.reduce(log_ratios, axis=0)
        return log_weights, np.full(log_ratios.shape[1], np.inf)
    with warnings.catch_warnings():
        # Both lines warn about k > 0.7; the callers report k themselves.
        warnings.simplefilter("ignore", UserWarning)
        if _ARVIZ_MAJOR >= 1:
            # 1.x's psislw takes log-likelihoods: it smooths the weights -x.
            neg = xr.DataArray(-log_ratios, dims=("__sample__", "obs"))
            lw, k = neg.azstats.psislw(dim="__sample__", r_eff=r_eff)
            return lw.transpose("__sample__", "obs").values, np.asarray(k.values)
        lw, k = _az.psislw(log_ratios.T.copy(), reff=_arviz0_reff(n_draws, tail))
        return np.asarray(lw).T, np.asarray(k)


def _loo(idata: Any) -> Any:
    """ArviZ's pointwise PSIS-LOO result of ``OBSERVED`` (0.x ELPDData, 1.x ELPDDataLOO)."""
    ll = idata.log_likelihood[OBSERVED]
    n_draws = ll.sizes["chain"] * ll.sizes["draw"]
    r_eff = _r_eff(idata)
    with warnings.catch_warnings():
        # ArviZ warns about high k; loo() reports the numbers and a reading instead.
        warnings.simplefilter("ignore", UserWarning)
        if _ARVIZ_MAJOR >= 1:
            lw, k = _psis(-ll.values.reshape(n_draws, -1), r_eff)
            return _az.loo(
                idata,
                pointwise=True,
                var_name=OBSERVED,
                reff=r_eff,
                log_weights=ll.copy(data=lw.reshape(ll.shape)),
                pareto_k=ll.isel(chain=0, draw=0, drop=True).copy(data=k),
            )
        reff = _arviz0_reff(n_draws, _tail_draws(n_draws, r_eff))
        res = _az.loo(idata, pointwise=True, var_name=OBSERVED, reff=reff)
    # The standard error of the sum of n pointwise elpds: 0.x takes their variance with
    # ddof=0, 1.x (like R's loo) with ddof=1. 1.x's is kept, and ArviZ's compare reads it too.
    elpd_i = np.asarray(res.loo_i, dtype=float).ravel()
    res["se"] = float(np.sqrt(elpd_i.size * np.var(elpd_i, ddof=1)))
    return res


def _loo_numbers(res: Any) -> tuple[float, float, float, np.ndarray]:
    """(elpd_loo, se, p_loo, pareto_k of shape (n,)) of a :func:`_loo` result."""
    if _ARVIZ_MAJOR >= 1:
        elpd, p = res.elpd, res.p
    else:
        elpd, p = res.elpd_loo, res.p_loo
    k = np.asarray(res.pareto_k, dtype=float).ravel()
    return float(elpd), float(res.se), float(p), k


def _loo_pit(idata: Any) -> np.ndarray:
    """LOO-PIT of ``OBSERVED`` (one output column) with :func:`_psis` weights: shape (n,)."""
    ll = idata.log_likelihood[OBSERVED]
    n_draws = ll.sizes["chain"] * ll.sizes["draw"]
    lw, k = _psis(-ll.values.reshape(n_draws, -1), _r_eff(idata))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if _ARVIZ_MAJOR >= 1:
            weights = xr.Dataset({OBSERVED: ll.copy(data=lw.reshape(ll.shape))})
            k_set = xr.Dataset({OBSERVED: ll.isel(chain=0, draw=0, drop=True).copy(data=k)})
            pit = _az.loo_pit(idata, var_names=OBSERVED, log_weights=weights, pareto_k=k_set)
            return np.asarray(pit[OBSERVED].values, dtype=float)
        # 0.x stacks (chain, draw) into a last sample axis: weights (n, S).
        pit = _az.loo_pit(idata, y=OBSERVED, log_weights=lw.T)
        return np.asarray(pit, dtype=float)


def _compare(results: Mapping[str, Any]) -> Any:
    """ArviZ's stacking comparison of :func:`_loo` results, in ArviZ 0.x's columns: rank,
    elpd_loo, p_loo, elpd_diff (best minus this one, >= 0), weight, se, dse, warning, scale."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if _ARVIZ_MAJOR < 1:
            return _az.compare(dict(results), ic="loo")
        table = _az.compare(dict(results), round_to="none")
    import pandas as pd

    return pd.DataFrame(
        {
            "rank": table["rank"].astype(int),
            "elpd_loo": table["elpd"],
            "p_loo": table["p"],
            # 1.x reports this one minus the best (<= 0), 0.x the best minus this one.
            "elpd_diff": 0.0 - table["elpd_diff"],
            "weight": table["weight"],
            "se": table["se"],
            "dse": table["dse"],
            "warning": [bool(results[name].warning) for name in table.index],
            "scale": "log",
        },
        index=table.index,
    )


def _posterior(source: Any) -> Posterior:
    """The posterior of a fitted estimator (its ``posterior_``, drawing its current
    ``num_draws``), a :class:`Posterior`, or a (model, guide) pair (100 draws)."""
    if isinstance(source, Posterior):
        return source
    if isinstance(source, tuple) and len(source) == 2:
        model, guide = source
        if not isinstance(model, MixtureDensityModel) or not isinstance(guide, nn.Module):
            raise TypeError(
                "a (model, guide) pair must hold a MixtureDensityModel and a torch Module, got "
                f"({type(model).__name__}, {type(guide).__name__})"
            )
        return Posterior(model, guide)
    if isinstance(getattr(source, "posterior_", None), Posterior):
        post = source.posterior_
        return Posterior(post.model, post.guide, source.num_draws, post.max_elements)
    if hasattr(source, "model_") and hasattr(source, "guide_"):
        # Any fitted object that exposes a model and a guide, as 0.1 accepted.
        return Posterior(source.model_, source.guide_, getattr(source, "num_draws", 100))
    if hasattr(source, "get_params"):
        from sklearn.exceptions import NotFittedError

        raise NotFittedError("this estimator is not fitted yet: call fit(X, y) first")
    raise TypeError(
        "expected a fitted BayesianMDN, a Posterior or a (model, guide) pair, got "
        f"{type(source).__name__}"
    )


def _tensors(model: MixtureDensityModel, X: Any, y: Any) -> tuple[Tensor, Tensor]:
    x_arr, _ = as_2d_float(X, "X", allow_1d=False)
    y_arr, _ = as_2d_float(y, "y", allow_1d=True)
    if len(x_arr) != len(y_arr):
        raise ValueError(
            f"X and y must have the same number of rows, got {len(x_arr)} and {len(y_arr)}"
        )
    if x_arr.shape[1] != model.net.d_x or y_arr.shape[1] != model.net.d_y:
        raise ValueError(
            f"the model maps {model.net.d_x} inputs to {model.net.d_y} outputs, got X with "
            f"{x_arr.shape[1]} columns and y with {y_arr.shape[1]}"
        )
    ref: Tensor = model.prior_scale  # type: ignore[assignment]
    return (
        torch.as_tensor(x_arr, dtype=ref.dtype, device=ref.device),
        torch.as_tensor(y_arr, dtype=ref.dtype, device=ref.device),
    )


def _check_draws(num_draws: int) -> None:
    check_count("num_draws", num_draws)


def has_posterior(guide: nn.Module) -> bool:
    """True when the guide holds a posterior to draw from (not MAP, not point estimates).

    An ensemble has one when its members do: an ensemble of MAP members is M networks,
    too few draws for PSIS-LOO, so it is judged on held-out data like one MAP fit.
    """
    if isinstance(guide, EnsembleGuide):
        return any(not is_deterministic(g) for g in guide.guides)
    return not is_deterministic(guide)


def pointwise_log_likelihood(
    model: MixtureDensityModel,
    x: Tensor,
    y: Tensor,
    weights: Mapping[str, Tensor],
    max_elements: int = _MAX_ELEMENTS,
) -> Tensor:
    """log p(y_i | x_i, theta_s) for every draw and point, in y's units: shape (S, n).

    One vectorized pass of the network per chunk of points; ``weights`` are
    {site: (S, *shape)} (empty for a model with no latent weights, giving S = 1).
    """
    draws = next(iter(weights.values())).shape[0] if weights else 1
    net = model.net
    step = max(1, max_elements // (draws * net.n_components * net.d_y))
    outs = []
    with torch.no_grad():
        for start in range(0, len(x), step):
            sl = slice(start, start + step)
            lp = model.mixture(x[sl], weights).distribution().log_prob(y[sl])
            outs.append(lp.reshape(draws, -1))
    return torch.cat(outs, dim=1)


def _site_name(site: str) -> str:
    # Dots are legal in netCDF names but awkward in xarray attribute access.
    return site.replace(".", "_")


def _site_dims(site: str, shape: Sequence[int]) -> list[str]:
    base = _site_name(site)
    if len(shape) == 2:
        return [f"{base}_out", f"{base}_in"]
    return [f"{base}_dim_{i}" for i in range(len(shape))]


def to_inference_data(
    source: Any, X: Any, y: Any, num_draws: int | None = None, seed: int | None = 0
) -> InferenceLike:
    """The ArviZ data of a fit on data (X, y): ``az.InferenceData`` on ArviZ 0.x, an xarray
    ``DataTree`` on ArviZ 1.x, with the same groups, variables, dims and values.

    Parameters
    ----------
    source : fitted BayesianMDN, Posterior, or a (MixtureDensityModel, guide) pair
    X : array-like of shape (n, d_x)
    y : array-like of shape (n,) or (n, d_y)
    num_draws : posterior draws S; None takes the estimator's ``num_draws`` (100 for a
        pair), or every stored draw, chains kept apart, for a NUTS fit
    seed : seed of the draws

    Returns
    -------
    InferenceData (ArviZ 0.x) or DataTree (ArviZ 1.x) with groups
        posterior : every latent site (dots become underscores: ``head_weight`` with dims
            ``head_weight_out``, ``head_weight_in``), shape (chain, draw, ...); absent
            when the guide is deterministic (no posterior)
        posterior_predictive : ``y``, one y draw per posterior draw, (chain, draw, obs_id
            [, y_dim])
        log_likelihood : ``y``, log p(y_i | x_i, theta_s) in y's units, (chain, draw,
            obs_id); a single draw for a deterministic guide
        observed_data : ``y``, (obs_id [, y_dim]); constant_data: ``X``, (obs_id, x_dim)

    Examples
    --------
    >>> from bayes_mdn import BayesianMDN, make_inverse_sine
    >>> X, y = make_inverse_sine(200, seed=0)
    >>> mdn = BayesianMDN(n_components=3, hidden=(8,), epochs=2, progress=False).fit(X, y)
    >>> idata = to_inference_data(mdn, X, y, num_draws=10)
    >>> idata.log_likelihood["y"].shape
    (1, 10, 200)
    """
    post = _posterior(source)
    model, guide, default = post.model, post.guide, post.num_draws
    x, yt = _tensors(model, X, y)
    n, d = yt.shape
    device = x.device
    if isinstance(guide, EmpiricalGuide) and num_draws is None:
        chains = guide.num_chains
        weights = {k: v.flatten(0, 1) for k, v in guide.samples.items()}
    else:
        num_draws = default if num_draws is None else num_draws
        _check_draws(num_draws)
        chains = 1
        weights = post.weights(num_draws, seed)
    posterior = has_posterior(guide)
    draws = next(iter(weights.values())).shape[0] if posterior else (num_draws or default)
    log_lik = pointwise_log_likelihood(model, x, yt, weights)  # (S or 1, n)
    point_ensemble = isinstance(guide, EnsembleGuide) and not posterior
    if point_ensemble:
        # M point estimates pooled: the model's density is the mean of the members'.
        log_lik = (torch.logsumexp(log_lik, 0) - math.log(len(log_lik)))[None]

    with seeded(None if seed is None else seed + 1, device), torch.no_grad():
        # One y per posterior draw; a deterministic fit has one network, drawn from S times.
        if posterior:
            y_rep = model.sample(x, weights)
        elif point_ensemble:
            y_rep = post.sample(x, draws, seed=None, sampler="direct")
        else:
            point = {name: value[0] for name, value in weights.items()}
            y_rep = model.sample(x, point, num_draws=draws)

    def chained(t: Tensor) -> np.ndarray:
        # Always an explicit chain axis: without it ArviZ reads S draws as S chains.
        arr = t.detach().cpu().numpy()
        return arr.reshape(chains, arr.shape[0] // chains, *arr.shape[1:])

    y_dims = ["obs_id"] if d == 1 else ["obs_id", "y_dim"]
    obs = yt[:, 0] if d == 1 else yt
    rep = y_rep[..., 0] if d == 1 else y_rep
    dims: dict[str, list[str]] = {OBSERVED: y_dims, "X": ["obs_id", "x_dim"]}
    post = None
    if posterior:
        post = {}
        for site, shape in model.latent_shapes.items():
            post[_site_name(site)] = chained(weights[site])
            dims[_site_name(site)] = _site_dims(site, shape)
    inference = (
        "nuts"
        if isinstance(guide, EmpiricalGuide)
        else (
            type(guide).__name__
            if posterior
            else ("ensemble of point estimates" if point_ensemble else "point estimate")
        )
    )
    ll_chains = chains if posterior else 1
    groups: dict[str, dict[str, np.ndarray]] = {}
    if post is not None:
        groups["posterior"] = post
    groups["posterior_predictive"] = {
        OBSERVED: chained(rep) if posterior else rep.cpu().numpy()[None]
    }
    groups["log_likelihood"] = {OBSERVED: log_lik.cpu().numpy().reshape(ll_chains, -1, n)}
    groups["observed_data"] = {OBSERVED: obs.cpu().numpy()}
    groups["constant_data"] = {"X": x.cpu().numpy()}
    return _from_dict(
        groups,
        coords={"obs_id": np.arange(n)},
        dims=dims,
        attrs={"inference": inference, "has_posterior": int(posterior)},
    )


def save_inference_data(idata: InferenceLike, path: str | os.PathLike[str]) -> Path:
    """Write ``idata`` (InferenceData or DataTree) to netCDF with h5netcdf, atomically."""
    with atomic_path(path) as tmp:
        _to_netcdf(idata, str(tmp))
    return Path(path)


def read_inference_data(path: str | os.PathLike[str]) -> InferenceLike:
    """Read a file written by :func:`save_inference_data`, fully loaded: InferenceData on
    ArviZ 0.x, DataTree on 1.x."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no netCDF file at {str(path)!r}")
    return _from_netcdf(str(path))


def loo(idata: InferenceLike) -> dict[str, Any]:
    """PSIS-LOO of a fit with a posterior: elpd, its standard error, Pareto k per point.

    Returns
    -------
    dict with "elpd_loo", "se", "p_loo", "pareto_k" (ndarray (n,)), "n_k_over_0.7",
    "max_k" and "reading".

    Raises
    ------
    ValueError
        When ``idata`` has no posterior (a deterministic fit): LOO over one draw is not
        defined; use the held-out log predictive density instead.
    """
    if "posterior" not in _groups(idata):
        raise ValueError(
            "this fit has no posterior (MAP or bayesian='none'): PSIS-LOO needs posterior "
            "draws; judge it by the held-out log predictive density instead"
        )
    elpd, se, p_loo, k = _loo_numbers(_loo(idata))
    n_bad = int((k > 0.7).sum())
    return {
        "elpd_loo": elpd,
        "se": se,
        "p_loo": p_loo,
        "pareto_k": k,
        "max_k": float(k.max()),
        "n_k_over_0.7": n_bad,
        "reading": (
            f"{n_bad} of {k.size} points have Pareto k > 0.7: their LOO estimates are "
            "unreliable (influential points, or a posterior approximation too narrow)"
            if n_bad
            else "every Pareto k <= 0.7: the PSIS-LOO estimate is reliable"
        ),
    }


def variational_khat(
    source: Any, X: Any, y: Any, num_draws: int = 500, seed: int | None = 0
) -> dict[str, Any]:
    """How good an importance proposal the variational posterior is (Yao et al., 2018).

    The Pareto k-hat of log w_s = log p(y, theta_s) - log q(theta_s) over draws theta_s
    from the guide, with log p(y, theta) = log prior(theta) + full-data log-likelihood.

    Returns
    -------
    dict with "khat", "num_draws" and "reading" (k < 0.5 good, 0.5-0.7 ok, > 0.7 the
    variational posterior is a poor importance proposal for the true posterior).

    Raises
    ------
    ValueError
        For a deterministic guide (no q to check) or stored MCMC draws (no density q).
    """
    post = _posterior(source)
    model, guide = post.model, post.guide
    if not has_posterior(guide):
        raise ValueError(
            "this fit has no variational posterior (MAP or bayesian='none'): nothing to check"
        )
    if isinstance(guide, EmpiricalGuide):
        raise ValueError("MCMC draws have no density q(theta): the k-hat check is for SVI")
    _check_draws(num_draws)
    if isinstance(guide, EnsembleGuide):
        # The pooled draws have no density q; each member's variational posterior does, and
        # is checked against the posterior of its own point-estimated layers.
        members = [
            variational_khat((m, g), X, y, num_draws, None if seed is None else seed + i)
            for i, (m, g) in enumerate(guide.members)
        ]
        khats = [r["khat"] for r in members]
        worst = max(khats)
        return {
            "khat": worst,
            "khat_members": khats,
            "num_draws": num_draws,
            "reading": f"worst of {len(khats)} members: " + members[khats.index(worst)]["reading"],
        }
    x, yt = _tensors(model, X, y)
    log_q = torch.empty(num_draws, dtype=x.dtype)
    draws: dict[str, list[Tensor]] = {name: [] for name in model.latent_shapes}
    with pyro_scope(), seeded(seed, x.device), torch.no_grad():
        for s in range(num_draws):
            trace = poutine.trace(guide).get_trace()
            # Sums every sample site: one per weight (AutoNormal), or the joint latent plus
            # zero-density Delta sites (low-rank guides).
            log_q[s] = trace.log_prob_sum()
            for name in draws:
                draws[name].append(cast(Tensor, trace.nodes[name]["value"]))
    weights = {name: torch.stack(v) for name, v in draws.items()}
    log_prior = sum(model.prior(name).log_prob(w) for name, w in weights.items())
    log_lik = pointwise_log_likelihood(model, x, yt, weights).sum(1)
    log_w = (log_prior + log_lik).cpu() - log_q
    _, k = _psis(log_w.double().numpy()[:, None], r_eff=1.0)
    khat = float(k[0])
    if khat < 0.5:
        reading = "good: the variational posterior is close enough to importance-sample from"
    elif khat < 0.7:
        reading = "ok: usable, but the variational posterior misses some of the true one"
    else:
        reading = (
            "poor: the variational posterior is a poor importance proposal for the true "
            "posterior (too narrow or misplaced); treat its uncertainty with caution"
        )
    return {"khat": khat, "num_draws": num_draws, "reading": f"k-hat = {khat:.2f}, {reading}"}


def mcmc_convergence(idata: InferenceLike) -> dict[str, float]:
    """R-hat and effective sample sizes of a multi-chain fit, on order-free quantities.

    Judged on the total log-likelihood per draw and on each point's log-likelihood,
    never on raw weights: mixture components are exchangeable and switch labels between
    chains, which inflates R-hat of the weights without any real disagreement.

    Returns
    -------
    dict with "rhat_total_loglik", "ess_bulk_total_loglik", "ess_tail_total_loglik" and
    "max_rhat_pointwise_loglik".
    """
    ll = idata.log_likelihood[OBSERVED]
    if ll.sizes["chain"] < 2:
        raise ValueError(f"R-hat needs at least 2 chains, these draws have {ll.sizes['chain']}")
    total = ll.sum("obs_id").values  # (chain, draw)
    return {
        "rhat_total_loglik": float(_rhat(total)),
        "ess_bulk_total_loglik": float(_ess(total, "bulk")),
        "ess_tail_total_loglik": float(_ess(total, "tail")),
        "max_rhat_pointwise_loglik": float(np.max(_rhat(ll.values))),
    }


def calibration_report(
    source: Any,
    X: Any,
    y: Any,
    X_test: Any | None = None,
    y_test: Any | None = None,
    idata: InferenceLike | None = None,
    levels: Sequence[float] = _LEVELS,
    num_draws: int | None = None,
    crps_draws: int = 20,
    seed: int | None = 0,
) -> dict[str, Any]:
    """Every calibration and scoring number of a fit in one dict.

    Parameters
    ----------
    source : fitted BayesianMDN, Posterior, or a (model, guide) pair
    X, y : the data the model was fitted on (for LOO-PIT)
    X_test, y_test : held-out data for exact PIT, coverage and scores; without them those
        are computed on (X, y) and marked ``"in-sample"``
    idata : the output of :func:`to_inference_data` on (X, y), built when absent and needed
    levels : nominal central-interval levels for coverage
    num_draws : posterior draws of the predictive mixture; None: the estimator's default
    crps_draws : posterior draws pooled for the CRPS, whose cost is quadratic in the
        number of components (draws x K)
    seed : seed of every draw

    Returns
    -------
    dict with "evaluated_on", "n", "nll", "crps" (per marginal), "pit" (n, d), "ks" (per
    marginal: statistic and p-value), "levels", "coverage" (levels x d), and when y has
    several columns "energy_score"; for a fit with a posterior and one output also
    "loo_pit" and "loo_pit_ks".
    """
    post = _posterior(source)
    model, guide = post.model, post.guide
    num_draws = post.num_draws if num_draws is None else num_draws
    _check_draws(num_draws)
    _check_draws(crps_draws)
    if (X_test is None) != (y_test is None):
        raise ValueError("X_test and y_test must be given together")
    x, yt = _tensors(model, X, y)
    held_out = X_test is not None
    x_eval, y_eval = _tensors(model, X_test, y_test) if held_out else (x, yt)
    mix = post.mixture(x_eval, num_draws, seed).params
    pit = scores.pit(mix, y_eval)
    ks = [scores.ks_uniform(pit[:, j]) for j in range(pit.shape[1])]
    crps_mix = post.mixture(x_eval, crps_draws, seed).params
    report: dict[str, Any] = {
        "evaluated_on": "held-out" if held_out else "in-sample",
        "n": len(x_eval),
        "num_draws": num_draws,
        "nll": scores.negative_log_likelihood(mix, y_eval),
        "crps": scores.crps_mixture(crps_mix, y_eval).mean(0).tolist(),
        "pit": pit,
        "ks": [{"statistic": s, "p_value": p} for s, p in ks],
        "levels": list(levels),
        "coverage": scores.interval_coverage(mix, y_eval, levels),
    }
    if yt.shape[1] > 1:
        draws = post.sample(x_eval, num_samples=200, seed=seed)
        report["energy_score"] = float(scores.energy_score(draws, y_eval).mean())
    if has_posterior(guide) and yt.shape[1] == 1:
        idata = to_inference_data(source, X, y, num_draws, seed) if idata is None else idata
        loo_pit = _loo_pit(idata)
        stat, p = scores.ks_uniform(np.clip(loo_pit, 0, 1))
        report["loo_pit"] = loo_pit
        report["loo_pit_ks"] = {"statistic": stat, "p_value": p}
    return report


def compare_models(
    models: Mapping[str, Any], X: Any, y: Any, num_draws: int | None = None, seed: int | None = 0
) -> Any:
    """Rank fitted models by PSIS-LOO with ArviZ's ``compare`` (stacking weights).

    Parameters
    ----------
    models : {name: fitted BayesianMDN, Posterior or (model, guide)}, at least two, each
        with a posterior
    X, y : the data every model was fitted on

    Returns
    -------
    pandas.DataFrame, one row per model, best first, with ArviZ 0.x's columns on both
    lines: rank, elpd_loo, p_loo, elpd_diff (the best model's elpd minus this one's),
    weight, se, dse, warning (a Pareto k above ArviZ's threshold), scale.
    """
    if not isinstance(models, Mapping) or len(models) < 2:
        raise ValueError("models must be a mapping of at least two named fitted models")
    results = {}
    for name, source in models.items():
        if not has_posterior(_posterior(source).guide):
            raise ValueError(
                f"model {name!r} has no posterior (MAP or bayesian='none'): LOO-based "
                "comparison needs posterior draws; compare held-out scores instead"
            )
        results[name] = _loo(to_inference_data(source, X, y, num_draws, seed))
    return _compare(results)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_diagnostics(
    estimator: Any,
    X: Any,
    y: Any,
    X_test: Any | None = None,
    y_test: Any | None = None,
    out_dir: str | os.PathLike[str] = "diagnostics",
    num_draws: int | None = None,
    seed: int | None = 0,
    plots: bool = True,
) -> dict[str, Any]:
    """Diagnose a fitted model and write a report folder.

    Writes ``report.json`` (every number), ``inference_data.nc`` (netCDF of the fit on
    (X, y)) and, with ``plots``, PNG figures: loss history, posterior predictive check,
    PIT and LOO-PIT ECDFs, Pareto k, coverage and, for 1-D x and y, the conditional
    density p(y | x) with the data.

    Returns
    -------
    The report as written to JSON (per-point arrays included as lists).
    """
    post = _posterior(estimator)
    model, guide = post.model, post.guide
    out = Path(out_dir)
    x, yt = _tensors(model, X, y)
    idata = to_inference_data(estimator, X, y, num_draws, seed)
    report: dict[str, Any] = {"inference": idata.attrs.get("inference", "unknown")}
    if has_posterior(guide):
        loo_res = loo(idata)
        report["loo"] = loo_res
        if isinstance(guide, EmpiricalGuide):
            if guide.num_chains > 1:
                report["mcmc"] = mcmc_convergence(idata)
        else:
            report["variational_check"] = variational_khat(estimator, X, y, seed=seed)
    else:
        report["posterior"] = (
            "none: the fit is a point estimate (MAP or bayesian='none'), so there is no "
            "PSIS-LOO or variational check; see the held-out log predictive density"
        )
    if X_test is not None and y_test is not None:
        x_test, y_test_t = _tensors(model, X_test, y_test)
        lpd = post.log_prob(x_test, y_test_t, num_draws, seed=seed)
        report["heldout_lpd"] = float(lpd.mean())
    cal = calibration_report(
        estimator, X, y, X_test, y_test, idata, num_draws=num_draws, seed=seed
    )
    report["calibration"] = cal
    report = _jsonable(report)
    out.mkdir(parents=True, exist_ok=True)
    save_inference_data(idata, out / "inference_data.nc")
    if plots:
        report["figures"] = _write_figures(estimator, idata, cal, report, x, yt, out)
    write_json(out / "report.json", report)
    return report


def _write_figures(
    estimator: Any,
    idata: InferenceLike,
    cal: dict[str, Any],
    report: dict[str, Any],
    x: Tensor,
    y: Tensor,
    out: Path,
) -> list[str]:
    import matplotlib.pyplot as plt

    from . import plotting

    figures: dict[str, Any] = {}
    history = getattr(estimator, "history_", None)
    if history is not None and history.train_loss:
        figures["loss.png"] = lambda ax: plotting.plot_loss(history, ax=ax)
    obs = idata.observed_data[OBSERVED].values
    rep = idata.posterior_predictive[OBSERVED].values
    rep = rep.reshape(-1, *rep.shape[2:])
    figures["ppc.png"] = lambda ax: plotting.plot_ppc(obs, rep, ax=ax)
    figures["pit.png"] = lambda ax: plotting.plot_pit(np.asarray(cal["pit"])[:, 0], ax=ax)
    if "loo_pit" in cal:
        figures["loo_pit.png"] = lambda ax: plotting.plot_pit(
            np.asarray(cal["loo_pit"]), ax=ax, label="LOO-PIT"
        )
    if "loo" in report:
        figures["pareto_k.png"] = lambda ax: plotting.plot_pareto_k(
            np.asarray(report["loo"]["pareto_k"]), ax=ax
        )
    figures["coverage.png"] = lambda ax: plotting.plot_coverage(
        cal["levels"], np.asarray(cal["coverage"]), ax=ax
    )
    if x.shape[1] == 1 and y.shape[1] == 1 and hasattr(estimator, "predictive_mixture"):
        xs, ys = x[:, 0].cpu().numpy(), y[:, 0].cpu().numpy()
        figures["conditional_density.png"] = lambda ax: plotting.plot_conditional_density(
            estimator, X=xs, y=ys, ax=ax
        )
    written = []
    for name, draw in figures.items():
        fig, ax = plt.subplots(figsize=(6, 4.5))
        try:
            draw(ax)
            fig.tight_layout()
            with atomic_path(out / name) as tmp:
                fig.savefig(tmp, format="png", dpi=110)
        finally:
            plt.close(fig)
        written.append(name)
    return written
