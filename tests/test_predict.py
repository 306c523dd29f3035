import math

import pytest
import torch

from bayes_mdn import predict
from bayes_mdn._utils import pyro_scope
from tests.helpers import model_and_guide, small_data


def fitted(guide="normal", bayesian="last", d_y=1):
    model, g = model_and_guide(bayesian, guide, d_y=d_y)
    x, y = small_data(16, d_y=d_y)
    with pyro_scope():
        g(x, y)  # create the guide's parameters
    return model, g


@pytest.mark.parametrize(
    ("guide", "bayesian"), [("normal", "last"), ("delta", "all"), ("delta", "none")]
)
def test_log_predictive_density_is_log_mean_exp(guide, bayesian):
    model, g = fitted(guide, bayesian)
    x, y = small_data(9)
    lpd = predict.log_predictive_density(model, g, x, y, num_draws=5, seed=3)
    params = predict.predictive_params(model, g, x, num_draws=5, seed=3)
    per_draw = params.distribution().log_prob(y)
    expected = torch.logsumexp(per_draw, 0) - math.log(per_draw.shape[0])
    torch.testing.assert_close(lpd, expected)
    assert per_draw.shape[0] == (5 if guide == "normal" else 1)


def test_chunking_does_not_change_results():
    model, g = fitted()
    x, y = small_data(23)
    big = predict.log_predictive_density(model, g, x, y, num_draws=4, seed=0)
    small = predict.log_predictive_density(model, g, x, y, num_draws=4, seed=0, max_elements=13)
    torch.testing.assert_close(big, small)
    q = torch.tensor([0.1, 0.5, 0.9])
    a = predict.predictive_quantiles(model, g, x, q, num_draws=4, seed=0)
    b = predict.predictive_quantiles(model, g, x, q, num_draws=4, seed=0, max_elements=50)
    # Solved in the model's float32 (then mapped to float64): a chunk's Newton iterations
    # stop together, so the last float32 ulps may differ between chunkings.
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_samples_shape_and_seed():
    model, g = fitted()
    x, _ = small_data(11)
    s1 = predict.sample_predictive(model, g, x, num_samples=6, seed=1, max_elements=40)
    s2 = predict.sample_predictive(model, g, x, num_samples=6, seed=1, max_elements=40)
    assert s1.shape == (6, 11, 1)
    torch.testing.assert_close(s1, s2)
    assert not torch.equal(s1, predict.sample_predictive(model, g, x, num_samples=6, seed=2))


def test_samples_follow_the_predictive_cdf():
    model, g = fitted("delta", "none")
    x = torch.zeros(1, 1)
    draws = predict.sample_predictive(model, g, x, num_samples=20_000, seed=0)
    q = torch.tensor([0.1, 0.5, 0.9])
    exact = predict.predictive_quantiles(model, g, x, q)[0, :, 0]
    empirical = torch.quantile(draws[:, 0, 0], q)
    torch.testing.assert_close(empirical, exact, atol=0.05, rtol=0, check_dtype=False)


def test_summaries_are_consistent():
    model, g = fitted()
    x, _ = small_data(7)
    q = predict.predictive_quantiles(model, g, x, torch.tensor([0.05, 0.5, 0.95]))
    assert q.shape == (7, 3, 1) and bool((q.diff(dim=1) > 0).all())
    lo, hi = predict.predictive_interval(model, g, x, level=0.9)
    torch.testing.assert_close(lo, q[:, 0])
    torch.testing.assert_close(hi, q[:, 2])
    parts = predict.uncertainty_decomposition(model, g, x, num_draws=50)
    std = predict.predictive_std(model, g, x, num_draws=50)
    torch.testing.assert_close(parts["total"], std.pow(2), rtol=1e-4, atol=1e-6)
    assert bool((parts["epistemic"] >= 0).all())
    modes, dens = predict.predictive_modes(model, g, x, num_draws=4)
    assert modes.shape[0] == 7 and torch.isfinite(modes[:, 0]).all()


def test_map_model_has_no_epistemic_part():
    model, g = fitted("delta", "last")
    x, _ = small_data(5)
    parts = predict.uncertainty_decomposition(model, g, x, num_draws=30)
    assert torch.equal(parts["epistemic"], torch.zeros_like(parts["epistemic"]))


@pytest.mark.parametrize("q", [[0.0, 0.5], [1.0], []])
def test_bad_quantile_levels(q):
    model, g = fitted()
    with pytest.raises(ValueError, match="quantile"):
        predict.predictive_quantiles(model, g, torch.zeros(2, 1), torch.tensor(q))


def test_bad_counts():
    model, g = fitted()
    with pytest.raises(ValueError, match="num_draws"):
        predict.log_predictive_density(model, g, torch.zeros(2, 1), torch.zeros(2, 1), num_draws=0)
    with pytest.raises(ValueError, match="num_samples"):
        predict.sample_predictive(model, g, torch.zeros(2, 1), num_samples=0)
    with pytest.raises(ValueError, match="level"):
        predict.predictive_interval(model, g, torch.zeros(2, 1), level=1.5)


@pytest.mark.parametrize("covariance", ["diagonal", "full"])
def test_both_samplers_draw_the_same_distribution(covariance):
    model, g = model_and_guide("last", "normal", d_y=2, covariance=covariance)
    x, y = small_data(3, d_y=2)
    with pyro_scope():
        g(x, y)
    a = predict.sample_predictive(model, g, x, num_samples=40_000, seed=0, sampler="predictive")
    b = predict.sample_predictive(model, g, x, num_samples=40_000, seed=1, sampler="direct")
    assert a.shape == b.shape == (40_000, 3, 2)
    # Standard errors of the means and sds are below 0.01 at 40,000 draws of O(1) spread.
    torch.testing.assert_close(a.mean(0), b.mean(0), atol=0.05, rtol=0)
    torch.testing.assert_close(a.std(0), b.std(0), atol=0.05, rtol=0.02)
    q = torch.tensor([0.1, 0.5, 0.9])
    exact = predict.predictive_quantiles(model, g, x, q, num_draws=40_000, seed=0)
    for draws in (a, b):
        torch.testing.assert_close(
            torch.quantile(draws, q, dim=0).movedim(0, 1),
            exact,
            atol=0.06,
            rtol=0,
            check_dtype=False,  # quantiles come back in float64
        )


def test_unknown_sampler():
    model, g = fitted()
    with pytest.raises(ValueError, match="sampler"):
        predict.sample_predictive(model, g, torch.zeros(2, 1), sampler="gibbs")


def test_quantiles_are_in_the_units_of_y():
    """predict_cdf at predict_quantiles(q) is q, for a target far from standardized units.

    Regression: quantiles were once returned in the model's standardized units."""
    import numpy as np

    from bayes_mdn import BayesianMDN, make_inverse_sine

    X, y = make_inverse_sine(300, seed=0)
    y = 100.0 * y + 50.0
    mdn = BayesianMDN(n_components=3, hidden=(8,), epochs=5, progress=False, n_members=2)
    mdn.fit(X, y)
    q = np.array([0.05, 0.5, 0.95])
    quantiles = mdn.predict_quantiles(X[:20], q)
    for j, level in enumerate(q):
        np.testing.assert_allclose(mdn.predict_cdf(X[:20], quantiles[:, j]), level, atol=1e-4)
    lo, hi = mdn.predict_interval(X[:20], 0.9)
    np.testing.assert_allclose(lo, quantiles[:, 0], rtol=1e-6)
    np.testing.assert_allclose(hi, quantiles[:, 2], rtol=1e-6)
