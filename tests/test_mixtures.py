import math

import pytest
import torch

from bayes_mdn import mixtures
from bayes_mdn.nets import MixtureParams


def random_params(n=4, k=3, d=1, full=False, batch=()):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*batch, n, k, generator=g, dtype=torch.float64)
    loc = 3 * torch.randn(*batch, n, k, d, generator=g, dtype=torch.float64)
    sd = 0.3 + torch.rand(*batch, n, k, d, generator=g, dtype=torch.float64)
    if full:
        tril = 0.3 * torch.randn(*batch, n, k, d, d, generator=g, dtype=torch.float64).tril(-1)
        return MixtureParams(logits, loc, tril + torch.diag_embed(sd))
    return MixtureParams(logits, loc, sd)


def test_cdf_matches_monte_carlo():
    p = random_params()
    y = torch.tensor([[0.5], [-1.0], [2.0], [0.0]], dtype=torch.float64)
    draws = mixtures.mixture_distribution(p).sample((200_000,))
    empirical = (draws <= y).double().mean(0)
    # 200k draws: the binomial standard error is below 0.0012, so 0.006 is ~5 sigma.
    torch.testing.assert_close(mixtures.marginal_cdf(p, y), empirical, atol=6e-3, rtol=0)


@pytest.mark.parametrize("full", [False, True])
def test_quantiles_invert_the_cdf(full):
    p = random_params(d=2, full=full)
    q = torch.tensor([0.01, 0.3, 0.5, 0.9, 0.999], dtype=torch.float64)
    quant = mixtures.marginal_quantiles(p, q)
    assert quant.shape == (5, 4, 2)
    cdf = torch.stack([mixtures.marginal_cdf(p, quant[i]) for i in range(5)])
    torch.testing.assert_close(cdf, q[:, None, None].expand_as(cdf), atol=1e-9, rtol=0)
    assert bool((quant.diff(dim=0) > 0).all())


@pytest.mark.parametrize("full", [False, True])
def test_moments_match_samples(full):
    p = random_params(n=2, d=2, full=full)
    draws = mixtures.mixture_distribution(p).sample((400_000,))
    torch.testing.assert_close(mixtures.mean(p), draws.mean(0), atol=0.03, rtol=0)
    centred = draws - draws.mean(0)
    emp_cov = torch.einsum("sni,snj->nij", centred, centred) / len(draws)
    torch.testing.assert_close(mixtures.covariance(p), emp_cov, atol=0.1, rtol=0.02)


def test_pool_draws_is_the_average_density():
    p = random_params(n=5, k=3, d=2, batch=(4,))
    y = torch.randn(5, 2, dtype=torch.float64)
    per_draw = mixtures.log_prob(p, y)  # (4, 5)
    expected = torch.logsumexp(per_draw, 0) - math.log(4)
    torch.testing.assert_close(mixtures.log_prob(mixtures.pool_draws(p), y), expected)


@pytest.mark.parametrize(
    ("full", "loc", "scale"),
    [(False, [10.0, -3.0], [100.0, 0.01]), (True, [1.0, 2.0], [3.0, 0.5])],
)
def test_affine_includes_the_jacobian(full, loc, scale):
    p = random_params(d=2, full=full)
    loc = torch.tensor(loc, dtype=torch.float64)
    scale = torch.tensor(scale, dtype=torch.float64)
    z = torch.randn(4, 2, dtype=torch.float64)
    moved = mixtures.affine(p, loc, scale)
    expected = mixtures.log_prob(p, z) - scale.log().sum()
    torch.testing.assert_close(mixtures.log_prob(moved, loc + scale * z), expected)


def test_modes_of_separated_components():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64))
    loc = torch.tensor([[[-6.0], [0.0], [6.0]]], dtype=torch.float64)
    p = MixtureParams(logits, loc, torch.ones(1, 3, 1, dtype=torch.float64))
    modes, dens = mixtures.modes(p)
    assert modes.shape == (1, 3, 1)
    assert torch.allclose(
        modes[0, :, 0], torch.tensor([0.0, 6.0, -6.0], dtype=torch.float64), atol=1e-3
    )
    assert bool((dens[0].diff() < 0).all())


def test_modes_merge_overlapping_components():
    logits = torch.zeros(1, 2, dtype=torch.float64)
    loc = torch.tensor([[[-0.2], [0.2]]], dtype=torch.float64)
    p = MixtureParams(logits, loc, torch.ones(1, 2, 1, dtype=torch.float64))
    modes, _ = mixtures.modes(p)
    assert torch.allclose(modes[0, 0], torch.zeros(1, dtype=torch.float64), atol=1e-4)
    assert torch.isnan(modes[0, 1]).all()
