import matplotlib.pyplot as plt
import numpy as np
import pytest

from bayes_mdn import BayesianMDN, make_inverse_sine, plotting


@pytest.fixture(scope="module")
def fitted() -> tuple[BayesianMDN, np.ndarray, np.ndarray]:
    X, y = make_inverse_sine(200, seed=0)
    mdn = BayesianMDN(n_components=3, hidden=(16,), epochs=5, progress=False).fit(X, y)
    return mdn, X, y


def _saved_size(ax, tmp_path) -> int:
    path = tmp_path / "fig.png"
    ax.figure.savefig(path)
    plt.close(ax.figure)
    return path.stat().st_size


def test_conditional_density(fitted, tmp_path) -> None:
    mdn, X, y = fitted
    ax = plotting.plot_conditional_density(mdn, X, y, resolution=40, num_draws=5)
    assert len(ax.collections) == 2  # the density mesh and the data
    assert _saved_size(ax, tmp_path) > 5000


def test_conditional_density_without_data(fitted, tmp_path) -> None:
    ax = plotting.plot_conditional_density(fitted[0], x_range=(-5, 5), resolution=20)
    assert ax.get_xlim() == (-5, 5)
    assert _saved_size(ax, tmp_path) > 5000


def test_ppc(fitted, tmp_path) -> None:
    mdn, X, y = fitted
    ax = plotting.plot_ppc(y, mdn.sample(X, n_samples=20))
    assert len(ax.lines) == 21
    assert _saved_size(ax, tmp_path) > 5000
    with pytest.raises(ValueError, match="y_draws"):
        plotting.plot_ppc(y, np.zeros((3, 5)))


def test_pit_and_band(tmp_path) -> None:
    u = np.random.default_rng(0).uniform(size=300)
    ax = plotting.plot_pit(u, label="LOO-PIT")
    assert _saved_size(ax, tmp_path) > 5000
    with pytest.raises(ValueError, match="confidence"):
        plotting.plot_pit(u, confidence=1.0)


def test_pareto_k(tmp_path) -> None:
    k = np.random.default_rng(0).normal(0.3, 0.2, size=200)
    ax = plotting.plot_pareto_k(k)
    assert sorted(line.get_ydata()[0] for line in ax.lines) == [0.5, 0.7]
    assert _saved_size(ax, tmp_path) > 5000


def test_coverage(tmp_path) -> None:
    ax = plotting.plot_coverage([0.5, 0.8, 0.9, 0.95], [0.45, 0.79, 0.91, 0.96])
    assert len(ax.lines) == 2
    assert _saved_size(ax, tmp_path) > 5000
