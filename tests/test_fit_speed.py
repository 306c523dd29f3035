"""The fused MAP objective equals Trace_ELBO: same loss value and same gradients."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch import nn

from bayes_mdn._utils import pyro_scope
from bayes_mdn.fit import (
    FitConfig,
    MapLoss,
    MeanFieldLoss,
    _make_loss,
    fit_svi,
    fused_loss_applies,
)
from bayes_mdn.guides import make_guide
from bayes_mdn.model import MixtureDensityModel
from bayes_mdn.nets import MixtureDensityNetwork


def _problem(bayesian: str, covariance: str = "diagonal", d_y: int = 1):
    """A small float64 problem; ``bayesian="backbone"``: every layer latent, in front a
    user's backbone (evaluated through functional_call and vmap) with a prior function."""
    torch.manual_seed(0)
    x = torch.randn(40, 2, dtype=torch.float64)
    y = torch.randn(40, d_y, dtype=torch.float64) + x[:, :1]
    if bayesian == "backbone":
        bayesian = "all"
        backbone = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh())
        net = MixtureDensityNetwork(
            2, d_y, 3, hidden=(4,), backbone=backbone, n_features=5, prior_function=0.5
        ).double()
    else:
        net = MixtureDensityNetwork(2, d_y, 3, hidden=(8, 8), covariance=covariance).double()
    model = MixtureDensityModel(
        net,
        bayesian=bayesian,
        prior_scale=0.7,
        x_loc=x.mean(0),
        x_scale=x.std(0),
        y_loc=y.mean(0),
        y_scale=y.std(0),
    )
    return model, make_guide(model, "delta"), x, y


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
    model, guide, x, y = _problem(bayesian, covariance, d_y)
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
    model, guide, x, y = _problem("last")
    with pyro_scope():
        loss = MapLoss(model, guide)
        before = loss(x, y).item()
        for name in model.latent_names:
            getattr(model, model._prior_names[name]).mul_(0.1)
        assert loss(x, y).item() > before


def test_make_loss_picks_by_guide():
    model, guide, x, y = _problem("last")
    assert isinstance(_make_loss(model, guide, FitConfig()), MapLoss)
    normal = make_guide(model, "normal")
    assert not isinstance(_make_loss(model, normal, FitConfig()), MapLoss)
    with pytest.raises(TypeError, match="deterministic guide"):
        MapLoss(model, normal)


def test_fit_with_map_loss_matches_trace_elbo_fit(monkeypatch):
    # A short fit through the fused loss follows the Trace_ELBO fit step for step.
    import bayes_mdn.fit as fit_module

    config = FitConfig(epochs=3, batch_size=16, val_fraction=0.2, progress=False, device="cpu")
    model, guide, x, y = _problem("last")
    fit_svi(model, guide, x, y, config)
    fused_state = {k: v.clone() for k, v in guide.state_dict().items()}

    def trace_loss(model, guide, config):
        return Trace_ELBO(max_plate_nesting=1)(model, guide)

    monkeypatch.setattr(fit_module, "_make_loss", trace_loss)
    model, guide, x, y = _problem("last")
    fit_svi(model, guide, x, y, config)
    for key, value in guide.state_dict().items():
        torch.testing.assert_close(fused_state[key], value, rtol=1e-8, atol=1e-10)


def test_log_prior_matches_prior_distributions():
    model, guide, x, y = _problem("all")
    weights = {n: torch.randn(s, dtype=torch.float64) for n, s in model.latent_shapes.items()}
    expected = sum(model.prior(n).log_prob(w) for n, w in weights.items())
    torch.testing.assert_close(model.log_prior(weights), expected, rtol=1e-12, atol=1e-10)
    assert model.log_prior({}).item() == 0.0
    # Its hand-written gradient (one autograd node for every site) is the distributions'.
    leaves = {n: w.clone().requires_grad_() for n, w in weights.items()}
    fast = torch.autograd.grad(model.log_prior(leaves), list(leaves.values()))
    slow = torch.autograd.grad(
        sum(model.prior(n).log_prob(w) for n, w in leaves.items()), list(leaves.values())
    )
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda *ws: model.log_prior(dict(zip(leaves, ws))), tuple(leaves.values())
    )


def _normal_problem(bayesian: str, covariance: str = "diagonal", d_y: int = 1):
    model, _, x, y = _problem(bayesian, covariance, d_y)
    # A wide guide, so that the log q and prior terms carry real weight in the comparison.
    return model, make_guide(model, "normal", init_scale=0.3), x, y


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


def test_fit_with_mean_field_loss_matches_trace_elbo_fit(monkeypatch):
    # A seeded fit through the fused loss follows the Trace_ELBO fit step for step: same
    # draws, same gradients, same early-stopping choices.
    import bayes_mdn.fit as fit_module

    config = FitConfig(
        epochs=3, batch_size=16, val_fraction=0.2, num_particles=2, progress=False, device="cpu"
    )
    model, guide, x, y = _normal_problem("last")
    fit_svi(model, guide, x, y, config)
    fused_state = {k: v.clone() for k, v in guide.state_dict().items()}

    def trace_loss(model, guide, config):
        return Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1)(
            model, guide
        )

    monkeypatch.setattr(fit_module, "_make_loss", trace_loss)
    model, guide, x, y = _normal_problem("last")
    fit_svi(model, guide, x, y, config)
    assert fused_state.keys() == guide.state_dict().keys()
    for key, value in guide.state_dict().items():
        torch.testing.assert_close(fused_state[key], value, rtol=1e-8, atol=1e-10)


def test_make_loss_picks_mean_field_loss_for_autonormal_only():
    model, _, x, y = _problem("last")
    for config in (FitConfig(), FitConfig(jit=True)):
        assert isinstance(_make_loss(model, make_guide(model, "normal"), config), MeanFieldLoss)
    lowrank = _make_loss(model, make_guide(model, "lowrank"), FitConfig())
    assert not isinstance(lowrank, (MapLoss, MeanFieldLoss))
    with pytest.raises(TypeError, match="AutoNormal"):
        MeanFieldLoss(model, make_guide(model, "delta"))
    with pytest.raises(ValueError, match="num_particles"):
        MeanFieldLoss(model, make_guide(model, "normal"), 0)


def test_jit_with_a_lowrank_guide_is_refused_before_fitting():
    # Pyro 1.9's JitTrace_ELBO looks parameters up in the global param store, which
    # module-local parameters never fill: it failed with a KeyError on the first step.
    model, _, x, y = _problem("last")
    guide = make_guide(model, "lowrank")
    config = FitConfig(epochs=1, jit=True, progress=False, device="cpu")
    with pytest.raises(ValueError, match="jit=True does not work with the AutoLowRank"):
        fit_svi(model, guide, x, y, config)


def test_log_prior_with_batch_dims():
    model, _, x, y = _problem("all")
    weights = {n: torch.randn(4, *s, dtype=torch.float64) for n, s in model.latent_shapes.items()}
    expected = sum(model.prior(n).log_prob(w) for n, w in weights.items())
    assert expected.shape == (4,)
    torch.testing.assert_close(model.log_prior(weights), expected, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("guide_name", ["delta", "normal"])
def test_constrained_params_read_what_pyro_reads(guide_name):
    # The cached reader returns the values PyroModule.__getattr__ returns, and keeps
    # returning the current values after an optimizer step and a load_state_dict.
    import operator

    from bayes_mdn.fit import _ConstrainedParams

    model, _, x, y = _problem("all")
    guide = make_guide(model, guide_name, init_scale=0.3)
    with pyro_scope():
        loss = _make_loss(model, guide, FitConfig())
        loss(x, y)
        modules = [guide] if guide_name == "delta" else [guide.locs, guide.scales]
        readers = [_ConstrainedParams(m, model.latent_names) for m in modules]
        saved = {k: v.clone() for k, v in loss.state_dict().items()}
        optimizer = torch.optim.SGD(loss.parameters(), lr=0.1)
        loss(x, y).backward()
        optimizer.step()
        for _ in range(2):
            for module, reader in zip(modules, readers):
                values = reader()
                assert list(values) == model.latent_names
                for name, value in values.items():
                    torch.testing.assert_close(value, operator.attrgetter(name)(module))
            loss.load_state_dict(saved)


def test_log_prior_follows_changed_prior_scales():
    # The cached prior constants follow in-place changes of the buffers, dtype and device
    # moves: the value always equals the prior distributions'.
    model, guide, x, y = _problem("last")
    weights = {n: torch.randn(s, dtype=torch.float64) for n, s in model.latent_shapes.items()}

    def expected():
        return sum(model.prior(n).log_prob(w.to(model.prior_scale)) for n, w in weights.items())

    first = model.log_prior(weights)
    torch.testing.assert_close(first, expected())
    for name in model.latent_names:
        getattr(model, model._prior_names[name]).mul_(0.5)
    torch.testing.assert_close(model.log_prior(weights), expected())
    assert model.log_prior(weights) != first
    model.float()
    value = model.log_prior({n: w.float() for n, w in weights.items()})
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, expected().float())


class _WithHyperprior(MixtureDensityModel):
    """The built-in model plus one more latent site, which a factor pulls towards 3."""

    def forward(self, x, y=None, *, subsample=None, n_total=None):
        extra = pyro.sample("extra", dist.Normal(x.new_zeros(()), 1.0))
        pyro.factor("pull", -50.0 * (extra - 3.0) ** 2)
        return super().forward(x, y, subsample=subsample, n_total=n_total)


def test_a_model_with_more_sites_trains_through_trace_elbo():
    built_in, _, x, y = _problem("last")
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
    loss = _make_loss(model, guide, FitConfig())
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
