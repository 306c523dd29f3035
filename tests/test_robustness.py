"""Numerical robustness and bad input at every public entry point."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.exceptions import NotFittedError

from bayes_mdn import BayesianMDN, FitConfig, fit_svi, make_guide
from bayes_mdn._archive import read_archive
from bayes_mdn.checkpoint import CHECKPOINT_VERSION
from bayes_mdn.cli import main
from bayes_mdn.model import MixtureDensityModel
from bayes_mdn.nets import MixtureDensityNetwork


def _data(n: int = 96, d_y: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.uniform(-2, 2, size=(n, 1))
    Y = np.sin(2 * X) + 0.2 * rng.normal(size=(n, d_y))
    return X, (Y[:, 0] if d_y == 1 else Y)


def _tiny(**options) -> BayesianMDN:
    # One member: these tests probe inputs and numerics of a fit (ensembles: test_ensemble).
    base = dict(
        n_components=3,
        hidden=(8,),
        epochs=3,
        batch_size=32,
        progress=False,
        device="cpu",
        n_members=1,
    )
    return BayesianMDN(**(base | options))


def _finite(*arrays) -> bool:
    return all(np.isfinite(np.asarray(a)).all() for a in arrays)


# -- scales, outliers, degenerate data ------------------------------------------------------
@pytest.mark.parametrize(("dtype", "tol"), [("float64", 1e-9), ("float32", 1e-4)])
@pytest.mark.parametrize("c", [1e-6, 1e6])
def test_target_scale_shifts_nll_by_the_log_jacobian(dtype, tol, c):
    # y -> c*y is absorbed by the standardization, so the same seeded fit follows and the
    # density in the user's units picks up exactly the Jacobian: NLL(cy) = NLL(y) + log c.
    # Tolerance: float64 rounding of the standardized data (measured ~2e-15); float32
    # ~1e-6 (measured), with headroom.
    X, y = _data()
    nll = -_tiny(dtype=dtype).fit(X, y).log_prob(X, y).mean()
    nll_c = -_tiny(dtype=dtype).fit(X, c * y).log_prob(X, c * y).mean()
    assert nll_c == pytest.approx(nll + math.log(c), abs=tol)


def test_heavy_outliers_stay_finite():
    X, y = _data(128)
    y = y.copy()
    y[:3] = [1e7, -5e6, 2e8]  # far beyond the bulk: they set the standardization scale
    est = _tiny(guide="lowrank").fit(X, y)
    assert _finite(est.history_.train_loss, est.history_.val_nll)
    assert _finite(est.predict(X), est.predict_std(X), est.log_prob(X, y), est.sample(X, 3))


def test_duplicated_and_constant_x():
    X, y = _data(64)
    est = _tiny().fit(np.vstack([X, X, X]), np.concatenate([y, y, y]))
    assert _finite(est.predict(X), est.log_prob(X, y))
    const = _tiny().fit(np.ones_like(X), y)  # x carries no information: p(y) is learned
    assert _finite(const.predict(X), const.log_prob(np.ones_like(X), y))


@pytest.mark.parametrize("d_y", [1, 3])
def test_constant_target_is_refused(d_y):
    X, Y = _data(d_y=d_y)
    Y = Y.copy()
    if d_y == 1:
        Y[:] = 2.5
    else:
        Y[:, 1] = -1.0
    with pytest.raises(ValueError, match=f"y column {0 if d_y == 1 else 1} is constant"):
        _tiny().fit(X, Y)


# -- the limits of the model's dtype -------------------------------------------------------
@pytest.fixture(scope="module")
def unit_fit() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standard deviation and total variance at X[:4] of the float32 fit on unit-scale y."""
    X, y = _data()
    est = _tiny().fit(X, y)
    return X, est.predict_std(X[:4]), est.uncertainty(X[:4])["total"]


@pytest.mark.parametrize("c", [1e18, 1e19, 1e37, 1e-22, 1e-30])
def test_moments_of_extreme_scale_targets_in_float32(unit_fit, c):
    # The model sees y standardized, so the fit on c*y follows the fit on y, and its
    # moments must be c (or c**2) times those. Before, predict_std was inf at 1e19 and 0
    # at 1e-30 (12 % off at 1e-22), and uncertainty inf at 1e18, their float32 variances
    # overflowing or underflowing. Tolerance: the two fits differ only by the float32
    # rounding of c*y (relative 6e-8); measured agreement 1e-7, bound 1e-4.
    X, std, total = unit_fit
    _, y = _data()
    est = _tiny().fit(X, c * y)
    scaled_std = est.predict_std(X[:4])
    scaled_total = est.uncertainty(X[:4])["total"]
    assert scaled_std.dtype == scaled_total.dtype == np.float64
    np.testing.assert_allclose(scaled_std, c * std.astype(np.float64), rtol=1e-4)
    np.testing.assert_allclose(scaled_total, c**2 * total.astype(np.float64), rtol=1e-4)
    np.testing.assert_allclose(scaled_total, scaled_std**2, rtol=1e-6)


# fit's check for constant targets takes the plain float64 std of y, whose squares overflow
# at 1e200 (it is inf, so not 0: the check still holds).
@pytest.mark.filterwarnings("ignore:overflow encountered in square:RuntimeWarning")
def test_variance_beyond_float64_is_named():
    X, y = _data(48)
    est = _tiny(dtype="float64").fit(X, 1e200 * y)
    assert _finite(est.predict(X[:3]), est.predict_std(X[:3]))
    with pytest.raises(OverflowError, match="predictive variance overflows float64"):
        est.uncertainty(X[:3])
    with pytest.raises(OverflowError, match="predictive covariance overflows float64"):
        est.predict_covariance(X[:3])


def test_values_beyond_the_model_dtype_are_refused(fitted):
    X, y = _data(16)
    big = np.where(np.arange(16)[:, None] == 5, 1e39, X)
    with pytest.raises(
        ValueError, match=r"y column 0 holds -?\d.*\(row 0\), beyond the largest float32"
    ):
        _tiny().fit(X, 1e39 * y)
    with pytest.raises(
        ValueError, match=r"X column 0 holds 1e\+39 \(row 5\), beyond the largest float32"
    ):
        _tiny().fit(big, y)
    for call in (fitted.predict, fitted.predict_std, fitted.sample, fitted.predict_modes):
        with pytest.raises(ValueError, match=r"X column 0 holds 1e\+39 \(row 5\).*float32"):
            call(big)
    with pytest.raises(ValueError, match=r"y column 0 holds -1e\+39 \(row 1\).*float32"):
        fitted.log_prob(X[:2], [0.0, -1e39])
    # float64 holds them: nothing to refuse there.
    assert _finite(_tiny(dtype="float64", epochs=1).fit(X, 1e39 * y).predict(big))


def test_columns_finer_than_the_dtype_are_refused():
    X, y = _data(32)
    with pytest.raises(
        ValueError,
        match=r"y column 0 varies by [\d.e-]+ \(standard deviation\) around 1, finer than float32 resolves",
    ):
        _tiny().fit(X, 1.0 + 1e-9 * y)
    with pytest.raises(ValueError, match=r"X column 0 varies by .*finer than float32"):
        _tiny().fit(X * 1e-46, y)
    assert _finite(_tiny(dtype="float64", epochs=1).fit(X, 1.0 + 1e-9 * y).predict(X))


@pytest.mark.parametrize("k", [1, 2, 50])
def test_number_of_components(k):
    X, y = _data()
    est = _tiny(n_components=k, covariance="full").fit(X, y)
    mix = est.predictive_mixture(X[:4], num_draws=2)
    assert mix.logits.shape == (4, 2 * k)
    assert _finite(est.predict(X), est.log_prob(X, y), est.predict_quantiles(X[:4], [0.1, 0.9]))


@given(
    guide=st.sampled_from(["delta", "normal", "lowrank"]),
    bayesian=st.sampled_from(["last", "all"]),
    covariance=st.sampled_from(["diagonal", "full"]),
    d_y=st.integers(1, 2),
)
@settings(max_examples=6, deadline=None)
def test_float64_throughout(guide, bayesian, covariance, d_y):
    X, Y = _data(48, d_y=d_y)
    est = _tiny(
        dtype="float64", guide=guide, bayesian=bayesian, covariance=covariance, epochs=1
    ).fit(X, Y)
    tensors = list(est.model_.state_dict().values()) + list(est.guide_.state_dict().values())
    assert all(t.dtype == torch.float64 for t in tensors if t.is_floating_point())
    outputs = [
        est.predict(X[:3]),
        est.predict_std(X[:3]),
        est.predict_quantiles(X[:3], [0.5]),
        *est.predict_interval(X[:3]),
        est.sample(X[:3], 2),
        est.log_prob(X[:3], Y[:3]),
        *est.uncertainty(X[:3]).values(),
    ]
    assert all(a.dtype == np.float64 for a in outputs)
    mix = est.predictive_mixture(X[:3])
    assert {mix.logits.dtype, mix.loc.dtype, mix.scale.dtype} == {torch.float64}


@given(
    n=st.integers(4, 50),
    d_x=st.integers(1, 4),
    d_y=st.integers(1, 3),
    batch=st.one_of(st.none(), st.integers(1, 64)),
    val_fraction=st.sampled_from([0.0, 0.2]),
    num_particles=st.integers(1, 2),
)
@settings(max_examples=8, deadline=None)
def test_any_small_shape_fits_and_predicts(n, d_x, d_y, batch, val_fraction, num_particles):
    rng = np.random.default_rng(n)
    X, Y = rng.normal(size=(n, d_x)), rng.normal(size=(n, d_y))
    est = _tiny(
        epochs=2, batch_size=batch, val_fraction=val_fraction, num_particles=num_particles
    ).fit(X, Y[:, 0] if d_y == 1 else Y)
    assert est.predict(X).shape == ((n,) if d_y == 1 else (n, d_y))
    assert est.sample(X, 2).shape == ((2, n) if d_y == 1 else (2, n, d_y))
    assert _finite(est.log_prob(X, Y[:, 0] if d_y == 1 else Y))


# -- non-finite training --------------------------------------------------------------------
def test_huge_learning_rate_stops_with_a_clear_error():
    X, y = _data()
    # Enough epochs that the loss overflows whatever the draw: on some seeds it takes a
    # few epochs of absurd but finite losses (1e27 and growing) to reach inf.
    with pytest.raises(FloatingPointError, match=r"at step \d+ \(epoch \d+\).*lr=1000000.0"):
        _tiny(lr=1e6, lr_schedule="constant", epochs=30).fit(X, y)


def _model_and_guide(x: torch.Tensor, y: torch.Tensor, guide: str):
    net = MixtureDensityNetwork(d_x=1, d_y=1, n_components=3, hidden=(8,))
    model = MixtureDensityModel(
        net, x_loc=x.mean(0), x_scale=x.std(0), y_loc=y.mean(0), y_scale=y.std(0)
    )
    return model, make_guide(model, guide)


@pytest.mark.parametrize("guide", ["delta", "normal"])
def test_nan_parameters_are_caught_and_never_kept_or_checkpointed(tmp_path, monkeypatch, guide):
    X, y = _data()
    x, yt = torch.tensor(X, dtype=torch.float32), torch.tensor(y[:, None], dtype=torch.float32)
    model, g = _model_and_guide(x, yt, guide)
    config = FitConfig(epochs=4, batch_size=32, val_fraction=0.0, progress=False, device="cpu")
    steps_per_epoch = math.ceil(len(x) / 32)
    # Poison a parameter right after the last step of epoch 1: every loss of that epoch
    # was computed before the poison, so only a check of the parameters can see it.
    real_step = torch.optim.Adam.step
    calls = {"n": 0}

    def poisoned_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2 * steps_per_epoch:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", poisoned_step)
    ck = tmp_path / "ck"
    with pytest.raises(
        FloatingPointError, match=r"parameters became non-finite at step 5 \(epoch 1\)"
    ):
        fit_svi(model, g, x, yt, config, checkpoint=ck, checkpoint_every=1)
    state = dict(model.state_dict()) | dict(g.state_dict())
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    saved = read_archive(ck, "checkpoint", CHECKPOINT_VERSION)
    assert saved["epoch"] == 1  # the epoch-1 checkpoint was never written
    assert all(torch.isfinite(t).all() for t in saved["state"].values() if t.is_floating_point())
    # Without a validation split the kept state is the last finite one: the parameter
    # average at the end of epoch 0, as that checkpoint kept it.
    assert all(torch.isfinite(t).all() for t in saved["best_state"].values())
    assert all(torch.equal(saved["best_state"][k], v) for k, v in _loss_state(model, g).items())


def _loss_state(model, guide) -> dict[str, torch.Tensor]:
    return {f"model.{k}": v for k, v in model.state_dict().items()} | {
        f"guide.{k}": v for k, v in guide.state_dict().items()
    }


# -- bad input at every entry point ---------------------------------------------------------
BAD_OPTIONS = [
    (dict(n_components=0), ValueError, "n_components"),
    (dict(n_components=2.5), ValueError, "n_components"),
    (dict(n_components=True), ValueError, "n_components"),
    (dict(hidden=(0,)), ValueError, "hidden"),
    (dict(hidden="64"), ValueError, "hidden"),
    (dict(hidden=(8, -1)), ValueError, "hidden"),
    (dict(activation="sigmoidish"), ValueError, "activation"),
    (dict(bayesian="some"), ValueError, "bayesian"),
    (dict(guide="flow"), ValueError, "guide"),
    (dict(bayesian="none", guide="normal"), ValueError, "guide='normal' needs latent"),
    (dict(covariance="banded"), ValueError, "covariance"),
    (dict(prior_scale=0.0), ValueError, "prior_scale"),
    (dict(prior_scale=float("nan")), ValueError, "prior_scale"),
    (dict(prior_function=-0.5), ValueError, "prior_function"),
    (dict(prior_function=float("inf")), ValueError, "prior_function"),
    (dict(prior_function=True), ValueError, "prior_function"),
    (dict(prior_function="0.5"), ValueError, "prior_function"),
    (dict(min_scale=-1e-3), ValueError, "min_scale"),
    (dict(init_scale=float("inf")), ValueError, "init_scale"),
    (dict(guide="lowrank", rank=0), ValueError, "rank"),
    (dict(epochs=0), ValueError, "epochs"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(lr=0.0), ValueError, "lr"),
    (dict(lr=float("nan")), ValueError, "lr"),
    (dict(lr_schedule="step"), ValueError, "lr_schedule"),
    (dict(clip_norm=-1.0), ValueError, "clip_norm"),
    (dict(num_particles=0), ValueError, "num_particles"),
    (dict(val_fraction=1.0), ValueError, "val_fraction"),
    (dict(val_fraction=-0.1), ValueError, "val_fraction"),
    (dict(patience=0), ValueError, "patience"),
    (dict(val_draws=0), ValueError, "val_draws"),
    (dict(num_draws=0), ValueError, "num_draws"),
    (dict(dtype="float16"), ValueError, "dtype"),
    (dict(device="tpu"), ValueError, "device"),
    (dict(seed="a"), TypeError, "seed"),
    (dict(seed=2**70), ValueError, r"seed must be an integer in \[0, 2\*\*63\)"),
    (dict(checkpoint_every=0, checkpoint="ck"), ValueError, "checkpoint_every"),
]


@pytest.mark.parametrize(("options", "error", "match"), BAD_OPTIONS)
def test_bad_constructor_options_fail_at_fit(options, error, match):
    X, y = _data(16)
    with pytest.raises(error, match=match):
        _tiny(**options).fit(X, y)


BAD_FIT_DATA = [
    (None, [1.0, 2.0], TypeError, "X must be array-like"),
    (np.arange(4.0), np.arange(4.0), ValueError, r"X must be 2-D.*reshape\(-1, 1\)"),
    (np.zeros((4, 1, 1)), np.arange(4.0), ValueError, "X must be 2-D"),
    (np.array([["a"], ["b"]]), [1.0, 2.0], TypeError, "X must hold numbers"),
    (np.ones((2, 1)) * 1j, [1.0, 2.0], ValueError, "real numbers"),
    (np.array([[0.0], [np.nan], [1.0]]), [1.0, 2.0, 3.0], ValueError, "X contains 1 NaN"),
    (np.array([[0.0], [1.0], [2.0]]), [1.0, np.inf, 3.0], ValueError, "y contains 1 NaN"),
    (np.zeros((0, 1)), np.zeros(0), ValueError, "X is empty"),
    (np.zeros((5, 1)), np.arange(4.0), ValueError, "same number of rows"),
    (np.zeros((4, 1)), np.zeros((4, 1, 2)), ValueError, "y must be 1-D or 2-D"),
    (np.zeros((1, 1)), np.zeros(1), ValueError, "at least 2 rows"),
]


@pytest.mark.parametrize(("X", "y", "error", "match"), BAD_FIT_DATA)
def test_bad_fit_data(X, y, error, match):
    with pytest.raises(error, match=match):
        _tiny().fit(X, y)


@pytest.fixture(scope="module")
def fitted() -> BayesianMDN:
    X, y = _data(48)
    return _tiny(epochs=1).fit(X, y)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda m: m.predict(np.zeros((2, 3))), ValueError, "X has 3 features"),
        (lambda m: m.predict(np.array([[np.nan]])), ValueError, "X contains"),
        (lambda m: m.predict([1.0, 2.0]), ValueError, "X must be 2-D"),
        (lambda m: m.predict(np.zeros((2, 1)), num_draws=0), ValueError, "num_draws"),
        (lambda m: m.log_prob(np.zeros((2, 1)), np.zeros((2, 2))), ValueError, "y has 2"),
        (lambda m: m.log_prob(np.zeros((2, 1)), np.zeros(3)), ValueError, "same number"),
        (lambda m: m.log_prob(np.zeros((2, 1)), [np.inf, 0.0]), ValueError, "y contains"),
        (lambda m: m.predict_quantiles(np.zeros((2, 1)), [1.5]), ValueError, "quantile"),
        (lambda m: m.predict_interval(np.zeros((2, 1)), 1.0), ValueError, "level"),
        (lambda m: m.sample(np.zeros((2, 1)), 0), ValueError, "num_samples"),
        (lambda m: m.predict_modes(np.zeros((2, 1)), num_draws=0), ValueError, "num_draws"),
        (lambda m: m.score(np.zeros((2, 1)), None), TypeError, "y must be array-like"),
        (
            lambda m: m.predict(np.zeros((2, 1)), seed="x"),
            TypeError,
            r"seed must be an integer in \[0, 2\*\*63\) or None, or 'default'.*got 'x'",
        ),
        (lambda m: m.sample(np.zeros((2, 1)), seed=2**70), ValueError, "seed must be an integer"),
        (lambda m: m.predict_std(np.zeros((2, 1)), seed=1.5), TypeError, "got 1.5"),
        (
            lambda m: m.predict_quantiles(np.zeros((2, 1)), [[0.1, 0.5], [0.6, 0.9]]),
            ValueError,
            r"q must be a number or a 1-D sequence of levels, got an array of shape \(2, 2\)",
        ),
        (lambda m: m.predict_quantiles(np.zeros((2, 1)), "median"), TypeError, "q must be"),
    ],
)
def test_bad_prediction_input(fitted, call, error, match):
    with pytest.raises(error, match=match):
        call(fitted)


def test_unfitted_estimator_refuses_to_predict():
    with pytest.raises(NotFittedError, match="not fitted"):
        _tiny().predict(np.zeros((2, 1)))


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["demo", "--epochs", "0"], "expected an integer >= 1"),
        (["demo", "--n-train", "many"], "expected an integer"),
        (["demo", "--device", "tpu"], "device must be"),
        (["demo", "--seed", "1.5"], "argument --seed: expected an integer seed, got '1.5'"),
        (["demo", "--seed", str(2**70)], "argument --seed: expected a seed in [0, 2**63)"),
        (
            ["fit", "--csv", "a", "--x", "x", "--y", "y", "--model", "m", "--seed", "-1"],
            "[0, 2**63)",
        ),
        (["fly"], "invalid choice"),
        ([], "required"),
    ],
)
def test_cli_bad_arguments_exit_2_with_a_message(tmp_path, capsys, argv, match):
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path)] if argv[:1] == ["demo"] else argv)
    assert exc.value.code == 2
    assert match in capsys.readouterr().err
    assert time.perf_counter() - started < 5  # rejected before any fit
    assert not any(tmp_path.iterdir())


# -- stress ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_many_seeds_and_guides_never_give_nan():
    # 100 seeds x 3 guides of short fits: any NaN, in training or in predictions, fails.
    X, y = _data(64)
    failures = []
    for seed in range(100):
        for guide in ("delta", "normal", "lowrank"):
            est = _tiny(guide=guide, epochs=2, seed=seed, num_draws=8).fit(X, y)
            if not _finite(
                est.history_.train_loss, est.history_.val_nll, est.log_prob(X, y), est.predict(X)
            ):
                failures.append((seed, guide))
    assert not failures
