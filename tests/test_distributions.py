import math

import pytest
import torch
from pyro.distributions import (
    Categorical,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
)

from bayes_mdn import mixtures
from bayes_mdn.distributions import GaussianMixture, MixtureParams


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
    draws = p.distribution().sample((200_000,))
    empirical = (draws <= y).double().mean(0)
    # 200k draws: the binomial standard error is below 0.0012, so 0.006 is ~5 sigma.
    torch.testing.assert_close(p.distribution().cdf(y), empirical, atol=6e-3, rtol=0)


@pytest.mark.parametrize("full", [False, True])
def test_quantiles_invert_the_cdf(full):
    p = random_params(d=2, full=full)
    q = torch.tensor([0.01, 0.3, 0.5, 0.9, 0.999], dtype=torch.float64)
    quant = p.distribution().quantiles(q)
    assert quant.shape == (5, 4, 2)
    cdf = torch.stack([p.distribution().cdf(quant[i]) for i in range(5)])
    torch.testing.assert_close(cdf, q[:, None, None].expand_as(cdf), atol=1e-9, rtol=0)
    assert bool((quant.diff(dim=0) > 0).all())


@pytest.mark.parametrize("full", [False, True])
def test_moments_match_samples(full):
    p = random_params(n=2, d=2, full=full)
    draws = p.distribution().sample((400_000,))
    torch.testing.assert_close(p.distribution().mean, draws.mean(0), atol=0.03, rtol=0)
    centred = draws - draws.mean(0)
    emp_cov = torch.einsum("sni,snj->nij", centred, centred) / len(draws)
    torch.testing.assert_close(p.distribution().covariance_matrix, emp_cov, atol=0.1, rtol=0.02)


def test_pool_draws_is_the_average_density():
    p = random_params(n=5, k=3, d=2, batch=(4,))
    y = torch.randn(5, 2, dtype=torch.float64)
    per_draw = p.distribution().log_prob(y)  # (4, 5)
    expected = torch.logsumexp(per_draw, 0) - math.log(4)
    pooled = p.distribution().pool()
    assert pooled.batch_shape == (5,) and pooled.n_components == 12
    torch.testing.assert_close(pooled.log_prob(y), expected)


@pytest.mark.parametrize(
    ("full", "loc", "scale"),
    [(False, [10.0, -3.0], [100.0, 0.01]), (True, [1.0, 2.0], [3.0, 0.5])],
)
def test_affine_includes_the_jacobian(full, loc, scale):
    p = random_params(d=2, full=full)
    loc = torch.tensor(loc, dtype=torch.float64)
    scale = torch.tensor(scale, dtype=torch.float64)
    z = torch.randn(4, 2, dtype=torch.float64)
    moved = p.distribution().affine(loc, scale)
    expected = p.distribution().log_prob(z) - scale.log().sum()
    torch.testing.assert_close(moved.log_prob(loc + scale * z), expected)


def test_modes_of_separated_components():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64))
    loc = torch.tensor([[[-6.0], [0.0], [6.0]]], dtype=torch.float64)
    p = MixtureParams(logits, loc, torch.ones(1, 3, 1, dtype=torch.float64))
    modes, dens = p.distribution().modes()
    assert modes.shape == (1, 3, 1)
    assert torch.allclose(
        modes[0, :, 0], torch.tensor([0.0, 6.0, -6.0], dtype=torch.float64), atol=1e-3
    )
    assert bool((dens[0].diff() < 0).all())


def test_modes_merge_overlapping_components():
    logits = torch.zeros(1, 2, dtype=torch.float64)
    loc = torch.tensor([[[-0.2], [0.2]]], dtype=torch.float64)
    p = MixtureParams(logits, loc, torch.ones(1, 2, 1, dtype=torch.float64))
    modes, _ = p.distribution().modes()
    assert torch.allclose(modes[0, 0], torch.zeros(1, dtype=torch.float64), atol=1e-4)
    assert torch.isnan(modes[0, 1]).all()


def reference(p: MixtureParams) -> MixtureSameFamily:
    """The same mixture built from torch's own distributions."""
    if p.covariance == "full":
        comp = MultivariateNormal(p.loc, scale_tril=p.scale)
    else:
        comp = Independent(Normal(p.loc, p.scale), 1)
    return MixtureSameFamily(Categorical(logits=p.logits), comp)


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("d", [1, 3])
def test_log_prob_and_gradients_match_torch_mixture(full, d):
    p = random_params(n=6, k=4, d=d, full=full, batch=(2,))
    p = p.map(lambda t: t.clone().requires_grad_())
    y = torch.randn(6, d, dtype=torch.float64)
    ours = p.distribution().log_prob(y)
    theirs = reference(p).log_prob(y)
    assert ours.shape == (2, 6)
    torch.testing.assert_close(ours, theirs)
    grads = torch.autograd.grad(ours.sum(), [p.logits, p.loc, p.scale])
    ref_grads = torch.autograd.grad(theirs.sum(), [p.logits, p.loc, p.scale])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    with torch.no_grad():  # the in-place evaluation path
        torch.testing.assert_close(p.distribution().log_prob(y), theirs.detach())


def test_component_log_prob_is_each_gaussian():
    p = random_params(n=5, k=3, d=2)
    y = torch.randn(5, 2, dtype=torch.float64)
    expected = Independent(Normal(p.loc, p.scale), 1).log_prob(y.unsqueeze(-2))
    torch.testing.assert_close(p.distribution().component_log_prob(y), expected)


def test_strided_views_give_the_same_numbers():
    """The network hands the mixture permuted views of a (draws, outputs, rows) tensor."""
    g = torch.Generator().manual_seed(3)
    s, k, d, n = 3, 4, 2, 7
    logits_t = torch.randn(s, k, n, generator=g, dtype=torch.float64)
    loc_t = torch.randn(s, k, d, n, generator=g, dtype=torch.float64)
    scale_t = 0.5 + torch.rand(s, k, d, n, generator=g, dtype=torch.float64)
    strided = GaussianMixture(logits_t.mT, loc_t.permute(0, 3, 1, 2), scale_t.permute(0, 3, 1, 2))
    dense = GaussianMixture(
        logits_t.mT.contiguous(),
        loc_t.permute(0, 3, 1, 2).contiguous(),
        scale_t.permute(0, 3, 1, 2).contiguous(),
    )
    y = torch.randn(n, d, generator=g, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(strided.log_prob(y), dense.log_prob(y))
    torch.testing.assert_close(strided.cdf(y), dense.cdf(y))
    torch.testing.assert_close(strided.mean, dense.mean)
    torch.manual_seed(0)
    a = strided.sample((2,))
    torch.manual_seed(0)
    torch.testing.assert_close(a, dense.sample((2,)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_prob_with_far_components_matches_torch(dtype):
    """Components hundreds of standard deviations from y: the log-sum-exp floors their
    exponentials (a CPU slow path), which must not show in values or gradients."""
    g = torch.Generator().manual_seed(5)
    n, k = 64, 6
    logits = torch.randn(n, k, generator=g, dtype=dtype).requires_grad_()
    spread = 200.0 if dtype == torch.float64 else 10.0
    loc = (torch.randn(n, k, 1, generator=g, dtype=dtype) * spread).requires_grad_()
    scale = (0.2 + torch.rand(n, k, 1, generator=g, dtype=dtype)).requires_grad_()
    y = torch.randn(n, 1, generator=g, dtype=dtype)
    ours = GaussianMixture(logits, loc, scale).log_prob(y)
    theirs = MixtureSameFamily(
        Categorical(logits=logits), Independent(Normal(loc, scale), 1)
    ).log_prob(y)
    # The arguments really reach the floor: some component is below exp(-80) of the best.
    log_comp = Independent(Normal(loc, scale), 1).log_prob(y.unsqueeze(-2))
    gap = log_comp.amax(-1, keepdim=True) - log_comp
    assert (gap > (800 if dtype == torch.float64 else 100)).any()
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(
        torch.autograd.grad(ours.sum(), [logits, loc, scale]),
        torch.autograd.grad(theirs.sum(), [logits, loc, scale]),
    ):
        # float32: log densities of -1e3 and below carry rounding errors of 1e-4 that
        # the two formulas turn into different gradient roundings.
        tol = {} if dtype == torch.float64 else {"rtol": 1e-3, "atol": 1e-4}
        torch.testing.assert_close(a, b, **tol)


def test_log_sum_exp_keeps_non_finite_rows():
    from bayes_mdn.distributions import _logsumexp

    t = torch.randn(5, 4, dtype=torch.float64) * 300
    t[0] = -math.inf
    t[1, 2] = math.inf
    t[2, 1] = math.nan
    t[3, :3] = -math.inf
    torch.testing.assert_close(_logsumexp(t), torch.logsumexp(t, -1), equal_nan=True)


def test_the_scales_of_both_network_layouts_agree():
    """split() copies the strided scale block of raw()'s layout before the softplus
    (a slow path on the view) and leaves head_by_rows' layout alone."""
    from bayes_mdn.nets import MixtureDensityNetwork

    torch.manual_seed(0)
    net = MixtureDensityNetwork(2, 2, n_components=3, hidden=(8,)).double()
    x = torch.randn(10, 2, dtype=torch.float64)
    by_rows = net.split(next(net.head_by_rows(x))[1].mT)
    plain = net.split(net.raw(x))
    torch.testing.assert_close(by_rows.scale[0], plain.scale)
    torch.testing.assert_close(by_rows.loc[0], plain.loc)


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_sample_matches_torch_mixture_in_distribution(full, k):
    p = random_params(n=2, k=k, d=2, full=full)
    torch.manual_seed(0)
    ours = p.distribution().sample((200_000,))
    assert ours.shape == (200_000, 2, 2)
    theirs = reference(p).sample((200_000,))
    # Means of 200k draws of sd below 6: standard error below 0.014, so 0.06 is > 4 sigma.
    torch.testing.assert_close(ours.mean(0), theirs.mean(0), atol=0.06, rtol=0)
    # Marginal CDFs at a few points: binomial standard error below 0.0012 per side.
    for t in (-2.0, 0.0, 2.0):
        torch.testing.assert_close(
            (ours <= t).double().mean(0), (theirs <= t).double().mean(0), atol=6e-3, rtol=0
        )


def test_draw_components_follows_the_weights():
    logits = torch.log(torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64))
    torch.manual_seed(0)
    c = GaussianMixture.draw_components(logits, (100_000,))
    freq = torch.bincount(c, minlength=3).double() / len(c)
    # Binomial standard error below 0.0016: 0.008 is 5 sigma.
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.6, 0.3]).double(), atol=8e-3, rtol=0)
    assert GaussianMixture.draw_components(logits[:1], (5,)).eq(0).all()


@pytest.mark.parametrize("full", [False, True])
def test_variance_is_the_covariance_diagonal(full):
    mix = random_params(d=3, full=full).distribution()
    torch.testing.assert_close(mix.variance, mix.covariance_matrix.diagonal(dim1=-2, dim2=-1))
    assert mix.covariance_matrix.shape == (4, 3, 3)


def test_expand_and_shapes():
    mix = random_params(n=4, k=3, d=2, full=True).distribution()
    assert mix.batch_shape == (4,) and mix.event_shape == (2,)
    assert mix.covariance_type == "full" and mix.n_components == 3
    big = mix.expand((5, 4))
    assert big.batch_shape == (5, 4)
    y = torch.randn(4, 2, dtype=torch.float64)
    torch.testing.assert_close(big.log_prob(y)[3], mix.log_prob(y))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="needs loc"):
        GaussianMixture(torch.zeros(2, 3), torch.zeros(2, 4, 1), torch.ones(2, 4, 1))
    with pytest.raises(ValueError, match="needs loc"):
        GaussianMixture(torch.zeros(2, 3), torch.zeros(2, 3, 2), torch.ones(2, 3, 1))
    with pytest.raises(ValueError, match="logits must have shape"):
        GaussianMixture(torch.zeros(()), torch.zeros(3, 1), torch.ones(3, 1))
    with pytest.raises(ValueError, match="pool posterior draws first"):
        random_params(batch=(2,)).distribution().modes()


def test_the_old_mixture_functions_warn_and_agree():
    p = random_params(d=2)
    y = torch.randn(4, 2, dtype=torch.float64)
    with pytest.warns(DeprecationWarning, match="GaussianMixture.cdf"):
        old = mixtures.marginal_cdf(p, y)
    torch.testing.assert_close(old, p.distribution().cdf(y))
    with pytest.warns(DeprecationWarning):
        torch.testing.assert_close(mixtures.log_prob(p, y), p.distribution().log_prob(y))
