"""Small builders shared by the tests."""

import torch

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
