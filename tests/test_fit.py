import math

import pytest
import torch

from bayes_mdn.fit import FitConfig, fit_svi, split_indices
from tests.helpers import model_and_guide, small_data

FAST = {"epochs": 6, "batch_size": 16, "progress": False, "device": "cpu", "val_fraction": 0.1}


@pytest.mark.parametrize("guide", ["delta", "normal", "lowrank"])
def test_history_and_improvement(guide):
    model, g = model_and_guide("last", guide)
    x, y = small_data(80)
    history = fit_svi(model, g, x, y, FitConfig(**FAST | {"epochs": 30, "patience": None}))
    assert len(history.train_loss) == 30 and len(history.val_nll) == 30
    assert history.steps == 30 * math.ceil(72 / 16)
    assert history.train_loss[-1] < history.train_loss[0]
    assert all(math.isfinite(v) for v in history.train_loss + history.val_nll)


def test_early_stopping_restores_the_best_state():
    model, g = model_and_guide("none", "delta")
    x, y = small_data(80)
    # A constant, large learning rate makes validation scores bounce: patience 2 stops early.
    config = FitConfig(
        **FAST | {"epochs": 200, "lr": 0.05, "lr_schedule": "constant", "patience": 2}
    )
    history = fit_svi(model, g, x, y, config)
    assert history.stopped_early
    assert len(history.val_nll) == history.best_epoch + 3
    _, val_idx = split_indices(80, config.val_fraction, config.seed)
    with torch.no_grad():
        kept = -model.log_predictive_density(x[val_idx], y[val_idx]).mean().item()
    assert kept == pytest.approx(min(history.val_nll), rel=1e-5)


def test_same_seed_same_fit_and_caller_rng_untouched():
    states = []
    for _ in range(2):
        torch.manual_seed(123)
        model, g = model_and_guide("last", "normal")
        x, y = small_data(40)
        fit_svi(model, g, x, y, FitConfig(**FAST))
        states.append({k: v.clone() for k, v in g.state_dict().items()})
        after = torch.rand(1)
    torch.manual_seed(123)
    model_and_guide("last", "normal")
    assert torch.equal(after, torch.rand(1))
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_vectorized_particles_and_full_batch():
    model, g = model_and_guide("all", "normal")
    x, y = small_data(40)
    history = fit_svi(model, g, x, y, FitConfig(**FAST | {"num_particles": 4, "batch_size": None}))
    assert history.steps == 6


def test_no_validation_split():
    model, g = model_and_guide("last", "delta")
    x, y = small_data(40)
    history = fit_svi(model, g, x, y, FitConfig(**FAST | {"val_fraction": 0.0}))
    assert history.val_nll == [] and history.best_epoch == 5


def test_non_finite_loss_stops_with_a_clear_error():
    model, g = model_and_guide("none", "delta")
    x, y = small_data(40)
    y[5] = 1e30  # squared residuals overflow float32: the loss becomes inf
    with pytest.raises(FloatingPointError, match="step"):
        fit_svi(model, g, x, y, FitConfig(**FAST | {"val_fraction": 0.0}))
    for p in model.parameters():
        assert torch.isfinite(p).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"lr_schedule": "step"}, "lr_schedule"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"num_particles": 0}, "num_particles"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"patience": 0}, "patience"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FitConfig(**kwargs)


def test_bad_seed_type():
    with pytest.raises(TypeError, match="seed"):
        FitConfig(seed="1")
