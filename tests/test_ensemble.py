"""Ensembles of independently fitted members pooled into one predictive mixture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from bayes_mdn import BayesianMDN, make_inverse_sine
from bayes_mdn._utils import pyro_scope, seeded
from bayes_mdn.guides import EnsembleGuide, draw_latents

FAST = {"n_components": 3, "hidden": (8,), "epochs": 4, "batch_size": 64, "progress": False}


@pytest.fixture(scope="module")
def data():
    return make_inverse_sine(200, seed=0)


@pytest.mark.parametrize("guide", ["delta", "normal"])
def test_ensemble_density_is_the_mean_of_member_densities(data, guide):
    X, y = data
    ens = BayesianMDN(**FAST, n_members=3, guide=guide, num_draws=300, seed=5).fit(X, y)
    assert isinstance(ens.guide_, EnsembleGuide) and len(ens.guide_) == 3
    members = [
        BayesianMDN(**FAST, n_members=1, guide=guide, num_draws=300, seed=5 + m).fit(X, y)
        for m in range(3)
    ]
    # Member m of the ensemble is the single fit seeded seed + m.
    for m, single in enumerate(members):
        for a, b in zip(ens.guide_.models[m].parameters(), single.model_.parameters()):
            torch.testing.assert_close(a, b)
    log_p = np.stack([mdn.log_prob(X[:50], y[:50]) for mdn in members])
    pooled = logsumexp(log_p, 0) - np.log(3)
    if guide == "delta":
        # Deterministic members: the pooled density is exact.
        np.testing.assert_allclose(ens.log_prob(X[:50], y[:50]), pooled, rtol=1e-5, atol=1e-5)
    else:
        # 100 draws a member against 300: a Monte Carlo difference, small for a short fit.
        np.testing.assert_allclose(ens.log_prob(X[:50], y[:50]), pooled, atol=0.05)


def test_ensemble_of_map_members_needs_one_draw_each(data):
    X, y = data
    ens = BayesianMDN(**FAST, n_members=4, guide="delta").fit(X, y)
    params = ens.predictive_mixture(X[:5])
    # 4 members x K = 3 components, whatever num_draws asks for.
    assert params.logits.shape == (5, 12)


def test_draws_are_balanced_and_replace_every_parameter(data):
    X, y = data
    ens = BayesianMDN(**FAST, n_members=3, guide="normal").fit(X, y)
    guide = ens.guide_
    with pyro_scope(), seeded(0), torch.no_grad():
        which = guide.assignment(10)
        draws = draw_latents(guide, 10)
    assert sorted(torch.bincount(which, minlength=3).tolist()) == [3, 3, 4]
    names = {n for n, _ in ens.model_.net.named_parameters()}
    assert set(draws) == names
    # A point-estimated layer takes the value of the member each draw belongs to.
    hidden = dict(guide.models[1].net.named_parameters())["hidden.0.weight"]
    with pyro_scope(), seeded(0), torch.no_grad():
        draws = guide.draw(10)  # the same assignment: draw() makes it first, from seed 0
    for s in (which == 1).nonzero().flatten():
        torch.testing.assert_close(draws["hidden.0.weight"][s], hidden)


def test_ensemble_predictions_shapes_and_seeds(data):
    X, y = data
    ens = BayesianMDN(**FAST, n_members=2).fit(X, y)
    assert ens.n_members_ == 2 and len(ens.histories_) == 2
    assert ens.n_steps_ == sum(h.steps for h in ens.histories_)
    draws = ens.sample(X[:6], n_samples=9, seed=1)
    assert draws.shape == (9, 6)
    np.testing.assert_array_equal(draws, ens.sample(X[:6], n_samples=9, seed=1))
    np.testing.assert_array_equal(ens.sample(X[:6], 9, seed=1, sampler="direct").shape, (9, 6))
    lo, hi = ens.predict_interval(X[:6])
    assert (lo < hi).all()
    parts = ens.uncertainty(X[:6])
    np.testing.assert_allclose(parts["total"], parts["aleatoric"] + parts["epistemic"], rtol=1e-5)


def test_one_member_is_a_plain_fit(data):
    X, y = data
    single = BayesianMDN(**FAST, n_members=1).fit(X, y)
    assert not isinstance(single.guide_, EnsembleGuide)


def test_bad_n_members():
    X, y = make_inverse_sine(20, seed=0)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="n_members"):
            BayesianMDN(**FAST, n_members=bad).fit(X, y)


def test_members_in_worker_processes_give_the_same_fit(data):
    X, y = data
    kw = {**FAST, "n_members": 2}
    serial = BayesianMDN(**kw).fit(X, y)
    parallel = BayesianMDN(**kw, n_jobs=2).fit(X, y)
    np.testing.assert_array_equal(serial.log_prob(X, y), parallel.log_prob(X, y))
    assert [h.steps for h in serial.histories_] == [h.steps for h in parallel.histories_]


def test_ensemble_save_and_load_round_trip(data, tmp_path):
    from bayes_mdn import load

    X, y = data
    ens = BayesianMDN(**FAST, n_members=3).fit(X, y)
    ens.save(tmp_path / "ens.bmdn")
    back = load(tmp_path / "ens.bmdn", device="cpu")
    assert isinstance(back.guide_, EnsembleGuide) and back.n_members_ == 3
    assert [h.steps for h in back.histories_] == [h.steps for h in ens.histories_]
    np.testing.assert_array_equal(back.log_prob(X, y), ens.log_prob(X, y))
    np.testing.assert_array_equal(back.sample(X[:4], 5, seed=2), ens.sample(X[:4], 5, seed=2))


def test_ensemble_checkpoints_resume_member_by_member(data, tmp_path):
    X, y = data
    ck = tmp_path / "ck"
    kw = {**FAST, "n_members": 2, "checkpoint": ck, "checkpoint_every": 2}
    first = BayesianMDN(**kw).fit(X, y)
    assert sorted(p.name for p in tmp_path.glob("ck*")) == ["ck.member0", "ck.member1"]
    # Every member's loop is finished: resuming restores the same ensemble.
    again = BayesianMDN(**kw, resume=True).fit(X, y)
    np.testing.assert_array_equal(again.log_prob(X, y), first.log_prob(X, y))
    # Worker processes change no number, so they may resume an in-process fit.
    workers = BayesianMDN(**kw, resume=True, n_jobs=2).fit(X, y)
    np.testing.assert_array_equal(workers.log_prob(X, y), first.log_prob(X, y))
    # A changed setting is refused for the ensemble as for one fit.
    with pytest.raises(ValueError, match="other settings"):
        BayesianMDN(**{**kw, "lr": 0.02}, resume=True).fit(X, y)
