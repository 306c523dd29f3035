"""Checkpoints of the training loops: argument checks, the recorded identity, and a loop
state written, checked against the live fit and restored. End-to-end resumes of fits
are in test_io.py (one fit), test_ensemble.py (stacked) and test_streaming.py."""

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from bayes_mdn._archive import read_archive
from bayes_mdn._utils import pyro_scope
from bayes_mdn.checkpoint import (
    CHECKPOINT_VERSION,
    _data_identity,
    _plain,
    _read_checkpoint,
    _restore_loop,
    _write_checkpoint,
    check_checkpoint_args,
    checkpoint_identity,
)
from bayes_mdn.config import FitConfig, FitHistory
from bayes_mdn.fit import ParameterAverage
from bayes_mdn.losses import make_loss
from tests.helpers import model_and_guide, small_data

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((3.5, 10, False), TypeError, "checkpoint must be None, a str or os.PathLike, got float"),
        (("c", 0, False), ValueError, "checkpoint_every must be an integer >= 1, got 0"),
        (("c", True, False), ValueError, "checkpoint_every must be an integer >= 1, got True"),
        (("c", 10, "yes"), TypeError, "resume must be True or False, got 'yes'"),
        ((None, 10, True), ValueError, "resume=True needs a checkpoint file"),
    ],
)
def test_bad_checkpoint_arguments(args, error, match):
    with pytest.raises(error, match=match):
        check_checkpoint_args(*args)


def test_good_checkpoint_arguments_pass():
    check_checkpoint_args(None, 1, False)
    check_checkpoint_args(Path("ck"), 5, True)


def test_identity_leaves_out_the_bookkeeping_arguments_only():
    bookkeeping = dict.fromkeys(
        ["progress", "checkpoint", "checkpoint_every", "resume", "num_threads", "n_jobs"], 1
    )
    params = {"hidden": (8,), "lr": 0.01, "devices": 2} | bookkeeping
    assert checkpoint_identity(params) == {"hidden": (8,), "lr": 0.01}


def test_identity_values_are_stored_in_their_json_like_form():
    value = {
        "hidden": (8, 4),
        "path": Path("a") / "b",
        3: np.int64(3),
        "scale": torch.tensor(0.5),
        "dtype": torch.float64,
        "nan": math.nan,
        "other": slice(1, 2),
    }
    assert _plain(value) == {
        "hidden": [8, 4],
        "path": str(Path("a") / "b"),
        "3": 3,
        "scale": 0.5,
        "dtype": "torch.float64",
        "nan": "nan",
        "other": "slice(1, 2, None)",
    }


def _loop():
    """A mean-field loss after one step: (config, loss, optimizer, scheduler, x, y)."""
    model, guide = model_and_guide("last", "normal")
    x, y = small_data(40)
    config = FitConfig(epochs=2, batch_size=20, progress=False, device="cpu")
    loss = make_loss(model, guide, config)
    optimizer = torch.optim.Adam(loss.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    with pyro_scope():
        loss(x, y).backward()
    optimizer.step()
    scheduler.step()
    return config, loss, optimizer, scheduler, x, y


def _written(path):
    config, loss, optimizer, scheduler, x, y = _loop()
    data = _data_identity(x, y)
    history = FitHistory(train_loss=[1.5], val_nll=[1.25], val_epochs=[0], steps=2, epochs=2)
    best = {k: v.clone() for k, v in loss.state_dict().items()}
    identity = {"hidden": [8]}
    _write_checkpoint(
        path,
        1,
        config,
        identity,
        data,
        loss,
        optimizer,
        scheduler,
        history,
        best,
        0.25,
        0,
        CPU,
        ParameterAverage(loss, config.ema_decay),
    )
    return config, identity, data, loss, optimizer, history


def test_a_loop_state_is_restored_as_written(tmp_path):
    ck = tmp_path / "ck"
    torch.manual_seed(5)
    config, identity, data, loss, optimizer, history = _written(ck)
    assert read_archive(ck, "checkpoint", CHECKPOINT_VERSION)["epoch"] == 1
    # A fresh loop of the same structure: other weights, other random state.
    _, fresh, fresh_optimizer, fresh_scheduler, _, _ = _loop()
    saved = _read_checkpoint(ck, config, identity, data, fresh)
    first, best_score, stale, best_state, restored = _restore_loop(
        saved, fresh, fresh_optimizer, fresh_scheduler, CPU
    )
    rng = torch.get_rng_state()
    assert (first, best_score, stale) == (1, 0.25, 0)
    assert restored == history
    # The random state is back where the written loop had it: after one _loop from seed 5.
    torch.manual_seed(5)
    _loop()
    assert torch.equal(torch.get_rng_state(), rng)
    live = loss.state_dict()
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in live.items())
    assert all(torch.equal(best_state[k], v) for k, v in live.items())
    assert fresh_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()


def test_reading_names_what_differs(tmp_path):
    ck = tmp_path / "ck"
    config, identity, data, loss, _, _ = _written(ck)
    x, y = small_data(40)
    with pytest.raises(ValueError, match=r"other settings \(lr: checkpoint 0.003, now 0.01\)"):
        _read_checkpoint(ck, replace(config, lr=0.01), identity, data, loss)
    with pytest.raises(ValueError, match=r"other settings \(hidden: checkpoint \[8\], now \[16\]"):
        _read_checkpoint(ck, config, {"hidden": [16]}, data, loss)
    with pytest.raises(ValueError, match=r"other data \(x or y differ\)"):
        _read_checkpoint(ck, config, identity, _data_identity(x, y + 1), loss)
    with pytest.raises(ValueError, match=r"shapes \(40, 1\) and \(40, 1\), now \(30, 1\)"):
        _read_checkpoint(ck, config, identity, _data_identity(x[:30], y[:30]), loss)
    # progress changes no number: a resume may change it.
    _read_checkpoint(ck, replace(config, progress=True), identity, data, loss)
