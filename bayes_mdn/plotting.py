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
    "plot_conditional_density",
    "plot_coverage",
    "plot_data",
    "plot_density_2d",
    "plot_loss",
    "plot_mixture_at",
    "plot_pareto_k",
    "plot_pit",
    "plot_ppc",
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

    ax = _axes(ax)
    X = np.array([[float(x)]])
    if grid is None:
        lo, hi = model.predict_quantiles(X, [0.001, 0.999])[0]
        pad = 0.1 * (hi - lo)
        grid = np.linspace(lo - pad, hi + pad, 500)
    grid = np.asarray(grid, dtype=float)
    mix = model.predictive_mixture(X, num_draws=num_draws)
    yt = torch.as_tensor(grid, dtype=mix.loc.dtype, device=mix.loc.device).reshape(-1, 1, 1)
    predictive = mix.distribution()
    dens = predictive.log_prob(yt.reshape(-1, 1)).exp().cpu().numpy()
    # Each component's weighted density at every y of the grid: (grid, components).
    weighted = (predictive.component_log_prob(yt) + predictive.log_weights()).exp()[:, 0]
    # The pooled predictive holds K components per posterior draw, draw-major: component
    # k of the predictive is the draw-average of component k of each network (for an
    # ensemble, of the networks of every member: members label their components alike
    # only by their shared initialization of the output layer).
    k = model.n_components_
    comp = weighted.reshape(len(grid), -1, k).sum(1)
    comp_weight = predictive.log_weights()[0].exp().reshape(-1, k).sum(0)
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
        # Validation runs every few epochs (FitHistory.val_epochs; files written before
        # that field existed validated every epoch).
        val_epochs = np.asarray(history.val_epochs or range(len(history.val_nll))) + 1
        ax.plot(val_epochs, history.val_nll, marker=".", label="validation NLL")
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
    dens = mix.distribution().log_prob(yt).exp().cpu().numpy().reshape(mesh1.shape)
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


def plot_conditional_density(
    model: BayesianMDN,
    X: Any | None = None,
    y: Any | None = None,
    ax: Axes | None = None,
    x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] | None = None,
    resolution: int = 150,
    num_draws: int | None = 20,
) -> Axes:
    """Heatmap of the predictive density p(y | x) over a grid, with the data over it.

    Parameters
    ----------
    model : fitted BayesianMDN with one input and one output
    X, y : optional data, shapes (n, 1) or (n,) and (n,); also set the default ranges
    x_range, y_range : grid limits; default the data's range (padded by 5 %), else the
        predictive's 0.5 % to 99.5 % quantiles over x in [-1, 1]
    resolution : grid points per axis
    num_draws : posterior draws pooled into the predictive at each x
    """
    import torch

    ax = _axes(ax)

    def span(values: Any) -> tuple[float, float]:
        lo, hi = float(np.min(values)), float(np.max(values))
        pad = 0.05 * (hi - lo or 1.0)
        return lo - pad, hi + pad

    if x_range is None:
        x_range = span(X) if X is not None else (-1.0, 1.0)
    grid_x = np.linspace(*x_range, resolution)
    if y_range is None:
        if y is not None:
            y_range = span(y)
        else:
            bounds = model.predict_quantiles(grid_x.reshape(-1, 1), [0.005, 0.995])
            y_range = float(np.min(bounds)), float(np.max(bounds))
    grid_y = np.linspace(*y_range, resolution)
    mix = model.predictive_mixture(grid_x.reshape(-1, 1), num_draws=num_draws)
    yt = torch.as_tensor(grid_y, dtype=mix.loc.dtype, device=mix.loc.device)
    # Broadcast every y of the grid against every x's mixture: (grid_y, grid_x).
    with torch.no_grad():
        dens = mix.distribution().log_prob(yt.reshape(-1, 1, 1)).exp().cpu().numpy()
    mesh = ax.pcolormesh(grid_x, grid_y, dens, shading="auto", cmap="viridis")
    ax.figure.colorbar(mesh, ax=ax, label="p(y | x)")
    if X is not None and y is not None:
        ax.scatter(
            np.asarray(X).reshape(-1),
            np.asarray(y).reshape(-1),
            s=2,
            color="white",
            alpha=0.4,
            label="data",
        )
        ax.legend(loc="upper left", markerscale=4)
    ax.set_xlim(*x_range)
    ax.set_ylim(*y_range)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    return ax


def plot_ppc(
    y: Any, y_draws: Any, ax: Axes | None = None, num_lines: int = 50, bins: int = 40
) -> Axes:
    """Posterior predictive check: densities of replicated data sets against the observed one.

    Parameters
    ----------
    y : array of shape (n,), observed targets (one output)
    y_draws : array of shape (S, n), one replicated data set per posterior draw
    num_lines : replicated data sets drawn (the first ones)
    bins : histogram bins shared by all curves
    """
    ax = _axes(ax)
    obs = np.asarray(y, dtype=float).reshape(-1)
    reps = np.asarray(y_draws, dtype=float)
    if reps.ndim != 2 or reps.shape[1] != obs.size:
        raise ValueError(
            f"y_draws must have shape (S, {obs.size}) for y of {obs.size} points, got {reps.shape}"
        )
    edges = np.histogram_bin_edges(np.concatenate([obs, reps[:num_lines].ravel()]), bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    for i, rep in enumerate(reps[:num_lines]):
        dens, _ = np.histogram(rep, bins=edges, density=True)
        ax.plot(
            centers,
            dens,
            color="tab:orange",
            alpha=0.15,
            lw=0.8,
            label="replicated data" if i == 0 else None,
        )
    dens, _ = np.histogram(obs, bins=edges, density=True)
    ax.plot(centers, dens, color="black", lw=2, label="observed")
    ax.set_xlabel("y")
    ax.set_ylabel("density")
    ax.set_title("posterior predictive check")
    ax.legend(loc="upper right")
    return ax


def plot_pit(
    pit: Any, ax: Axes | None = None, label: str = "PIT", confidence: float = 0.95
) -> Axes:
    """ECDF of PIT values minus the uniform CDF, with a simultaneous band.

    The band is the Dvoretzky-Kiefer-Wolfowitz bound sqrt(log(2 / alpha) / (2 n)): a
    calibrated model stays inside it with probability at least ``confidence``. A curve
    above zero in the middle means intervals too wide; an S shape, too narrow.
    """
    ax = _axes(ax)
    u = np.sort(np.asarray(pit, dtype=float).reshape(-1))
    if u.size == 0:
        raise ValueError("pit must hold at least one value")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence!r}")
    grid = np.linspace(0, 1, 201)
    ecdf = np.searchsorted(u, grid, side="right") / u.size
    eps = np.sqrt(np.log(2 / (1 - confidence)) / (2 * u.size))
    ax.fill_between(
        grid, -eps, eps, color="tab:gray", alpha=0.3, label=f"{confidence:.0%} band (DKW)"
    )
    ax.axhline(0, color="black", lw=0.8)
    ax.plot(grid, ecdf - grid, color="tab:blue", lw=1.5, label=f"{label} ECDF - uniform")
    ax.set_xlabel(f"{label} value")
    ax.set_ylabel("ECDF difference")
    ax.set_xlim(0, 1)
    ax.legend(loc="upper right", fontsize="small")
    return ax


def plot_pareto_k(k: Any, ax: Axes | None = None) -> Axes:
    """Pareto k of PSIS-LOO per point, with the 0.5 and 0.7 reliability lines."""
    ax = _axes(ax)
    k = np.asarray(k, dtype=float).reshape(-1)
    colors = np.where(k > 0.7, "tab:red", np.where(k > 0.5, "tab:orange", "tab:blue"))
    ax.scatter(np.arange(k.size), k, s=6, c=colors)
    ax.axhline(0.5, color="tab:orange", ls="--", lw=1, label="k = 0.5")
    ax.axhline(0.7, color="tab:red", ls="--", lw=1, label="k = 0.7")
    ax.set_xlabel("data point")
    ax.set_ylabel("Pareto k")
    ax.legend(loc="upper right")
    return ax


def plot_coverage(levels: Any, coverage: Any, ax: Axes | None = None) -> Axes:
    """Empirical coverage of central predictive intervals against their nominal level.

    Parameters
    ----------
    levels : array of shape (m,), nominal levels
    coverage : array of shape (m,) or (m, d), empirical coverage (one curve per output)
    """
    ax = _axes(ax)
    lv = np.asarray(levels, dtype=float).reshape(-1)
    cov = np.asarray(coverage, dtype=float).reshape(lv.size, -1)
    ax.plot([0, 1], [0, 1], color="black", ls=":", lw=1, label="ideal")
    for j in range(cov.shape[1]):
        label = "empirical" if cov.shape[1] == 1 else f"output {j}"
        ax.plot(lv, cov[:, j], marker="o", label=label)
    ax.set_xlabel("nominal level")
    ax.set_ylabel("empirical coverage")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    return ax
