"""Fits through the fused losses follow the Trace_ELBO fits step for step, and compiled
steps the eager ones; the model's hand-written log prior equals its prior distributions'."""

import shutil
import sys

import numpy as np
import pytest
import torch
from pyro.infer import Trace_ELBO

from bayes_mdn import BayesianMDN, make_inverse_sine
from bayes_mdn.config import COMPILE_STEPS, FitConfig, cxx_available
from bayes_mdn.fit import fit_svi
from bayes_mdn.guides import make_guide
from tests.helpers import float64_problem


def _normal_problem(bayesian, covariance="diagonal", d_y=1):
    # A wide guide, so that the log q and prior terms carry real weight in the comparison.
    return float64_problem(bayesian, covariance, d_y, guide="normal", init_scale=0.3)


def test_fit_with_map_loss_matches_trace_elbo_fit(monkeypatch):
    # A short fit through the fused loss follows the Trace_ELBO fit step for step.
    import bayes_mdn.fit as fit_module

    config = FitConfig(epochs=3, batch_size=16, val_fraction=0.2, progress=False, device="cpu")
    model, guide, x, y = float64_problem("last")
    fit_svi(model, guide, x, y, config)
    fused_state = {k: v.clone() for k, v in guide.state_dict().items()}

    def trace_loss(model, guide, config):
        return Trace_ELBO(max_plate_nesting=1)(model, guide)

    monkeypatch.setattr(fit_module, "make_loss", trace_loss)
    model, guide, x, y = float64_problem("last")
    fit_svi(model, guide, x, y, config)
    for key, value in guide.state_dict().items():
        torch.testing.assert_close(fused_state[key], value, rtol=1e-8, atol=1e-10)


def test_log_prior_matches_prior_distributions():
    model, guide, x, y = float64_problem("all")
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

    monkeypatch.setattr(fit_module, "make_loss", trace_loss)
    model, guide, x, y = _normal_problem("last")
    fit_svi(model, guide, x, y, config)
    assert fused_state.keys() == guide.state_dict().keys()
    for key, value in guide.state_dict().items():
        torch.testing.assert_close(fused_state[key], value, rtol=1e-8, atol=1e-10)


def test_jit_is_deprecated_and_changes_nothing():
    # Pyro 1.9's JitTrace_ELBO looks parameters up in the global param store, which
    # module-local parameters never fill (it failed with a KeyError on the first step);
    # the option now warns and every guide trains as without it.
    model, _, x, y = float64_problem("last")
    guide = make_guide(model, "lowrank")
    config = FitConfig(epochs=1, jit=True, progress=False, device="cpu", seed=0)
    with pytest.warns(FutureWarning, match="jit is deprecated and does nothing"):
        assert fit_svi(model, guide, x, y, config).steps >= 1
    X, Y = x.numpy(), y.numpy()
    with pytest.warns(FutureWarning, match="jit is deprecated") as caught:
        BayesianMDN(n_components=2, hidden=(4,), epochs=1, jit=True, progress=False).fit(X, Y)
    # Once, at the caller's line, whatever the number of members.
    assert [w.filename for w in caught] == [__file__]


def test_log_prior_with_batch_dims():
    model, _, x, y = float64_problem("all")
    weights = {n: torch.randn(4, *s, dtype=torch.float64) for n, s in model.latent_shapes.items()}
    expected = sum(model.prior(n).log_prob(w) for n, w in weights.items())
    assert expected.shape == (4,)
    torch.testing.assert_close(model.log_prior(weights), expected, rtol=1e-12, atol=1e-10)


def test_log_prior_follows_changed_prior_scales():
    # The cached prior constants follow in-place changes of the buffers, dtype and device
    # moves: the value always equals the prior distributions'.
    model, guide, x, y = float64_problem("last")
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


def test_compile_setting_is_checked_and_resolved(monkeypatch):
    with pytest.raises(ValueError, match="compile must be True, False or 'auto'"):
        FitConfig(compile="yes")
    with pytest.raises(ValueError, match="compile must be"):
        BayesianMDN(compile=1).fit_config()
    auto = FitConfig()
    cuda = torch.device("cuda")
    # "auto" leaves CUDA fits eager (not measured).
    assert not auto.compiles(cuda, 10**7) and not auto.compiles(cuda, 10**7, True)
    # On the CPU: one network from COMPILE_STEPS on, where Linux and a compiler are.
    assert not auto.compiles("cpu", COMPILE_STEPS - 1)
    assert not auto.compiles("cpu", 10**7, stacked=True)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/g++")
    monkeypatch.setattr(sys, "platform", "linux")
    assert auto.compiles("cpu", COMPILE_STEPS)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert not auto.compiles("cpu", COMPILE_STEPS)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert not auto.compiles("cpu", COMPILE_STEPS)
    assert FitConfig(compile=True).compiles("cpu", 1, stacked=True)
    assert FitConfig(compile=True).compiles(cuda, 1)
    assert not FitConfig(compile=False).compiles("cpu", 10**7)


@pytest.mark.slow
@pytest.mark.skipif(
    not cxx_available(),
    reason="torch.compile on the CPU needs a C++ compiler",
)
@pytest.mark.parametrize(("n_members", "compile"), [(1, True), (2, True), (1, "auto")])
def test_compiled_step_gives_the_eager_numbers(n_members, compile, monkeypatch):
    # A whole fit with the compiled step (one member: fit_svi; two: the stacked loop,
    # whose short last batch runs eagerly; "auto": after its trial compile, which puts
    # the random state back) follows the eager fit step for step.
    from torch._dynamo.utils import counters

    import bayes_mdn.config as config_module

    X, y = make_inverse_sine(200, seed=1)
    options = dict(
        n_members=n_members,
        hidden=(8,),
        n_components=3,
        epochs=3,
        batch_size=64,
        dtype="float64",
        progress=False,
        seed=3,
        device="cpu",
    )
    eager = BayesianMDN(compile=False, **options).fit(X, y)
    monkeypatch.setattr(config_module, "COMPILE_STEPS", 1)
    calls = []
    real_compile = torch.compile

    def counted(module, **kwargs):
        compiled = real_compile(module, **kwargs)

        def call(*args, **kw):
            calls.append(args[0].shape)
            return compiled(*args, **kw)

        return call

    monkeypatch.setattr(torch, "compile", counted)
    # Forget graphs compiled by earlier tests (a new module of the same shapes reuses
    # them), so that the counters below see this fit's compilation.
    torch._dynamo.reset()
    counters.clear()
    compiled = BayesianMDN(compile=compile, **options).fit(X, y)
    # 180 training rows: two full batches of 64 an epoch go through the compiled step
    # (plus "auto"'s trial call), and Dynamo captured graphs of it.
    assert len(calls) == 3 * 2 + (compile == "auto")
    assert counters["stats"]["unique_graphs"] >= 1
    for a, b in zip(eager.histories_, compiled.histories_):
        np.testing.assert_allclose(a.train_loss, b.train_loss, rtol=1e-9)
        np.testing.assert_allclose(a.val_nll, b.val_nll, rtol=1e-9)
    np.testing.assert_allclose(
        eager.log_prob(X[:50], y[:50]), compiled.log_prob(X[:50], y[:50]), rtol=1e-9
    )


def test_a_failed_automatic_compile_falls_back_to_the_eager_step(monkeypatch):
    import bayes_mdn.config as config_module

    def broken_compile(module, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("no C++ compiler works here")

        return call

    X, y = make_inverse_sine(120, seed=2)
    options = dict(
        n_members=1, hidden=(8,), n_components=2, epochs=2, progress=False, device="cpu"
    )
    eager = BayesianMDN(compile=False, **options).fit(X, y)
    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(config_module, "COMPILE_STEPS", 1)
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/g++")
    monkeypatch.setattr(sys, "platform", "linux")
    with pytest.warns(RuntimeWarning, match="compiling the training step failed.*C\\+\\+"):
        auto = BayesianMDN(**options).fit(X, y)
    np.testing.assert_array_equal(eager.history_.train_loss, auto.history_.train_loss)
    # Asked for explicitly, the failure is the caller's to see.
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler works here"):
        BayesianMDN(compile=True, **options).fit(X, y)
