"""BayesianMDN as a real scikit-learn estimator: pipelines, searches, cross-validation,
feature names, NotFittedError and scikit-learn's own estimator checks."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.compose import ColumnTransformer
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from bayes_mdn import BayesianMDN, make_inverse_sine

pd = pytest.importorskip("pandas")

FAST = {
    "n_components": 2,
    "hidden": (8,),
    "epochs": 3,
    "batch_size": 64,
    "progress": False,
    "num_draws": 4,
}


@pytest.fixture(scope="module")
def data():
    return make_inverse_sine(150, seed=0)


def test_cross_val_score_uses_the_log_score(data):
    X, y = data
    scores = cross_val_score(BayesianMDN(**FAST), X, y, cv=KFold(3))
    assert scores.shape == (3,) and np.isfinite(scores).all()
    # The score is the mean log predictive density of the held-out fold.
    fold = next(iter(KFold(3).split(X)))
    mdn = BayesianMDN(**FAST).fit(X[fold[0]], y[fold[0]])
    assert scores[0] == pytest.approx(mdn.score(X[fold[1]], y[fold[1]]))


def test_cross_val_score_in_parallel_workers(data):
    X, y = data
    serial = cross_val_score(BayesianMDN(**FAST), X, y, cv=KFold(2))
    parallel = cross_val_score(BayesianMDN(**FAST), X, y, cv=KFold(2), n_jobs=2)
    # Seeded fits in other processes give the same numbers.
    np.testing.assert_allclose(parallel, serial, rtol=1e-5)


def test_grid_search_picks_by_log_score(data):
    X, y = data
    search = GridSearchCV(BayesianMDN(**FAST), {"n_components": [1, 3]}, cv=2).fit(X, y)
    assert search.best_params_["n_components"] in (1, 3)
    assert np.isfinite(search.cv_results_["mean_test_score"]).all()
    assert search.best_estimator_.n_components == search.best_params_["n_components"]


def test_pipeline_with_column_transformer(data):
    X, y = data
    frame = pd.DataFrame({"x": X[:, 0], "noise": np.cos(X[:, 0])})
    pipe = make_pipeline(
        ColumnTransformer([("scale", StandardScaler(), ["x"])]), BayesianMDN(**FAST)
    )
    assert np.isfinite(pipe.fit(frame, y).score(frame, y))
    assert pipe.predict(frame[:4]).shape == (4,)


def test_feature_names_are_recorded_and_checked(data):
    X, y = data
    frame = pd.DataFrame({"waiting": X[:, 0]})
    mdn = BayesianMDN(**FAST).fit(frame, y)
    assert list(mdn.feature_names_in_) == ["waiting"]
    with pytest.raises(ValueError, match="feature names"):
        mdn.predict(pd.DataFrame({"other": X[:3, 0]}))
    # Arrays without names still work on a model fitted with names (scikit-learn warns).
    with pytest.warns(UserWarning, match="feature names"):
        assert mdn.predict(X[:3]).shape == (3,)
    assert not hasattr(BayesianMDN(**FAST).fit(X, y), "feature_names_in_")


def test_not_fitted_error_before_fit(data):
    X, _ = data
    with pytest.raises(NotFittedError):
        BayesianMDN().predict(X)


def test_clone_is_unfitted_with_the_same_params(data):
    X, y = data
    mdn = BayesianMDN(**FAST).fit(X, y)
    twin = clone(mdn)
    assert twin.get_params() == mdn.get_params() and not hasattr(twin, "model_")
    assert "n_components=2" in repr(twin)


def test_score_with_sample_weight(data):
    X, y = data
    mdn = BayesianMDN(**FAST).fit(X, y)
    w = np.zeros(len(y))
    w[:10] = 1.0
    assert mdn.score(X, y, sample_weight=w) == pytest.approx(mdn.log_prob(X[:10], y[:10]).mean())
    with pytest.raises(ValueError, match="sample_weight"):
        mdn.score(X, y, sample_weight=-w)


# Every one of scikit-learn's checks applies and passes: none is skipped by name. (The one
# that skips itself, the array-API check, needs SCIPY_ARRAY_API set.)
@parametrize_with_checks([BayesianMDN(**FAST)])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
