import numpy as np
import pytest

from bayes_mdn.datasets import INVERSE_SINE_Y_RANGE, inverse_sine_log_density, make_inverse_sine


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
