"""Save/load round trips, bad model files, atomic writes, checkpoint and resume."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.exceptions import NotFittedError

import bayes_mdn
from bayes_mdn import BayesianMDN, ModelFileError, load
from bayes_mdn import fit as fit_module
from bayes_mdn._archive import read_archive, write_archive
from bayes_mdn.checkpoint import CHECKPOINT_VERSION
from bayes_mdn.io import FORMAT_VERSION


def _data(n: int = 64, d_x: int = 1, d_y: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d_x))
    Y = np.sin(2 * X[:, :1]) + 0.3 * rng.normal(size=(n, d_y)) + np.arange(d_y)
    return X, (Y[:, 0] if d_y == 1 else Y)


def _tiny(**options) -> BayesianMDN:
    # One member: these tests are about one fit's file and loop (ensembles: test_ensemble).
    base = dict(
        n_components=3,
        hidden=(8,),
        epochs=2,
        batch_size=32,
        progress=False,
        device="cpu",
        n_members=1,
    )
    return BayesianMDN(**(base | options))


def _assert_same_predictions(a: BayesianMDN, b: BayesianMDN, X, Y) -> None:
    np.testing.assert_array_equal(a.predict(X), b.predict(X))
    np.testing.assert_array_equal(a.sample(X, 4, seed=7), b.sample(X, 4, seed=7))
    np.testing.assert_array_equal(a.log_prob(X, Y), b.log_prob(X, Y))


def _all_params(est: BayesianMDN) -> dict[str, torch.Tensor]:
    return {f"model.{k}": v for k, v in est.model_.state_dict().items()} | {
        f"guide.{k}": v for k, v in est.guide_.state_dict().items()
    }


# -- round trips -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("guide", "bayesian", "covariance", "d_y"),
    [
        ("delta", "none", "diagonal", 1),
        ("delta", "all", "full", 2),
        ("normal", "last", "diagonal", 1),
        ("normal", "all", "full", 3),
        ("lowrank", "last", "full", 2),
        ("lowrank", "all", "diagonal", 1),
    ],
)
def test_round_trip_gives_identical_seeded_predictions(tmp_path, guide, bayesian, covariance, d_y):
    X, Y = _data(d_y=d_y)
    est = _tiny(guide=guide, bayesian=bayesian, covariance=covariance).fit(X, Y)
    path = tmp_path / "model.safetensors"
    est.save(path)
    back = load(path, device="cpu")
    _assert_same_predictions(est, back, X[:9], Y[:9])
    assert back.get_params() == est.get_params()
    assert back.history_ == est.history_
    assert (back.n_features_in_, back.n_outputs_, back._y_1d) == (1, d_y, d_y == 1)
    before, after = _all_params(est), _all_params(back)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_round_trip_keeps_float64_and_standardization(tmp_path):
    X, y = _data()
    est = _tiny(dtype="float64").fit(X * 1e3 + 5, y * 1e-4)
    est.save(tmp_path / "m")
    back = load(tmp_path / "m", device="cpu")
    assert all(
        t.dtype == torch.float64 for t in _all_params(back).values() if t.is_floating_point()
    )
    torch.testing.assert_close(back.model_.y_scale, est.model_.y_scale, rtol=0, atol=0)
    torch.testing.assert_close(back.model_.x_loc, est.model_.x_loc, rtol=0, atol=0)
    assert back.predict(X[:3] * 1e3 + 5).dtype == np.float64


def test_load_leaves_the_callers_random_stream_alone(tmp_path):
    X, y = _data()
    _tiny().fit(X, y).save(tmp_path / "m")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load(tmp_path / "m", device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_loaded_model_can_be_refitted(tmp_path):
    X, y = _data()
    _tiny(guide="lowrank").fit(X, y).save(tmp_path / "m")
    back = load(tmp_path / "m", device="cpu")
    assert np.isfinite(back.fit(X, y).score(X, y))


@given(
    n=st.integers(8, 40),
    d_x=st.integers(1, 3),
    d_y=st.integers(1, 3),
    k=st.integers(1, 4),
    dtype=st.sampled_from(["float32", "float64"]),
    combo=st.sampled_from(
        [("delta", "none"), ("delta", "last"), ("normal", "all"), ("lowrank", "last")]
    ),
    covariance=st.sampled_from(["diagonal", "full"]),
)
@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_round_trip_property(tmp_path, n, d_x, d_y, k, dtype, combo, covariance):
    X, Y = _data(n, d_x, d_y, seed=n)
    guide, bayesian = combo
    est = _tiny(
        n_components=k,
        hidden=(4,),
        epochs=1,
        dtype=dtype,
        guide=guide,
        bayesian=bayesian,
        covariance=covariance,
        val_fraction=0.0,
    ).fit(X, Y)
    path = tmp_path / f"m-{n}-{d_x}-{d_y}-{k}.safetensors"
    est.save(path)
    _assert_same_predictions(est, load(path, device="cpu"), X[:5], Y[:5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to save from")
def test_model_saved_on_gpu_loads_on_cpu(tmp_path):
    X, y = _data()
    est = _tiny(device="cuda").fit(X, y)
    est.save(tmp_path / "gpu")
    back = load(tmp_path / "gpu", device="cpu")
    assert back.model_.y_loc.device.type == "cpu" and back.device == "cpu"
    assert all(t.device.type == "cpu" for t in _all_params(back).values())
    np.testing.assert_allclose(back.predict(X[:5]), est.predict(X[:5]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(back.log_prob(X, y), est.log_prob(X, y), rtol=1e-4, atol=1e-4)


# -- bad files -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    X, y = _data()
    path = tmp_path_factory.mktemp("saved") / "model.safetensors"
    _tiny().fit(X, y).save(path)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load(tmp_path / "nope")


@pytest.mark.parametrize(
    "content", [b"", b"abc", b"\xff" * 64, b"not a model at all, just some text\n" * 10]
)
def test_garbage_files(tmp_path, content):
    path = tmp_path / "garbage"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match="not a bayes_mdn model file"):
        load(path, device="cpu")


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.99])
def test_truncated_file(tmp_path, saved, fraction):
    data = saved.read_bytes()
    path = tmp_path / "cut"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ModelFileError, match=r"truncated|not a bayes_mdn"):
        load(path, device="cpu")


def test_flipped_bit_in_weights_is_caught(tmp_path, saved):
    data = bytearray(saved.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's bytes; the layout stays valid
    path = tmp_path / "flipped"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum"):
        load(path, device="cpu")


def test_other_format_version_is_refused(tmp_path, saved):
    header = read_archive(saved, "model", FORMAT_VERSION)
    path = tmp_path / "future"
    write_archive(path, "model", FORMAT_VERSION + 1, header)
    with pytest.raises(ModelFileError, match=f"format version '{FORMAT_VERSION + 1}'"):
        load(path, device="cpu")


def test_checkpoint_is_not_a_model(tmp_path):
    X, y = _data()
    _tiny().fit(X, y, checkpoint=tmp_path / "ck")
    with pytest.raises(ModelFileError, match="kind 'checkpoint'"):
        load(tmp_path / "ck", device="cpu")


def test_unknown_parameter_in_file_is_refused(tmp_path, saved):
    header = read_archive(saved, "model", FORMAT_VERSION)
    header["params"]["attention_heads"] = 4
    write_archive(tmp_path / "newer", "model", FORMAT_VERSION, header)
    with pytest.raises(ModelFileError, match="attention_heads"):
        load(tmp_path / "newer", device="cpu")


def test_file_from_before_prior_functions_loads(tmp_path):
    """Files written before ``prior_function`` existed hold no such parameter and no
    ``prior.*`` tensors: they load as networks without a prior function."""
    X, y = _data()
    mdn = _tiny(prior_function=0.0).fit(X, y)
    mdn.save(tmp_path / "new")
    header = read_archive(tmp_path / "new", "model", FORMAT_VERSION)
    del header["params"]["prior_function"]
    write_archive(tmp_path / "old", "model", FORMAT_VERSION, header)
    back = load(tmp_path / "old", device="cpu")
    assert back.prior_function == 0.0
    np.testing.assert_array_equal(back.log_prob(X, y), mdn.log_prob(X, y))


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("params", "n_components", 7),
        ("params", "prior_function", 0.0),
        ("params", "bayesian", "quantum"),
        ("fitted", "n_outputs_", 2),
    ],
)
def test_inconsistent_but_well_formed_file_is_refused(tmp_path, saved, section, key, value):
    header = read_archive(saved, "model", FORMAT_VERSION)
    header[section][key] = value
    write_archive(tmp_path / "odd", "model", FORMAT_VERSION, header)
    with pytest.raises(ModelFileError, match="does not describe a model"):
        load(tmp_path / "odd", device="cpu")


class _Payload:
    """Unpickling this writes a file: the proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_payload_is_live_when_unpickled(tmp_path):
    # The payload below must really execute under pickle, or the next test proves nothing.
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("writer", ["pickle", "torch"])
def test_crafted_pickle_executes_nothing(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.safetensors"
    if writer == "pickle":
        path.write_bytes(pickle.dumps({"model": _Payload(marker)}))
    else:
        torch.save({"model": _Payload(marker), "w": torch.zeros(3)}, path)
    with pytest.raises(ModelFileError):
        load(path, device="cpu")
    assert not marker.exists()


def test_bad_arguments_of_save_and_load(tmp_path, saved):
    with pytest.raises(NotFittedError, match="not fitted"):
        _tiny().save(tmp_path / "x")
    with pytest.raises(TypeError, match="path must be"):
        load(42)
    with pytest.raises(ValueError, match="device"):
        load(saved, device="tpu:9")
    with pytest.raises(TypeError, match="estimator must be"):
        bayes_mdn.io.save(object(), tmp_path / "x")
    assert not (tmp_path / "x").exists()


# -- atomic writes ---------------------------------------------------------------------------
def test_failed_save_leaves_old_file_intact(tmp_path, monkeypatch):
    X, y = _data()
    path = tmp_path / "m"
    first = _tiny(seed=1).fit(X, y)
    first.save(path)
    old = path.read_bytes()

    def crash(fd: int) -> None:
        raise OSError("disk pulled out mid-write")

    second = _tiny(seed=2).fit(X, y)
    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="mid-write"):
        second.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary file left behind
    _assert_same_predictions(first, load(path, device="cpu"), X[:5], y[:5])


def test_nan_model_is_never_written(tmp_path):
    X, y = _data()
    est = _tiny().fit(X, y)
    with torch.no_grad():
        next(iter(est.guide_.parameters())).fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        est.save(tmp_path / "m")
    assert not (tmp_path / "m").exists()


# -- checkpoint and resume -------------------------------------------------------------------
@pytest.fixture
def validate_every_epoch():
    """Validation after every epoch (one step between checks), so that a crash can be
    placed at any epoch; held outside the test's own monkeypatch, which the resume tests
    undo."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fit_module.FitConfig, "eval_steps", lambda self, n, batch: 1)
        yield


def _crash_at_validation(monkeypatch, call: int) -> None:
    """Make the ``call``-th validation (the end of epoch ``call - 1``) raise."""
    original = fit_module.validation_nll
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(fit_module, "validation_nll", flaky)


@pytest.mark.parametrize(
    ("options", "crash_at"),
    [
        (dict(guide="normal", lr_schedule="onecycle"), 4),
        (dict(guide="lowrank", bayesian="all", lr_schedule="cosine", num_particles=2), 6),
        (dict(guide="delta", bayesian="none", lr_schedule="constant", covariance="full"), 3),
        # stops early at epoch 2, right after the resume: the stale counter must survive
        (dict(guide="normal", patience=2, lr=0.5), 3),
    ],
)
def test_resumed_fit_equals_uninterrupted_fit(
    tmp_path, monkeypatch, validate_every_epoch, options, crash_at
):
    X, Y = _data(d_y=2 if options.get("covariance") == "full" else 1)
    settings_ = dict(epochs=7, batch_size=16, val_fraction=0.25, patience=None) | options
    reference = _tiny(**settings_).fit(X, Y)

    ck = tmp_path / "fit.ckpt"
    _crash_at_validation(monkeypatch, crash_at)
    with pytest.raises(KeyboardInterrupt):
        _tiny(**settings_).fit(X, Y, checkpoint=ck, checkpoint_every=2)
    monkeypatch.undo()
    saved = read_archive(ck, "checkpoint", CHECKPOINT_VERSION)
    assert 0 < saved["epoch"] < crash_at
    resumed = _tiny(**settings_).fit(X, Y, checkpoint=ck, checkpoint_every=2, resume=True)

    before, after = _all_params(reference), _all_params(resumed)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "resume changed parameters"
    assert resumed.history_.train_loss == reference.history_.train_loss
    assert resumed.history_.val_nll == reference.history_.val_nll
    assert resumed.history_.best_epoch == reference.history_.best_epoch
    assert resumed.history_.stopped_early == reference.history_.stopped_early
    assert resumed.history_.steps == reference.history_.steps


def test_resuming_a_finished_fit_changes_nothing(tmp_path):
    X, y = _data()
    ck = tmp_path / "ck"
    first = _tiny(epochs=3).fit(X, y, checkpoint=ck)
    again = _tiny(epochs=3).fit(X, y, checkpoint=ck, resume=True)
    assert again.history_.train_loss == first.history_.train_loss
    assert all(
        torch.equal(a, b) for a, b in zip(_all_params(first).values(), _all_params(again).values())
    )


def test_resume_without_a_file_starts_afresh(tmp_path):
    X, y = _data()
    fresh = _tiny().fit(X, y)
    resumed = _tiny().fit(X, y, checkpoint=tmp_path / "none-yet", resume=True)
    np.testing.assert_array_equal(fresh.predict(X[:4]), resumed.predict(X[:4]))
    assert (tmp_path / "none-yet").exists()


def test_resume_refuses_other_settings_and_data(tmp_path):
    X, y = _data()
    ck = tmp_path / "ck"
    _tiny(epochs=2).fit(X, y, checkpoint=ck)
    with pytest.raises(ValueError, match=r"other settings \(epochs: checkpoint 2, now 3; lr: "):
        _tiny(epochs=3, lr=0.05).fit(X, y, checkpoint=ck, resume=True)
    with pytest.raises(ValueError, match="other data"):
        _tiny(epochs=2).fit(X, y + 1, checkpoint=ck, resume=True)
    # progress changes no number, so it may differ
    _tiny(epochs=2, progress=False).fit(X, y, checkpoint=ck, resume=True)


@pytest.mark.parametrize(
    ("setting", "value", "shown"),
    [
        ("activation", "tanh", "'relu', now 'tanh'"),
        ("min_scale", 0.05, "0.02, now 0.05"),
        ("prior_scale", 1.0, "32.0, now 1.0"),
        ("init_scale", 0.01, "0.001, now 0.01"),
        ("n_components", 4, "3, now 4"),
        ("hidden", (16,), "[8], now [16]"),
        ("bayesian", "all", "'last', now 'all'"),
        ("guide", "lowrank", "'normal', now 'lowrank'"),
        ("dtype", "float64", "'float32', now 'float64'"),
        ("covariance", "full", "'diagonal', now 'full'"),
    ],
)
def test_resume_refuses_changed_model_settings(
    tmp_path, monkeypatch, validate_every_epoch, setting, value, shown
):
    # Each of these once resumed silently into a fit matching neither setting, or failed
    # in load_state_dict with a raw RuntimeError, or (dtype) blamed the data.
    X, y = _data()
    ck = tmp_path / "ck"
    _crash_at_validation(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _tiny(epochs=4, val_fraction=0.25).fit(X, y, checkpoint=ck, checkpoint_every=1)
    monkeypatch.undo()
    changed = _tiny(epochs=4, val_fraction=0.25, **{setting: value})
    with pytest.raises(
        ValueError, match=re.escape(f"other settings ({setting}: checkpoint {shown})")
    ):
        changed.fit(X, y, checkpoint=ck, resume=True)


def test_resume_names_every_changed_setting_and_accepts_equal_ones(tmp_path):
    X, y = _data()
    ck = tmp_path / "ck"
    _tiny(epochs=2).fit(X, y, checkpoint=ck)
    with pytest.raises(ValueError) as err:
        _tiny(epochs=2, activation="tanh", min_scale=0.1).fit(X, y, checkpoint=ck, resume=True)
    assert "activation: checkpoint 'relu', now 'tanh'; min_scale: checkpoint 0.02" in str(
        err.value
    )
    assert "other data" not in str(err.value)
    # A list for the tuple, and the bookkeeping arguments, change nothing that is fitted.
    again = _tiny(epochs=2, hidden=[8], num_threads=1)
    assert again.fit(X, y, checkpoint=str(ck), checkpoint_every=5, resume=True).history_.steps == 4


def _low_level(tmp_path, ck, **model_options):
    from tests.helpers import model_and_guide, small_data

    model, guide = model_and_guide("last", "normal", **model_options)
    x, y = small_data(40)
    dtype = model.prior_scale.dtype
    config = fit_module.FitConfig(epochs=2, batch_size=20, progress=False, device="cpu")
    return fit_module.fit_svi(
        model, guide, x.to(dtype), y.to(dtype), config, checkpoint=ck, resume=True
    )


def test_low_level_resume_names_structure_dtype_and_constants(tmp_path):
    ck = tmp_path / "ck"
    _low_level(tmp_path, ck)
    with pytest.raises(
        ValueError, match=r"shape of model.net.head.bias: checkpoint \(9,\), now \(12,\)"
    ):
        _low_level(tmp_path, ck, k=4)
    with pytest.raises(ValueError, match=r"parameters only in the model now: model.net.hidden.1"):
        _low_level(tmp_path, ck, hidden=(8, 8))
    with pytest.raises(
        ValueError, match=r"other constants \(model.prior_scale: checkpoint 1, now 2;"
    ):
        _low_level(tmp_path, ck, prior_scale=2.0)
    torch.set_default_dtype(torch.float64)
    try:
        with pytest.raises(
            ValueError, match=r"\(dtype: checkpoint torch.float32, now torch.float64\)"
        ):
            _low_level(tmp_path, ck)
    finally:
        torch.set_default_dtype(torch.float32)
    _low_level(tmp_path, ck)  # the same model still resumes


def test_resume_identity_is_stored_and_compared(tmp_path):
    from tests.helpers import model_and_guide, small_data

    x, y = small_data(40)
    ck = tmp_path / "ck"
    config = fit_module.FitConfig(epochs=2, batch_size=20, progress=False, device="cpu")

    def run(identity):
        model, guide = model_and_guide("last", "normal")
        return fit_module.fit_svi(
            model, guide, x, y, config, checkpoint=ck, resume=True, identity=identity
        )

    run({"activation": "tanh", "width": (8,), "path": Path("a")})
    saved = read_archive(ck, "checkpoint", CHECKPOINT_VERSION)
    assert saved["identity"] == {"activation": "tanh", "width": [8], "path": "a"}
    run({"activation": "tanh", "width": [8], "path": "a"})
    with pytest.raises(ValueError, match=r"\(activation: checkpoint 'tanh', now 'elu'\)"):
        run({"activation": "elu", "width": [8], "path": "a"})
    with pytest.raises(ValueError, match=r"added: checkpoint None, now 1"):
        run({"activation": "tanh", "width": [8], "path": "a", "added": 1})


def test_resume_names_other_data_shapes(tmp_path):
    X, y = _data()
    ck = tmp_path / "ck"
    _tiny(epochs=2).fit(X, y, checkpoint=ck)
    with pytest.raises(
        ValueError, match=r"other data \(x and y of shapes \(64, 1\) and \(64, 1\), now \(60, 1\)"
    ):
        _tiny(epochs=2).fit(X[:60], y[:60], checkpoint=ck, resume=True)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (dict(resume=True), ValueError, "resume=True needs a checkpoint"),
        (dict(checkpoint=3.5), TypeError, "checkpoint must be"),
        (dict(checkpoint="c", checkpoint_every=0), ValueError, "checkpoint_every must be"),
        (dict(checkpoint="c", resume="yes"), TypeError, "resume must be"),
    ],
)
def test_bad_checkpoint_arguments(tmp_path, options, error, match):
    X, y = _data()
    with pytest.raises(error, match=match):
        _tiny().fit(X, y, **options)


def test_constructor_checkpoint_arguments_still_work_with_a_warning(tmp_path):
    """0.1 code passes the checkpoint to the constructor: it still resumes, and is told to
    pass it to fit instead."""
    X, y = _data()
    ck = tmp_path / "ck"
    first = _tiny(epochs=2).fit(X, y, checkpoint=ck)
    with pytest.warns(FutureWarning, match=r"pass it to fit\(X, y, checkpoint=..., resume="):
        again = _tiny(epochs=2, checkpoint=ck, resume=True).fit(X, y)
    np.testing.assert_array_equal(again.log_prob(X, y), first.log_prob(X, y))
    assert again.history_.steps == first.history_.steps
    # The call's own argument wins over the constructor's.
    with pytest.warns(FutureWarning):
        _tiny(epochs=2, checkpoint=tmp_path / "unused").fit(X, y, checkpoint=ck, resume=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
