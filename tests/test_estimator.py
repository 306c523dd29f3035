import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError

from bayes_mdn import BayesianMDN, make_inverse_sine

FAST = {"n_components": 3, "hidden": (8,), "epochs": 3, "batch_size": 32, "progress": False}


@pytest.fixture(scope="module")
def data():
    return make_inverse_sine(120, seed=0)


@pytest.fixture(scope="module")
def fitted(data):
    X, y = data
    return BayesianMDN(**FAST).fit(X, y)


def test_fit_returns_self_and_sets_attributes(data):
    X, y = data
    mdn = BayesianMDN(**FAST)
    assert mdn.fit(X, y) is mdn
    assert mdn.n_features_in_ == 1 and mdn.n_outputs_ == 1
    assert len(mdn.history_.train_loss) == 3


def test_prediction_shapes(fitted, data):
    X, y = data
    assert fitted.predict(X[:5]).shape == (5,)
    assert fitted.predict_std(X[:5]).shape == (5,)
    assert fitted.predict_quantiles(X[:5], [0.1, 0.9]).shape == (5, 2)
    lo, hi = fitted.predict_interval(X[:5], 0.8)
    assert lo.shape == hi.shape == (5,) and (lo < hi).all()
    assert fitted.sample(X[:5], n_samples=4).shape == (4, 5)
    assert fitted.log_prob(X[:5], y[:5]).shape == (5,)
    assert np.isfinite(fitted.score(X, y))
    assert len(fitted.predict_modes(X[:3])) == 3
    parts = fitted.uncertainty(X[:5])
    assert set(parts) == {"total", "aleatoric", "epistemic"} and parts["total"].shape == (5,)


def test_two_dimensional_targets(data):
    X, y = data
    Y = np.stack([y, -y], axis=1)
    mdn = BayesianMDN(**FAST).fit(X, Y)
    assert mdn.predict(X[:4]).shape == (4, 2)
    assert mdn.predict_quantiles(X[:4], [0.5]).shape == (4, 1, 2)
    assert mdn.sample(X[:4], n_samples=3).shape == (3, 4, 2)


def test_seeded_predictions_repeat(fitted, data):
    X, y = data
    np.testing.assert_array_equal(fitted.sample(X[:5], 3, seed=7), fitted.sample(X[:5], 3, seed=7))
    np.testing.assert_array_equal(fitted.log_prob(X, y), fitted.log_prob(X, y))


def test_standardization_round_trip(data):
    """Rescaling y rescales every prediction and shifts the log density by the Jacobian."""
    X, y = data
    a = BayesianMDN(**FAST, bayesian="none", guide="delta").fit(X, y)
    b = BayesianMDN(**FAST, bayesian="none", guide="delta").fit(X * 1000.0, 1e-3 * y + 50.0)
    np.testing.assert_allclose(
        b.predict(X * 1000.0), 1e-3 * a.predict(X) + 50.0, rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        b.log_prob(X * 1000.0, 1e-3 * y + 50.0),
        a.log_prob(X, y) - np.log(1e-3),
        rtol=1e-4,
        atol=2e-3,
    )


def test_pandas_and_torch_inputs(data):
    pd = pytest.importorskip("pandas")
    X, y = data
    frame = pd.DataFrame({"x": X[:, 0]})
    mdn = BayesianMDN(**FAST).fit(frame, pd.Series(y))
    with pytest.warns(UserWarning, match="feature names"):
        from_tensor = mdn.predict(torch.tensor(X[:3]))
    np.testing.assert_allclose(mdn.predict(frame[:3]), from_tensor, rtol=1e-6)


def test_sklearn_clone_and_params():
    base = pytest.importorskip("sklearn.base")
    mdn = BayesianMDN(n_components=7, hidden=(5, 5))
    clone = base.clone(mdn)
    assert clone.get_params() == mdn.get_params()
    assert clone.set_params(n_components=2).n_components == 2
    with pytest.raises(ValueError, match="Invalid parameter"):
        mdn.set_params(colour="red")
    assert "n_components=7" in repr(mdn)


BAD_DATA = [
    ([[1.0], [np.nan]], [1.0, 2.0], ValueError, "NaN"),
    ([[1.0], [2.0]], [1.0, np.inf], ValueError, "infinite"),
    ([[1.0], [2.0], [3.0]], [1.0, 2.0], ValueError, "same number of rows"),
    ([1.0, 2.0], [1.0, 2.0], ValueError, "2-D"),
    (np.zeros((2, 1, 1)), [1.0, 2.0], ValueError, "3-D"),
    (np.zeros((0, 1)), np.zeros(0), ValueError, "empty"),
    ([["a"], ["b"]], [1.0, 2.0], TypeError, "numbers"),
    ([[1.0], [2.0]], ["x", "y"], TypeError, "numbers"),
    ([[1.0], [2.0], [3.0]], [1.0, 1.0, 1.0], ValueError, "constant"),
    (None, [1.0], TypeError, "None"),
]


@pytest.mark.parametrize(("X", "y", "err", "match"), BAD_DATA)
def test_bad_data_is_refused_before_training(X, y, err, match):
    with pytest.raises(err, match=match):
        BayesianMDN(**FAST).fit(X, y)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"guide": "foo"}, "guide"),
        ({"bayesian": "first"}, "bayesian"),
        ({"n_components": 0}, "n_components"),
        ({"hidden": (8, -1)}, "hidden"),
        ({"activation": "swish"}, "activation"),
        ({"covariance": "spherical"}, "covariance"),
        ({"dtype": "float16"}, "dtype"),
        ({"prior_scale": 0}, "prior_scale"),
        ({"bayesian": "none", "guide": "normal"}, "bayesian='none'"),
        ({"epochs": 0}, "epochs"),
        ({"lr": 0}, "lr"),
        ({"device": "gpu"}, "device"),
        ({"val_fraction": 0.99}, "training rows"),
    ],
)
def test_bad_options_are_refused_before_training(kwargs, match, data):
    X, y = data
    with pytest.raises(ValueError, match=match):
        BayesianMDN(**FAST | kwargs).fit(X[:20], y[:20])


def test_predicting_before_fit_or_with_other_features(fitted):
    with pytest.raises(NotFittedError, match="not fitted"):
        BayesianMDN().predict([[1.0]])
    with pytest.raises(ValueError, match="2 features"):
        fitted.predict(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="outputs"):
        fitted.log_prob(np.zeros((3, 1)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="quantile"):
        fitted.predict_quantiles(np.zeros((3, 1)), [1.5])


def test_float64(data):
    X, y = data
    mdn = BayesianMDN(**FAST, dtype="float64").fit(X, y)
    assert all(p.dtype == torch.float64 for p in mdn.guide_.parameters())
    assert mdn.predict(X[:2]).dtype == np.float64
