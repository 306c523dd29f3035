import math

import pytest
import torch

from bayes_mdn.config import EVAL_STEPS, FitConfig
from bayes_mdn.fit import ParameterAverage, fit_svi, split_indices
from tests.helpers import model_and_guide, small_data

FAST = {"epochs": 6, "batch_size": 16, "progress": False, "device": "cpu", "val_fraction": 0.1}


@pytest.mark.parametrize("guide", ["delta", "normal", "lowrank"])
def test_history_and_improvement(guide):
    model, g = model_and_guide("last", guide)
    x, y = small_data(80)
    history = fit_svi(model, g, x, y, FitConfig(**FAST | {"epochs": 30, "patience": None}))
    steps_per_epoch = math.ceil(72 / 16)
    # Validation runs every ceil(EVAL_STEPS / steps per epoch) epochs, and after the last.
    every = math.ceil(EVAL_STEPS / steps_per_epoch)
    assert len(history.train_loss) == 30 and history.epochs == 30
    assert history.val_epochs == sorted({*range(every - 1, 30, every), 29})
    assert len(history.val_nll) == len(history.val_epochs)
    assert history.steps == 30 * steps_per_epoch
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
    # It stopped at the first validation at least `patience` epochs after the best one.
    assert history.val_epochs[-1] - history.best_epoch >= 2
    assert history.val_epochs[-2] - history.best_epoch < 2
    assert len(history.train_loss) == history.val_epochs[-1] + 1
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
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"ema_decay": 0.0}, "ema_decay"),
        ({"ema_decay": float("nan")}, "ema_decay"),
        ({"ema_decay": True}, "ema_decay"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FitConfig(**kwargs)


def test_bad_seed_type():
    with pytest.raises(TypeError, match="seed"):
        FitConfig(seed="1")


def test_auto_schedule_counts_steps_not_epochs():
    from bayes_mdn.config import AUTO_PATIENCE_STEPS, AUTO_STEPS

    config = FitConfig()
    # 133 rows in one batch: one step an epoch, so the budget is AUTO_STEPS epochs and
    # validation runs every EVAL_STEPS epochs.
    assert config.schedule(133) == (133, AUTO_STEPS, EVAL_STEPS, AUTO_PATIENCE_STEPS)
    # A million rows in batches of 500: 2,000 steps an epoch.
    batch, epochs, every, patience = config.schedule(1_000_000)
    assert (batch, epochs, every) == (500, -(-AUTO_STEPS // 2000), 1)
    assert patience == 3  # at least three validation checks
    # 10,000 rows with 10% held out: a check of 1,000 rows x 16 draws costs several
    # training steps, so checks are spaced out further than EVAL_STEPS.
    with_split = FitConfig(val_fraction=0.1)
    assert EVAL_STEPS < with_split.eval_steps(9000, 500) <= AUTO_PATIENCE_STEPS // 4
    assert with_split.schedule(9000)[2] == -(-with_split.eval_steps(9000, 500) // 18)
    assert with_split.eval_steps(120, 120) == EVAL_STEPS  # small data: the floor
    # Explicit settings win.
    assert FitConfig(epochs=7, patience=2).schedule(100)[1:] == (7, EVAL_STEPS, 2)
    with pytest.raises(ValueError, match="epochs"):
        FitConfig(epochs="many")


def test_parameter_average_follows_its_recursion_and_puts_the_live_values_back():
    module = torch.nn.Linear(1, 1, bias=False)
    average = ParameterAverage(module, 0.9)
    expected = module.weight.detach().clone()
    for t in range(1, 40):
        with torch.no_grad():
            module.weight.fill_(float(t))
        average.update()
        decay = min(0.9, (1 + t) / (10 + t))
        expected = decay * expected + (1 - decay) * float(t)
    assert average.average[0] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(RuntimeError, match="inside"):
        with average.applied():
            assert module.weight.item() == pytest.approx(expected.item(), rel=1e-6)
            raise RuntimeError("inside")
    assert module.weight.item() == 39.0
    copy = ParameterAverage(module, 0.9)
    copy.load_state_dict(average.state_dict())
    assert copy.updates == 39 and torch.equal(copy.average[0], average.average[0])
    copy.load_state_dict(None)  # a checkpoint written without an average
    assert copy.updates == 0 and copy.average[0].item() == 39.0
    off = ParameterAverage(module, None)
    off.update()
    with off.applied():
        assert module.weight.item() == 39.0


def test_a_fit_keeps_the_average_of_its_iterates():
    """Without a held-out split the fit keeps the average of the iterates, which a
    constant learning rate lets us rebuild from the ends of shorter fits of the same
    seed (each a prefix of the longer one's trajectory)."""
    x, y = small_data(40)
    base = FAST | {"val_fraction": 0.0, "batch_size": None, "lr_schedule": "constant"}

    def weights(epochs, ema_decay):
        torch.manual_seed(7)
        model, g = model_and_guide("none", "delta")
        fit_svi(model, g, x, y, FitConfig(**base | {"epochs": epochs, "ema_decay": ema_decay}))
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    expected = _initial_weights()
    for t in range(1, 9):
        decay = min(0.5, (1 + t) / (10 + t))
        expected = decay * expected + (1 - decay) * weights(t, None)
    averaged = weights(8, 0.5)
    last = weights(8, None)
    assert torch.allclose(averaged, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(averaged, last, rtol=1e-3, atol=1e-4)


def _initial_weights():
    torch.manual_seed(7)
    model, _ = model_and_guide("none", "delta")
    return torch.cat([p.detach().flatten() for p in model.parameters()])
