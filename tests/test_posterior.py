"""The Posterior object, the model specification, and the estimator as a facade over them."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch

from bayes_mdn import BayesianMDN, ModelSpec, NUTSConfig, Posterior, load, make_inverse_sine
from bayes_mdn import predict as P
from bayes_mdn.diagnostics import calibration_report, to_inference_data
from bayes_mdn.fit import FitConfig, fit_svi

FAST = dict(n_components=3, hidden=(8,), epochs=3, batch_size=64, progress=False, seed=0)


@pytest.fixture(scope="module")
def fitted():
    X, y = make_inverse_sine(300, seed=1)
    return BayesianMDN(**FAST, n_members=2).fit(X, y), X, y


def test_estimator_predictions_are_the_posteriors(fitted):
    mdn, X, y = fitted
    post = mdn.posterior_
    assert mdn.model_ is post.model and mdn.guide_ is post.guide
    x = torch.as_tensor(X[:50], dtype=torch.float32)
    yt = torch.as_tensor(y[:50, None], dtype=torch.float32)
    assert np.array_equal(mdn.predict(X[:50]), post.mean(x, 100, 0)[:, 0].numpy())
    assert np.array_equal(mdn.log_prob(X[:50], y[:50]), post.log_prob(x, yt, 100, 0).numpy())
    lo, hi = post.interval(x, 0.8, seed=0)
    lo_e, hi_e = mdn.predict_interval(X[:50], level=0.8)
    assert np.array_equal(lo_e, lo[:, 0].numpy()) and np.array_equal(hi_e, hi[:, 0].numpy())
    assert (lo < hi).all()


def test_functional_forms_equal_the_methods(fitted):
    mdn, X, y = fitted
    post, model, guide = mdn.posterior_, mdn.model_, mdn.guide_
    x = torch.as_tensor(X[:40], dtype=torch.float32)
    yt = torch.as_tensor(y[:40, None], dtype=torch.float32)
    pairs = [
        (P.predictive_std(model, guide, x, 30, 3), post.std(x, 30, 3)),
        (P.predictive_cdf(model, guide, x, yt, 30, 3), post.cdf(x, yt, 30, 3)),
        (P.sample_predictive(model, guide, x, 20, 3), post.sample(x, 20, 3)),
        (P.predictive_modes(model, guide, x, seed=3)[0], post.modes(x, seed=3)[0]),
        (P.predictive_mixture(model, guide, x, 30, 3).logits, post.mixture(x, 30, 3).logits),
    ]
    for functional, method in pairs:
        assert torch.equal(functional.nan_to_num(), method.nan_to_num())


def test_mixture_is_the_pooled_predictive(fitted):
    mdn, X, _ = fitted
    post = mdn.posterior_
    x = torch.as_tensor(X[:10], dtype=torch.float32)
    mix = post.mixture(x, num_draws=7, seed=0)
    # An ensemble of two members spreads 7 draws over them: 4 + 3 networks of K each.
    assert mix.batch_shape == (10,) and mix.logits.shape == (10, 7 * 3)
    # The pooled mixture's mean is the predictive mean (in float64 after unit mapping).
    mean = post.mean(x, num_draws=7, seed=0)
    assert torch.allclose(mix.mean.double(), mean, atol=1e-5)


def test_posterior_checks_its_arguments(fitted):
    mdn, X, _ = fitted
    with pytest.raises(TypeError, match="model must be a MixtureDensityModel"):
        Posterior("model", mdn.guide_)
    with pytest.raises(TypeError, match=r"guide must be a torch\.nn\.Module"):
        Posterior(mdn.model_, "guide")
    with pytest.raises(ValueError, match="num_draws must be an integer >= 1, got 0"):
        Posterior(mdn.model_, mdn.guide_, num_draws=0)
    x = torch.zeros(3, 1)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        mdn.posterior_.sample(x, 0)
    with pytest.raises(ValueError, match="sampler must be one of"):
        mdn.posterior_.sample(x, 2, sampler="gibbs")
    assert "EnsembleGuide" in repr(mdn.posterior_)


def test_diagnostics_take_a_posterior(fitted):
    mdn, X, y = fitted
    post = Posterior(mdn.model_, mdn.guide_, num_draws=mdn.num_draws)
    a = to_inference_data(mdn, X, y, num_draws=20)
    b = to_inference_data(post, X, y, num_draws=20)
    assert np.array_equal(a.log_likelihood["y"].values, b.log_likelihood["y"].values)
    report = calibration_report(post, X, y, num_draws=20)
    assert report["n"] == len(X) and 0 < report["coverage"][0][0] <= 1


def test_from_posterior_wraps_a_hand_fitted_model(tmp_path):
    """Lower layers fit a member by hand; the facade adds predictions and save/load."""
    X, y = make_inverse_sine(200, seed=2)
    spec = ModelSpec(n_components=3, hidden=(8,), guide="delta")
    x = torch.as_tensor(X, dtype=torch.float32)
    yt = torch.as_tensor(y[:, None], dtype=torch.float32)
    stats = (x.mean(0), x.std(0), yt.mean(0), yt.std(0))
    model, guide = spec.build(1, 1, 3, stats, init_seed=0)
    history = fit_svi(model, guide, x, yt, FitConfig(epochs=2, progress=False, seed=0))
    mdn = BayesianMDN.from_posterior(
        Posterior(model, guide), [history], y_1d=True, n_components=3, hidden=(8,), guide="delta"
    )
    assert (mdn.n_features_in_, mdn.n_outputs_, mdn.n_components_) == (1, 1, 3)
    assert mdn.history_ is history and mdn.num_draws == 100
    assert mdn.predict(X[:5]).shape == (5,)
    mdn.save(tmp_path / "m.safetensors")
    back = load(tmp_path / "m.safetensors", device="cpu")
    assert np.array_equal(back.predict(X[:5]), mdn.predict(X[:5]))
    with pytest.raises(TypeError, match="posterior must be a Posterior"):
        BayesianMDN.from_posterior((model, guide))
    # Parameters that describe another network are refused before save could write them.
    with pytest.raises(
        ValueError, match=r"do not describe the posterior's model.*net\.hidden\.1\.bias missing"
    ):
        BayesianMDN.from_posterior(Posterior(model, guide), n_components=3, guide="delta")
    with pytest.raises(ValueError, match="n_members=2, but the posterior holds 1"):
        BayesianMDN.from_posterior(Posterior(model, guide), n_members=2)
    with pytest.raises(ValueError, match="go with method='nuts'"):
        BayesianMDN.from_posterior(Posterior(model, guide), method="nuts", hidden=(8,))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(hidden=(4, 0)), "hidden must be a sequence of integers >= 1"),
        (dict(activation="sigmoid"), "activation must be one of"),
        (dict(n_components=0), "n_components must be 'auto' or an integer >= 1"),
        (dict(prior_scale=float("nan")), "prior_scale must be a finite number > 0"),
        (dict(bayesian="none", guide="normal"), "needs latent weights"),
        (dict(bayesian=[]), "non-empty sequence of name patterns"),
    ],
)
def test_model_spec_names_the_bad_setting(settings, message):
    with pytest.raises(ValueError, match=message):
        ModelSpec(**settings)
    # The estimator checks through the same spec before reading any data.
    with pytest.raises(ValueError, match=message):
        BayesianMDN(**settings).fit(np.zeros((4, 1)), np.arange(4.0))


def test_model_spec_resolves_auto_components():
    assert ModelSpec().components(1000) == 10
    assert ModelSpec(n_components=4).components(1000) == 4


NUTS_TINY = dict(n_components=2, hidden=(4,), epochs=2, batch_size=64, progress=False, seed=0)


def test_nuts_settings_are_grouped_and_saved(tmp_path):
    X, y = make_inverse_sine(60, seed=3)
    nuts = NUTSConfig(num_chains=1, warmup_steps=3, num_samples=4, max_tree_depth=1)
    mdn = BayesianMDN(**NUTS_TINY, method="nuts", nuts=nuts).fit(X, y)
    info = mdn.nuts_info_
    assert (info["num_chains"], info["warmup_steps"], info["num_samples"]) == (1, 3, 4)
    assert info["max_tree_depth"] == 1
    assert mdn.guide_.samples["head.weight"].shape[:2] == (1, 4)
    mdn.save(tmp_path / "nuts.safetensors")
    back = load(tmp_path / "nuts.safetensors", device="cpu")
    assert back.nuts == asdict(nuts)
    np.testing.assert_array_equal(back.predict(X[:5]), mdn.predict(X[:5]))
    # The 0.1 flat arguments still work, warn, and give the same run.
    old = dict(num_chains=1, nuts_warmup=3, nuts_samples=4, max_tree_depth=1)
    with pytest.warns(FutureWarning, match=r"pass nuts=NUTSConfig\(num_chains=..."):
        flat = BayesianMDN(**NUTS_TINY, method="nuts", **old).fit(X, y)
    np.testing.assert_array_equal(flat.predict(X[:5]), mdn.predict(X[:5]))


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        (dict(nuts=dict(chains=2)), ValueError, r"nuts has unknown settings \['chains'\]"),
        (dict(nuts=dict(num_samples=0)), ValueError, "num_samples must be an integer >= 1"),
        # Fewer than 4 draws used to sample every chain, then fail in Pyro's diagnostics.
        (dict(nuts=dict(num_samples=3)), ValueError, "num_samples must be at least 4"),
        (dict(nuts_samples=2), ValueError, "num_samples must be at least 4"),
        (dict(nuts=3), TypeError, "nuts must be a NUTSConfig"),
        (dict(nuts=dict(num_chains=1), nuts_samples=5), ValueError, "given twice"),
        (dict(max_tree_depth=0), ValueError, "max_tree_depth must be an integer >= 1"),
    ],
)
def test_bad_nuts_settings_fail_before_any_work(settings, error, message):
    with pytest.raises(error, match=message):
        BayesianMDN(**NUTS_TINY, method="nuts", **settings).fit(np.zeros((4, 1)), np.arange(4.0))


def test_fit_nuts_refuses_fewer_than_four_draws_before_sampling(fitted):
    from bayes_mdn.mcmc import fit_nuts

    mdn, X, y = fitted
    x, t = torch.as_tensor(X[:20], dtype=torch.float32), torch.as_tensor(y[:20]).float()
    with pytest.raises(ValueError, match="num_samples must be at least 4 draws per chain"):
        fit_nuts(mdn.model_, x, t.reshape(-1, 1), num_samples=3, warmup_steps=1)
    with pytest.raises(ValueError, match="at least 4"):
        NUTSConfig(num_samples=1)


def test_an_estimator_pickled_by_0_1_unpickles_fitted(fitted):
    """0.1 pickled model_ and guide_ as attributes and had no nuts, backbone, devices or
    compile."""
    mdn, X, _ = fitted
    state = dict(mdn.__getstate__())
    post = state.pop("posterior_")
    state.update(model_=post.model, guide_=post.guide)
    del state["nuts"], state["backbone"], state["devices"], state["compile"]
    old = BayesianMDN.__new__(BayesianMDN)
    old.__setstate__(state)
    np.testing.assert_array_equal(old.predict(X[:5]), mdn.predict(X[:5]))
    params = old.get_params()
    assert params["nuts"] is None and params["devices"] == 1 and params["compile"] == "auto"
    assert repr(old).startswith("BayesianMDN(")


def test_diagnostics_take_any_object_with_a_model_and_a_guide(fitted):
    mdn, X, y = fitted

    class Fitted:
        model_, guide_, num_draws = mdn.model_, mdn.guide_, 20

    a = to_inference_data(Fitted(), X, y)
    b = to_inference_data(mdn, X, y, num_draws=20)
    assert np.array_equal(a.log_likelihood["y"].values, b.log_likelihood["y"].values)


def test_nuts_defaults_agree_with_the_deprecated_flat_defaults():
    import inspect

    defaults = inspect.signature(BayesianMDN.__init__).parameters
    config = NUTSConfig()
    assert (config.num_chains, config.warmup_steps, config.num_samples) == (
        defaults["num_chains"].default,
        defaults["nuts_warmup"].default,
        defaults["nuts_samples"].default,
    )
    assert config.max_tree_depth == defaults["max_tree_depth"].default
