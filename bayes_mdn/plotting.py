"""Figures (matplotlib only, imported when a function runs).

Each function draws on ``ax`` (a new figure's axes when None) and returns the axes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from .estimator import BayesianMDN
    from .fit import FitHistory

__all__ = [
    "plot_data",
    "plot_density_2d",
    "plot_loss",
    "plot_mixture_at",
    "plot_predictive_samples",
    "plot_regression_fit",
]


def _axes(ax: Axes | None) -> Axes:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=(6, 4.5))
    return ax


def plot_data(X: Any, y: Any, ax: Axes | None = None, **scatter: Any) -> Axes:
    """Scatter of a 1-D input against a 1-D target."""
    ax = _axes(ax)
    style = {"s": 3, "alpha": 0.3, "color": "tab:blue", "label": "data"} | scatter
    ax.scatter(np.asarray(X).reshape(-1), np.asarray(y).reshape(-1), **style)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    return ax


def plot_regression_fit(model: Any, X: Any, y: Any, ax: Axes | None = None) -> Axes:
    """Data, and the curve of a model's ``predict`` (a regression net's conditional mean)."""
    ax = plot_data(X, y, ax)
    grid = np.linspace(np.min(X), np.max(X), 400).reshape(-1, 1)
    ax.plot(grid[:, 0], model.predict(grid), color="tab:red", lw=2, label="regression net")
    ax.legend(loc="upper left")
    return ax


def plot_predictive_samples(
    model: BayesianMDN, X: Any, y: Any | None = None, ax: Axes | None = None, seed: int = 0
) -> Axes:
    """One posterior-predictive draw of y at each x, over the data when given."""
    ax = _axes(ax)
    if y is not None:
        plot_data(X, y, ax, label="test data")
    draws = model.sample(X, n_samples=1, seed=seed)[0]
    ax.scatter(
        np.asarray(X).reshape(-1),
        draws,
        s=3,
        alpha=0.3,
        color="tab:orange",
        label="posterior-predictive draws",
    )
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.legend(loc="upper left", markerscale=4)
    return ax


def plot_mixture_at(
    model: BayesianMDN,
    x: float,
    ax: Axes | None = None,
    grid: Any | None = None,
    true_log_density: Any | None = None,
    num_draws: int | None = None,
    max_components: int = 20,
) -> Axes:
    """The predictive density p(y | x) at one input, with its weighted components.

    Parameters
    ----------
    model : fitted BayesianMDN with one input and one output
    x : the input value
    grid : y values to draw on; default spans the predictive's 0.1 % to 99.9 % quantiles
    true_log_density : optional callable (X, y) -> log density to draw as a reference
    max_components : the heaviest components drawn, each averaged over posterior draws
    """
    import torch

    from . import mixtures

    ax = _axes(ax)
    X = np.array([[float(x)]])
    if grid is None:
        lo, hi = model.predict_quantiles(X, [0.001, 0.999])[0]
        pad = 0.1 * (hi - lo)
        grid = np.linspace(lo - pad, hi + pad, 500)
    grid = np.asarray(grid, dtype=float)
    mix = model.predictive_mixture(X, num_draws=num_draws)
    yt = torch.as_tensor(grid, dtype=mix.loc.dtype, device=mix.loc.device).reshape(-1, 1, 1)
    dens = mixtures.log_prob(mix, yt.reshape(-1, 1)).exp().cpu().numpy()
    weights = torch.softmax(mix.logits[0], -1)
    sd = mix.marginal_scale()[0, :, 0]
    normal = torch.distributions.Normal(mix.loc[0, :, 0], sd)
    # The pooled predictive holds K components per posterior draw, draw-major: component
    # k of the predictive is the draw-average of component k of each network.
    k = model.n_components
    comp = (weights * normal.log_prob(yt[:, 0]).exp()).reshape(len(grid), -1, k).sum(1)
    comp_weight = weights.reshape(-1, k).sum(0)
    comp = comp.cpu().numpy()
    for j in np.argsort(-comp_weight.cpu().numpy())[:max_components]:
        ax.plot(grid, comp[:, j], color="tab:gray", lw=0.8, alpha=0.7)
    ax.plot([], [], color="tab:gray", lw=0.8, label="weighted components")
    ax.plot(grid, dens, color="tab:orange", lw=2, label="predictive p(y | x)")
    if true_log_density is not None:
        truth = np.exp(true_log_density(np.full((len(grid), 1), float(x)), grid))
        ax.plot(grid, truth, color="black", ls="--", lw=1.2, label="exact p(y | x)")
    ax.set_xlabel("y")
    ax.set_ylabel("density")
    ax.set_title(f"x = {float(x):g}")
    ax.legend(loc="upper right", fontsize="small")
    return ax


def plot_loss(history: FitHistory, ax: Axes | None = None) -> Axes:
    """Training loss (negative ELBO per point) and validation NLL per epoch."""
    ax = _axes(ax)
    epochs = np.arange(1, len(history.train_loss) + 1)
    ax.plot(epochs, history.train_loss, label="train: -ELBO / n")
    if history.val_nll:
        ax.plot(epochs, history.val_nll, label="validation NLL")
        ax.axvline(history.best_epoch + 1, color="gray", ls=":", label="kept state")
    finite = np.asarray(history.train_loss + history.val_nll, dtype=float)
    if finite.size:
        lo, hi = np.nanpercentile(finite, [0, 95])
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per point")
    ax.legend()
    return ax


def plot_density_2d(
    model: BayesianMDN,
    x: Any,
    ax: Axes | None = None,
    grid: tuple[Any, Any] | None = None,
    samples: int = 200,
    true_log_density: Any | None = None,
    num_draws: int | None = None,
    seed: int = 0,
) -> Axes:
    """Contours of the predictive density p(y | x) of a two-dimensional target at one input.

    Parameters
    ----------
    model : fitted BayesianMDN with two outputs
    x : the input: a number (one feature) or array-like of shape (d_x,)
    grid : optional pair (g1, g2) of 1-D arrays, the y_1 and y_2 values to evaluate on;
        default spans the predictive's marginal 0.1 % to 99.9 % quantiles, padded by 10 %
    samples : posterior-predictive draws scattered over the contours (0 for none)
    true_log_density : optional callable (X of shape (m, d_x), Y of shape (m, 2)) -> (m,),
        whose density is drawn as dashed reference contours
    num_draws : posterior draws behind the density (the model's default when None)
    seed : seed of the posterior draws and of the scattered samples
    """
    import torch

    from . import mixtures

    if getattr(model, "n_outputs_", None) != 2:
        raise ValueError(
            "plot_density_2d needs a fitted model with 2 outputs, got "
            f"n_outputs_={getattr(model, 'n_outputs_', None)!r}"
        )
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
        raise ValueError(f"samples must be an integer >= 0, got {samples!r}")
    X = np.asarray(x, dtype=float).reshape(1, -1)
    if X.shape[1] != model.n_features_in_:
        raise ValueError(
            f"x has {X.shape[1]} features, but the model was fitted with {model.n_features_in_}"
        )
    ax = _axes(ax)
    if grid is None:
        lo, hi = model.predict_quantiles(X, [0.001, 0.999], num_draws=num_draws, seed=seed)[0]
        pad = 0.1 * (hi - lo)
        g1, g2 = (np.linspace(a, b, 160) for a, b in zip(lo - pad, hi + pad))
    else:
        if len(grid) != 2:
            raise ValueError(f"grid must be a pair (g1, g2) of 1-D arrays, got {len(grid)} items")
        g1, g2 = (np.asarray(g, dtype=float).reshape(-1) for g in grid)
    mesh1, mesh2 = np.meshgrid(g1, g2)
    points = np.stack([mesh1.ravel(), mesh2.ravel()], axis=1)
    mix = model.predictive_mixture(X, num_draws=num_draws, seed=seed)
    yt = torch.as_tensor(points, dtype=mix.loc.dtype, device=mix.loc.device)
    dens = mixtures.log_prob(mix, yt).exp().cpu().numpy().reshape(mesh1.shape)
    ax.contour(mesh1, mesh2, dens, levels=8, cmap="Oranges")
    ax.plot([], [], color="tab:orange", label="predictive p(y | x)")
    if true_log_density is not None:
        truth = np.exp(true_log_density(np.repeat(X, len(points), axis=0), points))
        ax.contour(
            mesh1,
            mesh2,
            truth.reshape(mesh1.shape),
            levels=8,
            colors="black",
            linestyles="--",
            linewidths=0.8,
        )
        ax.plot([], [], color="black", ls="--", lw=0.8, label="exact p(y | x)")
    if samples:
        draws = model.sample(X, n_samples=samples, seed=seed)[:, 0]
        ax.scatter(
            draws[:, 0],
            draws[:, 1],
            s=4,
            alpha=0.5,
            color="tab:blue",
            label="posterior-predictive draws",
        )
    ax.set_xlabel("y[0]")
    ax.set_ylabel("y[1]")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_title("x = " + ", ".join(f"{v:g}" for v in X[0]))
    ax.legend(loc="upper right", fontsize="small")
    return ax
