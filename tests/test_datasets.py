import numpy as np
import pytest

from bayes_mdn.datasets import (
    DATASETS,
    INVERSE_SINE_Y_RANGE,
    Dataset,
    inverse_sine_log_density,
    load_dataset,
    make_inverse_sine,
)


def test_shapes_and_seed():
    X, y = make_inverse_sine(50, seed=3)
    assert X.shape == (50, 1) and y.shape == (50,)
    np.testing.assert_array_equal(make_inverse_sine(50, seed=3)[0], X)
    assert y.min() >= INVERSE_SINE_Y_RANGE[0] and y.max() <= INVERSE_SINE_Y_RANGE[1]


@pytest.mark.parametrize("x0", [-8.0, -2.5, 0.0, 4.0, 9.0])
def test_oracle_is_a_normalized_density_in_y(x0):
    grid = np.linspace(*INVERSE_SINE_Y_RANGE, 4001)
    dens = np.exp(inverse_sine_log_density(np.full((grid.size, 1), x0), grid))
    assert np.trapezoid(dens, grid) == pytest.approx(1.0, abs=1e-6)


def test_oracle_outside_the_support():
    assert inverse_sine_log_density(np.zeros((1, 1)), np.array([11.0]))[0] == -np.inf


def test_oracle_test_nll_matches_the_published_value():
    X, y = make_inverse_sine(20_000, seed=11)
    assert -inverse_sine_log_density(X, y).mean() == pytest.approx(1.291, abs=0.01)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n must"):
        make_inverse_sine(0)
    with pytest.raises(ValueError, match="same number"):
        inverse_sine_log_density(np.zeros((3, 1)), np.zeros(2))


def test_faithful_matches_r() -> None:
    # Values from R: nrow(faithful), faithful[1, ], colMeans(faithful).
    ds = load_dataset("faithful")
    assert isinstance(ds, Dataset)
    assert ds.X.shape == (272, 1) and ds.y.shape == (272,)
    assert (ds.feature_names, ds.target_name) == (("waiting",), "eruptions")
    assert (ds.y[0], ds.X[0, 0]) == (3.6, 79.0)
    assert ds.y.mean() == pytest.approx(3.487783, abs=1e-6)
    assert ds.X.mean() == pytest.approx(70.897059, abs=1e-6)


def test_mcycle_matches_r() -> None:
    ds = load_dataset("mcycle")
    assert ds.X.shape == (133, 1) and ds.y.shape == (133,)
    assert (ds.feature_names, ds.target_name) == (("times",), "accel")
    assert (ds.X[0, 0], ds.y[0]) == (2.4, 0.0)
    assert (ds.X[-1, 0], ds.y[-1]) == (57.6, 10.7)
    assert (ds.y.min(), ds.y.max()) == (-134.0, 75.0)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_dataset_is_finite_and_documented(name: str) -> None:
    ds = load_dataset(name)
    assert np.isfinite(ds.X).all() and np.isfinite(ds.y).all()
    assert ds.X.dtype == np.float64
    assert "GPL" in ds.licence and ds.source and ds.description


def test_unknown_dataset_lists_the_available_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown data set 'geyser'.*faithful.*mcycle"):
        load_dataset("geyser")
