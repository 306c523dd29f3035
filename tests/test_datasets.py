import numpy as np
import pytest

from bayes_mdn.datasets import DATASETS, Dataset, load_dataset


def test_faithful_matches_r() -> None:
    # Values from R: nrow(faithful), faithful[1, ], colMeans(faithful).
    ds = load_dataset("faithful")
    assert isinstance(ds, Dataset)
    assert ds.X.shape == (272, 1) and ds.y.shape == (272,)
    assert (ds.feature_names, ds.target_name) == (("waiting",), "eruptions")
    assert (ds.y[0], ds.X[0, 0]) == (3.6, 79.0)
    assert ds.y.mean() == pytest.approx(3.487783, abs=1e-6)
    assert ds.X.mean() == pytest.approx(70.897059, abs=1e-6)


def test_mcycle_matches_r() -> None:
    ds = load_dataset("mcycle")
    assert ds.X.shape == (133, 1) and ds.y.shape == (133,)
    assert (ds.feature_names, ds.target_name) == (("times",), "accel")
    assert (ds.X[0, 0], ds.y[0]) == (2.4, 0.0)
    assert (ds.X[-1, 0], ds.y[-1]) == (57.6, 10.7)
    assert (ds.y.min(), ds.y.max()) == (-134.0, 75.0)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_dataset_is_finite_and_documented(name: str) -> None:
    ds = load_dataset(name)
    assert np.isfinite(ds.X).all() and np.isfinite(ds.y).all()
    assert ds.X.dtype == np.float64
    assert "GPL" in ds.licence and ds.source and ds.description


def test_unknown_dataset_lists_the_available_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown data set 'geyser'.*faithful.*mcycle"):
        load_dataset("geyser")
