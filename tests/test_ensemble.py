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
    x = torch.as_tensor(X[:50], dtype=torch.float32)
    t = torch.as_tensor(y[:50, None], dtype=torch.float32)
    log_p = []
    with pyro_scope(), seeded(1), torch.no_grad():
        for model, guide_m in ens.guide_.members:
            weights = draw_latents(guide_m, 1 if guide == "delta" else 300)
            log_p.append(model.log_predictive_density(x, t, weights).numpy())
    pooled = logsumexp(np.stack(log_p), 0) - np.log(3)
    if guide == "delta":
        # Deterministic members: the pooled density is exact.
        np.testing.assert_allclose(ens.log_prob(X[:50], y[:50]), pooled, rtol=1e-5, atol=1e-5)
    else:
        # 100 draws a member against 300: a Monte Carlo difference, small for a short fit.
        np.testing.assert_allclose(ens.log_prob(X[:50], y[:50]), pooled, atol=0.05)


@pytest.mark.parametrize("options", [dict(guide="delta"), dict(bayesian="none", guide="delta")])
def test_stacked_members_follow_the_fits_they_would_have_alone(data, options):
    """Stacked training changes no member's update rule: with every random choice of the
    loop switched off (full batches, no input noise, no validation split), member m of a
    stacked ensemble is the single fit seeded seed + m, to float64 rounding."""
    X, y = data
    kw = dict(
        FAST,
        epochs=30,
        batch_size=None,
        input_noise=0.0,
        val_fraction=0.0,
        dtype="float64",
        seed=3,
        **options,
    )
    ens = BayesianMDN(**kw, n_members=3).fit(X, y)
    for m in range(3):
        single = BayesianMDN(**{**kw, "seed": 3 + m}, n_members=1).fit(X, y)
        np.testing.assert_allclose(
            ens.histories_[m].train_loss, single.history_.train_loss, rtol=1e-9
        )
        member = torch.nn.utils.parameters_to_vector(
            list(ens.guide_.models[m].parameters()) + list(ens.guide_.guides[m].parameters())
        )
        alone = torch.nn.utils.parameters_to_vector(
            list(single.model_.parameters()) + list(single.guide_.parameters())
        )
        torch.testing.assert_close(member, alone, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("particles", [1, 3])
def test_stacked_mean_field_loss_is_each_members_negative_elbo(data, particles):
    from bayes_mdn.config import FitConfig
    from bayes_mdn.losses import make_loss
    from bayes_mdn.stacked import StackedLoss

    X, y = data
    spec = BayesianMDN(**FAST, n_members=2, guide="normal", bayesian="all").model_spec()
    x = torch.as_tensor(X, dtype=torch.float32)
    t = torch.as_tensor(y[:, None], dtype=torch.float32)
    stats = (x.mean(0), x.std(0), t.mean(0), t.std(0))
    with pyro_scope():
        losses = []
        for seed in (0, 1):
            model, guide = spec.build(1, 1, 3, stats, seed)
            loss = make_loss(model, guide, FitConfig())
            loss(x[:8], t[:8], subsample=torch.arange(8), n_total=len(x))
            losses.append(loss)
        stack = StackedLoss(losses, num_particles=particles)
        xb, yb = torch.stack([x[:20], x[20:40]]), torch.stack([t[:20], t[20:40]])
        with seeded(7):
            got = stack(xb, yb, len(x))
        with seeded(7):
            eps = {
                name: torch.randn(2, particles, *loc.shape[1:])
                for name, loc in zip(stack.latent_names, stack.locs)
            }
    for m, loss in enumerate(losses):
        model, guide = loss.model, loss.guide
        elbos = []
        for p in range(particles):
            w, log_q = {}, 0.0
            for name in model.latent_names:
                loc = guide.locs.get_submodule(name.rsplit(".", 1)[0])
                loc_t = getattr(loc, name.rsplit(".", 1)[1])
                scale_m = guide.scales.get_submodule(name.rsplit(".", 1)[0])
                scale_t = getattr(scale_m, name.rsplit(".", 1)[1])
                w[name] = loc_t + eps[name][m, p] * scale_t
                log_q = log_q + torch.distributions.Normal(loc_t, scale_t).log_prob(w[name]).sum()
            log_lik = model.log_density(xb[m], yb[m], w).sum() * len(x) / 20
            elbos.append(log_lik + model.log_prior(w) - log_q)
        expected = -torch.stack(elbos).mean()
        torch.testing.assert_close(got[m], expected, rtol=1e-5, atol=1e-3)


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
    # A low-rank guide cannot be stacked: its members are fitted one by one, in this
    # process or in workers.
    X, y = data
    kw = {**FAST, "n_members": 2, "guide": "lowrank"}
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
    # Each member keeps its own randomized prior function (the default), and the file
    # keeps them.
    priors = [dict(m.net.prior.named_parameters()) for m in back.guide_.models]
    assert not torch.equal(priors[0]["0.weight"], priors[1]["0.weight"])
    for m, member in enumerate(ens.guide_.models):
        for name, value in member.net.prior.named_parameters():
            torch.testing.assert_close(priors[m][name], value, rtol=0, atol=0)


def test_ensemble_checkpoints_resume_member_by_member(data, tmp_path):
    X, y = data
    ck = tmp_path / "ck"
    kw = {**FAST, "n_members": 2, "guide": "lowrank"}
    ckw = {"checkpoint": ck, "checkpoint_every": 2}
    first = BayesianMDN(**kw).fit(X, y, **ckw)
    assert sorted(p.name for p in tmp_path.glob("ck*")) == ["ck.member0", "ck.member1"]
    # Every member's loop is finished: resuming restores the same ensemble.
    again = BayesianMDN(**kw).fit(X, y, **ckw, resume=True)
    np.testing.assert_array_equal(again.log_prob(X, y), first.log_prob(X, y))
    # Worker processes change no number, so they may resume an in-process fit.
    workers = BayesianMDN(**kw, n_jobs=2).fit(X, y, **ckw, resume=True)
    np.testing.assert_array_equal(workers.log_prob(X, y), first.log_prob(X, y))
    # A changed setting is refused for the ensemble as for one fit.
    with pytest.raises(ValueError, match="other settings"):
        BayesianMDN(**{**kw, "lr": 0.02}).fit(X, y, **ckw, resume=True)


@pytest.mark.parametrize("guide", ["normal", "delta"])
def test_stacked_resume_equals_uninterrupted_fit(data, tmp_path, monkeypatch, guide):
    from bayes_mdn import fit as fit_module
    from bayes_mdn import stacked

    X, y = data
    # Validate after every epoch.
    monkeypatch.setattr(fit_module.FitConfig, "eval_steps", lambda self, n, batch: 1)
    kw = {**FAST, "epochs": 7, "n_members": 3, "guide": guide, "patience": 2, "lr": 0.05}
    reference = BayesianMDN(**kw).fit(X, y)

    ck = tmp_path / "ck"
    original = stacked._validation_scores
    calls = {"n": 0}

    def crash_at_the_fifth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(stacked, "_validation_scores", crash_at_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        BayesianMDN(**kw).fit(X, y, checkpoint=ck, checkpoint_every=2)
    monkeypatch.setattr(stacked, "_validation_scores", original)
    # One file holds every stacked member.
    assert [p.name for p in tmp_path.glob("ck*")] == ["ck"]
    resumed = BayesianMDN(**kw).fit(X, y, checkpoint=ck, checkpoint_every=2, resume=True)
    np.testing.assert_array_equal(resumed.log_prob(X, y), reference.log_prob(X, y))
    for a, b in zip(resumed.histories_, reference.histories_):
        assert (a.train_loss, a.val_nll, a.best_epoch, a.stopped_early, a.steps) == (
            b.train_loss,
            b.val_nll,
            b.best_epoch,
            b.stopped_early,
            b.steps,
        )
    with pytest.raises(ValueError, match="other settings"):
        BayesianMDN(**{**kw, "lr": 0.02}).fit(X, y, checkpoint=ck, resume=True)
