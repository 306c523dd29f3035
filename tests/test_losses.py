"""The fused losses equal Trace_ELBO: same loss values, same gradients, same draws; the
loss factory picks them exactly where they apply."""

import operator

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.constraints import positive, real
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from bayes_mdn._utils import pyro_scope
from bayes_mdn.config import FitConfig
from bayes_mdn.fit import fit_svi
from bayes_mdn.guides import make_guide
from bayes_mdn.losses import (
    MapLoss,
    MeanFieldLoss,
    _ConstrainedParams,
    fused_loss_applies,
    make_loss,
)
from bayes_mdn.model import MixtureDensityModel
from tests.helpers import float64_problem, model_and_guide, small_data


def _normal_problem(bayesian, covariance="diagonal", d_y=1):
    # A wide guide, so that the log q and prior terms carry real weight in the comparison.
    return float64_problem(bayesian, covariance, d_y, guide="normal", init_scale=0.3)


@pytest.mark.parametrize(
    ("bayesian", "covariance", "d_y"),
    [
        ("none", "diagonal", 1),
        ("last", "diagonal", 1),
        ("all", "diagonal", 1),
        ("all", "full", 2),
        ("backbone", "diagonal", 1),
    ],
)
@pytest.mark.parametrize("subsampled", [False, True])
def test_map_loss_matches_trace_elbo(bayesian, covariance, d_y, subsampled):
    model, guide, x, y = float64_problem(bayesian, covariance, d_y)
    idx = torch.arange(5, 17)
    kwargs = {"subsample": idx, "n_total": 40} if subsampled else {}
    xb, yb = (x[idx], y[idx]) if subsampled else (x, y)
    with pyro_scope():
        fused = MapLoss(model, guide)
        value = fused(xb, yb, **kwargs)
        reference = Trace_ELBO(max_plate_nesting=1)(model, guide)
        expected = reference(xb, yb, **kwargs)
    params = [p for p in reference.parameters() if p.requires_grad]
    assert [id(p) for p in fused.parameters() if p.requires_grad] == [id(p) for p in params]
    assert fused.state_dict().keys() == reference.state_dict().keys()
    grads = torch.autograd.grad(value, params)
    expected_grads = torch.autograd.grad(expected, params)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-9)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_map_loss_includes_prior():
    # The prior term is what separates MAP from maximum likelihood: a smaller prior scale
    # must raise the loss of the same weights.
    model, guide, x, y = float64_problem("last")
    with pyro_scope():
        loss = MapLoss(model, guide)
        before = loss(x, y).item()
        for name in model.latent_names:
            getattr(model, model._prior_names[name]).mul_(0.1)
        assert loss(x, y).item() > before


def testmake_loss_picks_by_guide():
    model, guide, x, y = float64_problem("last")
    assert isinstance(make_loss(model, guide, FitConfig()), MapLoss)
    normal = make_guide(model, "normal")
    assert not isinstance(make_loss(model, normal, FitConfig()), MapLoss)
    with pytest.raises(TypeError, match="deterministic guide"):
        MapLoss(model, normal)


@pytest.mark.parametrize(
    ("bayesian", "covariance", "d_y"),
    [
        ("last", "diagonal", 1),
        ("all", "diagonal", 1),
        ("all", "full", 2),
        ("backbone", "diagonal", 1),
    ],
)
@pytest.mark.parametrize("subsampled", [False, True])
@pytest.mark.parametrize("particles", [1, 3])
def test_mean_field_loss_matches_trace_elbo(bayesian, covariance, d_y, subsampled, particles):
    # Same seed, same standard normals: the fused loss and Trace_ELBO agree on the value and
    # on every gradient, on two consecutive calls.
    model, guide, x, y = _normal_problem(bayesian, covariance, d_y)
    idx = torch.arange(5, 17)
    kwargs = {"subsample": idx, "n_total": 40} if subsampled else {}
    xb, yb = (x[idx], y[idx]) if subsampled else (x, y)
    elbo = Trace_ELBO(
        num_particles=particles, vectorize_particles=particles > 1, max_plate_nesting=1
    )
    with pyro_scope():
        fused = MeanFieldLoss(model, guide, particles)
        reference = elbo(model, guide)
        for call in range(2):
            torch.manual_seed(10 + call)
            value = fused(xb, yb, **kwargs)
            torch.manual_seed(10 + call)
            expected = reference(xb, yb, **kwargs)
            params = [p for p in reference.parameters() if p.requires_grad]
            grads = torch.autograd.grad(value, params)
            expected_grads = torch.autograd.grad(expected, params)
            torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-10)
            for got, want in zip(grads, expected_grads):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert [id(p) for p in fused.parameters() if p.requires_grad] == [id(p) for p in params]
    assert fused.state_dict().keys() == reference.state_dict().keys()


def test_mean_field_loss_is_stochastic_and_unbiased():
    # Different seeds give different estimates (the draws are real), and their mean over
    # many draws matches the mean of Trace_ELBO's estimates on other seeds: both estimate
    # the same negative ELBO. Tolerance: 5 standard errors of the difference of the means.
    model, guide, x, y = _normal_problem("all")
    with pyro_scope():
        fused = MeanFieldLoss(model, guide)
        reference = Trace_ELBO(max_plate_nesting=1)(model, guide)
        with torch.no_grad():
            torch.manual_seed(0)
            ours = torch.stack([fused(x, y) for _ in range(400)])
            torch.manual_seed(12345)
            theirs = torch.stack([reference(x, y) for _ in range(400)])
    assert ours.std() > 0
    se = (ours.var() / len(ours) + theirs.var() / len(theirs)).sqrt()
    assert abs(ours.mean() - theirs.mean()) < 5 * se


def testmake_loss_picks_mean_field_loss_for_autonormal_only():
    model, _, x, y = float64_problem("last")
    assert isinstance(make_loss(model, make_guide(model, "normal"), FitConfig()), MeanFieldLoss)
    lowrank = make_loss(model, make_guide(model, "lowrank"), FitConfig())
    assert not isinstance(lowrank, (MapLoss, MeanFieldLoss))
    with pytest.raises(TypeError, match="AutoNormal"):
        MeanFieldLoss(model, make_guide(model, "delta"))
    with pytest.raises(ValueError, match="num_particles"):
        MeanFieldLoss(model, make_guide(model, "normal"), 0)


def _readers(model, guide):
    """(module, reader) for each PyroModule of the guide, with the constraints the fused
    losses give its values."""
    names = model.latent_names
    if isinstance(guide, AutoNormal):
        return [
            (guide.locs, _ConstrainedParams(guide.locs, names, dict.fromkeys(names, real))),
            (
                guide.scales,
                _ConstrainedParams(
                    guide.scales, names, dict.fromkeys(names, guide.scale_constraint)
                ),
            ),
        ]
    supports = {name: model.prior(name).support for name in names}
    return [(guide, _ConstrainedParams(guide, names, supports))]


@pytest.mark.parametrize("guide_name", ["delta", "normal"])
def test_constrained_params_read_what_pyro_reads(guide_name):
    # The cached reader returns the values PyroModule.__getattr__ returns, from the very
    # parameters the loss trains, and keeps returning the current values after an
    # optimizer step and a load_state_dict.
    model, _, x, y = float64_problem("all")
    guide = make_guide(model, guide_name, init_scale=0.3)
    with pyro_scope():
        loss = make_loss(model, guide, FitConfig())
        loss(x, y)
        readers = _readers(model, guide)
        trained = {id(p) for p in loss.parameters()}
        assert all(id(p) in trained for _, r in readers for _, p, _ in r.entries)
        saved = {k: v.clone() for k, v in loss.state_dict().items()}
        optimizer = torch.optim.SGD(loss.parameters(), lr=0.1)
        loss(x, y).backward()
        optimizer.step()
        for _ in range(2):
            for module, reader in readers:
                values = reader()
                assert list(values) == model.latent_names
                for name, value in values.items():
                    torch.testing.assert_close(value, operator.attrgetter(name)(module))
            loss.load_state_dict(saved)


def test_constrained_params_refuse_a_constraint_the_guide_does_not_use():
    # AutoNormal's scales are softplus of their parameters: read as exp of them, every
    # value would be wrong, and the reader says so when built instead.
    model, guide, x, y = _normal_problem("last")
    names = model.latent_names
    with pyro_scope():
        MeanFieldLoss(model, guide)(x, y)
        with pytest.raises(RuntimeError, match="constrains it otherwise"):
            _ConstrainedParams(guide.scales, names, dict.fromkeys(names, positive))


@pytest.mark.parametrize("particles", [1, 3])
def test_mean_field_loss_first_call_draws_as_trace_elbo(particles):
    # On a fresh guide, the first call creates the guide's parameters and then draws
    # exactly what Trace_ELBO's first call draws: same value, same random state after.
    elbo = Trace_ELBO(
        num_particles=particles, vectorize_particles=particles > 1, max_plate_nesting=1
    )
    results = []
    for fused in (True, False):
        model, guide, x, y = _normal_problem("last")
        with pyro_scope():
            loss = MeanFieldLoss(model, guide, particles) if fused else elbo(model, guide)
            torch.manual_seed(3)
            idx = torch.arange(5, 17)
            value = loss(x[idx], y[idx], subsample=idx, n_total=40)
            results.append((value.detach(), torch.get_rng_state(), guide.state_dict()))
    (fused_value, fused_rng, fused_state), (value, rng, state) = results
    torch.testing.assert_close(fused_value, value, rtol=1e-12, atol=1e-10)
    assert torch.equal(fused_rng, rng)
    assert fused_state.keys() == state.keys()
    assert all(torch.equal(fused_state[k], state[k]) for k in state)


class _WithHyperprior(MixtureDensityModel):
    """The built-in model plus one more latent site, which a factor pulls towards 3."""

    def forward(self, x, y=None, *, subsample=None, n_total=None):
        extra = pyro.sample("extra", dist.Normal(x.new_zeros(()), 1.0))
        pyro.factor("pull", -50.0 * (extra - 3.0) ** 2)
        return super().forward(x, y, subsample=subsample, n_total=n_total)


def test_a_model_with_more_sites_trains_through_trace_elbo():
    built_in, _, x, y = float64_problem("last")
    model = _WithHyperprior(
        built_in.net,
        bayesian="last",
        prior_scale=0.7,
        x_loc=x.mean(0),
        x_scale=x.std(0),
        y_loc=y.mean(0),
        y_scale=y.std(0),
    )
    guide = make_guide(model, "normal")
    assert not fused_loss_applies(model, guide)
    assert fused_loss_applies(built_in, make_guide(built_in, "normal"))
    loss = make_loss(model, guide, FitConfig())
    assert not isinstance(loss, (MapLoss, MeanFieldLoss))
    config = FitConfig(
        epochs=400,
        batch_size=40,
        lr=0.05,
        lr_schedule="constant",
        val_fraction=0.0,
        progress=False,
        device="cpu",
    )
    fit_svi(model, guide, x, y, config)
    # Prior N(0, 1) times the factor's N(3, 1/100): posterior N(300/101, 1/101), sd 0.0995.
    # A loss that left the site out would leave its location at the initial draw, in
    # (-2, 2); 0.2 is two posterior sds, far wider than Adam's jitter at lr 0.05.
    loc = float(guide.locs.extra.detach())
    assert abs(loc - 300 / 101) < 0.2, loc


@pytest.mark.parametrize("guide_name", ["delta", "normal"])
def test_a_first_call_outside_pyro_scope_keeps_each_guide_its_own_parameters(guide_name):
    # Members' guides name their parameters alike. A first call outside pyro_scope once
    # ran AutoDelta against Pyro's global param store, where the second guide took the
    # first one's parameters: a streamed ensemble then held its last member M times.
    x, y = small_data(8)
    guides = []
    for _ in range(2):
        model, guide = model_and_guide("last", guide_name)
        make_loss(model, guide, FitConfig())(x, y)
        guides.append(guide)
    first, second = ({id(p) for p in guide.parameters()} for guide in guides)
    assert first and not first & second
    assert not list(pyro.get_param_store().keys())
