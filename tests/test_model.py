import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.poutine.util import prune_subsample_sites

from bayes_mdn._utils import pyro_scope
from bayes_mdn.model import OBS_SITE
from tests.helpers import model_and_guide, small_data, small_model


@pytest.mark.parametrize(
    ("bayesian", "sites"),
    [
        ("none", []),
        ("last", ["head.weight", "head.bias"]),
        ("all", ["hidden.0.weight", "hidden.0.bias", "head.weight", "head.bias"]),
    ],
)
def test_latent_sites_follow_the_bayesian_option(bayesian, sites):
    model = small_model(bayesian)
    x, y = small_data(10)
    trace = prune_subsample_sites(poutine.trace(model).get_trace(x, y))
    latent = [n for n, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]]
    assert latent == sites
    assert trace.nodes[OBS_SITE]["is_observed"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not trainable & set(sites)


def test_prior_scales_follow_fan_in():
    model = small_model("all", hidden=(16,))
    assert model.prior("hidden.0.weight").base_dist.scale.unique().item() == pytest.approx(1.0)
    assert model.prior("head.weight").base_dist.scale.unique().item() == pytest.approx(0.25)
    assert model.prior("head.bias").base_dist.scale.unique().item() == pytest.approx(1.0)


def test_buffers_move_with_the_module():
    model = small_model("last").double()
    assert model.prior("head.weight").base_dist.scale.dtype == torch.float64
    assert model.y_scale.dtype == torch.float64


def test_subsampled_likelihood_is_scaled_to_the_full_data():
    """Mini-batch log-likelihoods, scaled by n / b, average to the full-data value."""
    model = small_model("none")
    x, y = small_data(12)

    def log_lik(idx, n_total):
        trace = poutine.trace(model).get_trace(x[idx], y[idx], subsample=idx, n_total=n_total)
        trace.compute_log_prob()
        return trace.nodes[OBS_SITE]["log_prob_sum"]

    full = log_lik(torch.arange(12), 12)
    batches = [torch.arange(i, i + 3) for i in range(0, 12, 3)]
    scaled = [log_lik(idx, 12) for idx in batches]
    unscaled = [model.log_predictive_density(x[idx], y[idx]).sum() for idx in batches]
    for s, u in zip(scaled, unscaled):
        torch.testing.assert_close(s, 4 * u)
    torch.testing.assert_close(torch.stack(scaled).mean(), full)


@pytest.mark.parametrize("guide", ["delta", "normal", "lowrank"])
def test_subsampled_elbo_is_unbiased(guide):
    """The expected mini-batch ELBO over all batches equals the full-data ELBO."""
    model, g = model_and_guide("last", guide)
    x, y = small_data(12)
    with pyro_scope():
        loss = Trace_ELBO(num_particles=1)(model, g)
        loss(x, y)
        pyro.set_rng_seed(1)
        full = loss(x, y)
        batch_losses = []
        for i in range(0, 12, 4):
            idx = torch.arange(i, i + 4)
            pyro.set_rng_seed(1)
            batch_losses.append(loss(x[idx], y[idx], subsample=idx, n_total=12))
    torch.testing.assert_close(torch.stack(batch_losses).mean(), full)


def test_vectorized_particles_match_the_batch_convention():
    model, g = model_and_guide("all", "normal")
    x, y = small_data(10)
    with pyro_scope():
        elbo = Trace_ELBO(num_particles=5, vectorize_particles=True, max_plate_nesting=1)
        loss = elbo(model, g)
        value = loss(x, y)
        value.backward()
    assert torch.isfinite(value)


def test_mixture_is_in_the_units_of_y():
    model = small_model("none")
    model.y_loc.fill_(100.0)
    model.y_scale.fill_(10.0)
    x = torch.zeros(3, 1)
    params = model.mixture(x)
    z = model.net(x)
    torch.testing.assert_close(params.loc, 100 + 10 * z.loc)
    torch.testing.assert_close(params.scale, 10 * z.scale)


def test_bad_options():
    with pytest.raises(ValueError, match="bayesian"):
        small_model("some")


@pytest.mark.parametrize(("covariance", "d_y"), [("diagonal", 1), ("diagonal", 2), ("full", 2)])
def test_log_density_and_chunked_predictive_density(covariance, d_y):
    # The direct density equals the distribution's, per draw; chunking changes nothing.
    model = small_model("last", d_x=2, d_y=d_y, covariance=covariance)
    model.y_loc.fill_(0.3)
    model.y_scale.fill_(2.0)
    x, y = torch.randn(13, 2), torch.randn(13, d_y)
    weights = {n: 0.3 * torch.randn(5, *s) for n, s in model.latent_shapes.items()}
    per_draw = model.log_density(x, y, weights)
    assert per_draw.shape == (5, 13)
    expected = model.mixture(x, weights).distribution().log_prob(y)
    torch.testing.assert_close(per_draw, expected, rtol=1e-5, atol=1e-5)
    whole = model.log_predictive_density(x, y, weights)
    torch.testing.assert_close(whole, torch.logsumexp(expected, 0) - torch.log(torch.tensor(5.0)))
    chunked = model.log_predictive_density(x, y, weights, max_elements=1)
    torch.testing.assert_close(chunked, whole)


@pytest.mark.parametrize("batched", [False, True])
def test_observed_site_is_the_mixture(batched):
    # The likelihood the model hands Pyro computes lazily, but its log density is the
    # mixture's, its shapes follow Pyro's plates, and its draws come from the mixture.
    model = small_model("last", d_x=2, d_y=1).double()
    model.y_loc.fill_(0.3)
    model.y_scale.fill_(2.0)
    x, y = torch.randn(4, 2).double(), torch.randn(4, 1).double()
    shape = (3, 2, 6) if batched else (2, 6)
    weights = {
        n: 0.5 * torch.randn(*shape[:-2], *s).double() for n, s in model.latent_shapes.items()
    }
    trace = poutine.trace(poutine.condition(model, weights)).get_trace(x, y)
    site = trace.nodes[OBS_SITE]["fn"]
    assert site.batch_shape == ((3, 4) if batched else (4,))
    expected = model.mixture(x, weights).distribution().log_prob(y)
    torch.testing.assert_close(site.log_prob(y), expected)
    # Expanded to independent draws (what Predictive's vectorizing plate does), sampled.
    wide = site.expand((5_000, 4) if not batched else (5_000, 3, 4))
    draws = wide.sample()
    assert draws.shape == ((5_000, 4, 1) if not batched else (5_000, 3, 4, 1))
    with torch.no_grad():
        pit = model.mixture(x, weights).distribution().cdf(draws).sort(0).values
    grid = torch.linspace(0, 1, 5_001, dtype=torch.float64)[1:].reshape(-1, *[1] * (pit.dim() - 1))
    assert float((pit - grid).abs().amax()) < 0.04  # KS distance; 0.024 is the 1% critical value
    with pytest.raises(ValueError, match="expand"):
        site.expand((7,))
