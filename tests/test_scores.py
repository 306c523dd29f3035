import math

import numpy as np
import pytest
import torch
from scipy import stats

from bayes_mdn import scores
from bayes_mdn.nets import MixtureParams


def _mixture(n: int = 4) -> MixtureParams:
    logits = torch.log(torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)).expand(n, 3)
    loc = torch.tensor([-2.0, 0.5, 3.0], dtype=torch.float64).reshape(1, 3, 1).expand(n, 3, 1)
    scale = torch.tensor([0.5, 1.0, 0.3], dtype=torch.float64).reshape(1, 3, 1).expand(n, 3, 1)
    return MixtureParams(logits.clone(), loc.clone(), scale.clone())


def test_ks_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    for u in (rng.uniform(size=200), rng.uniform(size=200) ** 1.3):
        d, p = scores.ks_uniform(u)
        ref = stats.kstest(u, "uniform")
        assert d == pytest.approx(ref.statistic, abs=1e-12)
        # Asymptotic with Stephens' correction vs scipy's exact: within 0.01 at n = 200.
        assert p == pytest.approx(ref.pvalue, abs=0.01)


def test_ks_detects_non_uniform() -> None:
    u = np.random.default_rng(1).uniform(size=500) ** 2
    assert scores.ks_uniform(u)[1] < 1e-6


def test_ks_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        scores.ks_uniform(np.array([]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        scores.ks_uniform(np.array([0.2, 1.5]))


def test_pit_single_gaussian_is_normal_cdf() -> None:
    p = MixtureParams(torch.zeros(3, 1), torch.zeros(3, 1, 1), 2 * torch.ones(3, 1, 1))
    y = torch.tensor([[-1.0], [0.0], [3.0]])
    np.testing.assert_allclose(
        scores.pit(p, y)[:, 0], stats.norm.cdf(y[:, 0].numpy(), scale=2), rtol=1e-6
    )


def test_crps_mixture_against_sampled_estimate() -> None:
    torch.manual_seed(0)
    p = _mixture(3)
    y = torch.tensor([[-2.0], [0.0], [4.0]], dtype=torch.float64)
    exact = scores.crps_mixture(p, y)[:, 0]
    # CRPS = E|X - y| - E|X - X'| / 2 with X, X' independent draws of the mixture.
    dist = p.distribution()
    a, b = dist.sample((200_000,))[..., 0], dist.sample((200_000,))[..., 0]
    sampled = ((a - y[:, 0]).abs().mean(0) - 0.5 * (a - b).abs().mean(0)).numpy()
    # Monte Carlo standard error here is about 0.005; 0.02 is four of them.
    np.testing.assert_allclose(exact, sampled, atol=0.02)


def test_crps_ignores_logit_shift_and_chunking() -> None:
    p = _mixture(5)
    y = torch.linspace(-3, 3, 5, dtype=torch.float64).reshape(-1, 1)
    shifted = MixtureParams(p.logits + 7.0, p.loc, p.scale)
    np.testing.assert_allclose(
        scores.crps_mixture(p, y), scores.crps_mixture(shifted, y, max_elements=9), rtol=1e-12
    )


def test_coverage_of_own_draws_matches_levels() -> None:
    torch.manual_seed(0)
    n = 4000
    p = _mixture(n)
    y = p.distribution().sample()
    levels = (0.5, 0.8, 0.9, 0.95)
    cov = scores.interval_coverage(p, y, levels)[:, 0]
    se = np.sqrt(np.array(levels) * (1 - np.array(levels)) / n)
    assert np.all(np.abs(cov - levels) < 4 * se)


def test_energy_score_reduces_to_crps_in_one_dimension() -> None:
    torch.manual_seed(0)
    p = _mixture(3)
    y = torch.tensor([[-2.0], [0.0], [4.0]], dtype=torch.float64)
    draws = p.distribution().sample((4000,))  # (S, n, 1)
    es = scores.energy_score(draws, y)
    assert es.shape == (3,)
    # With 4000 draws the standard error of the estimate is up to 0.03 (at y = 4).
    np.testing.assert_allclose(es, scores.crps_mixture(p, y)[:, 0], atol=0.1)


def test_nll_is_mean_negative_log_density() -> None:
    p = MixtureParams(torch.zeros(2, 1), torch.zeros(2, 1, 1), torch.ones(2, 1, 1))
    y = torch.zeros(2, 1)
    assert scores.negative_log_likelihood(p, y) == pytest.approx(0.5 * math.log(2 * math.pi))


def test_shape_checks() -> None:
    p = _mixture(3)
    with pytest.raises(ValueError, match=r"y must have shape \(3, 1\)"):
        scores.pit(p, torch.zeros(2, 1, dtype=torch.float64))
    pooled = MixtureParams(p.logits[None], p.loc[None], p.scale[None])
    with pytest.raises(ValueError, match="pool posterior draws"):
        scores.crps_mixture(pooled, torch.zeros(3, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="levels"):
        scores.interval_coverage(p, torch.zeros(3, 1, dtype=torch.float64), (0.5, 1.0))
    with pytest.raises(ValueError, match=r"\(S, n, d\)"):
        scores.energy_score(np.zeros((5, 3)), np.zeros((3, 1)))
