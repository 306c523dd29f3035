"""Small builders shared by the tests."""

import torch
from torch import nn

from bayes_mdn.guides import make_guide
from bayes_mdn.model import MixtureDensityModel
from bayes_mdn.nets import MixtureDensityNetwork
from bayes_mdn.sources import Source


def small_model(
    bayesian="last", d_x=1, d_y=1, k=3, hidden=(8,), covariance="diagonal", prior_scale=1.0
):
    net = MixtureDensityNetwork(d_x, d_y, k, hidden, covariance=covariance)
    return MixtureDensityModel(
        net,
        bayesian=bayesian,
        prior_scale=prior_scale,
        x_loc=torch.zeros(d_x),
        x_scale=torch.ones(d_x),
        y_loc=torch.zeros(d_y),
        y_scale=torch.ones(d_y),
    )


def small_data(n=64, d_x=1, d_y=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_x, generator=g)
    y = torch.sin(2 * x[:, :1]).expand(n, d_y) + 0.3 * torch.randn(n, d_y, generator=g)
    return x, y


def model_and_guide(bayesian="last", guide="normal", **kwargs):
    model = small_model(bayesian, **kwargs)
    return model, make_guide(model, guide)


def float64_problem(bayesian, covariance="diagonal", d_y=1, guide="delta", **guide_options):
    """A small float64 model, its guide and 40 rows (x, y), where the fused losses and
    Trace_ELBO are compared; ``bayesian="backbone"``: every layer latent, in front a
    user's backbone (evaluated through functional_call and vmap) with a prior function."""
    torch.manual_seed(0)
    x = torch.randn(40, 2, dtype=torch.float64)
    y = torch.randn(40, d_y, dtype=torch.float64) + x[:, :1]
    if bayesian == "backbone":
        bayesian = "all"
        backbone = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh())
        net = MixtureDensityNetwork(
            2, d_y, 3, hidden=(4,), backbone=backbone, n_features=5, prior_function=0.5
        ).double()
    else:
        net = MixtureDensityNetwork(2, d_y, 3, hidden=(8, 8), covariance=covariance).double()
    model = MixtureDensityModel(
        net,
        bayesian=bayesian,
        prior_scale=0.7,
        x_loc=x.mean(0),
        x_scale=x.std(0),
        y_loc=y.mean(0),
        y_scale=y.std(0),
    )
    return model, make_guide(model, guide, **guide_options), x, y


class CrashingSource(Source):
    """Wraps a source and raises ``RuntimeError`` when its ``crash_at``-th pass
    starts, counting the passes of this copy (a spawned worker unpickles its own copy),
    so that a fit is interrupted inside every process at the same point."""

    def __init__(self, inner, crash_at):
        self.inner = inner
        self.crash_at = crash_at
        self.passes = 0
        self.d_x, self.d_y, self.y_1d = inner.d_x, inner.d_y, inner.y_1d

    def blocks(self):
        self.passes += 1
        if self.passes == self.crash_at:
            raise RuntimeError("simulated crash")
        yield from self.inner.blocks()
