"""A plain regression network: the baseline that fails on multimodal targets."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ._utils import seeded
from ._validation import as_2d_float
from .nets import ACTIVATIONS

__all__ = ["RegressionNet"]


class RegressionNet:
    """An MLP fitted by least squares, read as a Gaussian with one residual scale.

    This is what a standard regression network learns: the conditional mean
    E[y | x] and a single noise level. Where p(y | x) has several branches the mean
    falls between them, where no data lie.

    Parameters
    ----------
    hidden : sequence of int
    activation : str
    epochs : int
    batch_size : int
    lr : float
    seed : int or None

    Examples
    --------
    >>> X = np.linspace(-1, 1, 64).reshape(-1, 1); y = 2 * X[:, 0]
    >>> RegressionNet(hidden=(8,), epochs=50).fit(X, y).predict(X).shape
    (64,)
    """

    def __init__(
        self,
        hidden: Sequence[int] = (64, 64),
        activation: str = "tanh",
        epochs: int = 200,
        batch_size: int = 500,
        lr: float = 1e-2,
        seed: int | None = 0,
    ) -> None:
        self.hidden = hidden
        self.activation = activation
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed

    def fit(self, X: Any, y: Any) -> RegressionNet:
        x_arr, _ = as_2d_float(X, "X", allow_1d=False)
        y_arr, _ = as_2d_float(y, "y", allow_1d=True)
        if len(x_arr) != len(y_arr):
            raise ValueError(
                f"X and y must have the same number of rows, got {len(x_arr)} and {len(y_arr)}"
            )
        x = torch.as_tensor(x_arr, dtype=torch.float32)
        t = torch.as_tensor(y_arr, dtype=torch.float32)
        self.x_loc_, self.x_scale_ = x.mean(0), x.std(0).clamp_min(1e-12)
        self.y_loc_, self.y_scale_ = t.mean(0), t.std(0).clamp_min(1e-12)
        xs, ts = (x - self.x_loc_) / self.x_scale_, (t - self.y_loc_) / self.y_scale_
        widths = [x.shape[1], *self.hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), ACTIVATIONS[self.activation]()]
        with seeded(self.seed):
            self.net_ = nn.Sequential(*layers, nn.Linear(widths[-1], t.shape[1]))
            opt = torch.optim.Adam(self.net_.parameters(), lr=self.lr)
            steps = self.epochs * math.ceil(len(x) / self.batch_size)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, self.lr * 1e-2)
            for _ in range(self.epochs):
                perm = torch.randperm(len(x))
                for i in range(0, len(x), self.batch_size):
                    idx = perm[i : i + self.batch_size]
                    loss = (self.net_(xs[idx]) - ts[idx]).pow(2).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
        with torch.no_grad():
            resid = self.net_(xs) * self.y_scale_ + self.y_loc_ - t
        # The maximum-likelihood noise level of a Gaussian around the fitted mean.
        self.sigma_ = resid.pow(2).mean(0).sqrt().numpy()
        return self

    def predict(self, X: Any) -> np.ndarray:
        """The fitted conditional mean, shape (n,) for one output, else (n, d)."""
        x_arr, _ = as_2d_float(X, "X", allow_1d=False)
        x = torch.as_tensor(x_arr, dtype=torch.float32)
        with torch.no_grad():
            out = (
                self.net_((x - self.x_loc_) / self.x_scale_) * self.y_scale_ + self.y_loc_
            ).numpy()
        return out[:, 0] if out.shape[1] == 1 else out

    def log_prob(self, X: Any, y: Any) -> np.ndarray:
        """log N(y; f(x), sigma^2) summed over outputs, shape (n,)."""
        y_arr, _ = as_2d_float(y, "y", allow_1d=True)
        mean = self.predict(X).reshape(len(y_arr), -1)
        z = (y_arr - mean) / self.sigma_
        return (-0.5 * z**2 - np.log(self.sigma_) - 0.5 * np.log(2 * np.pi)).sum(1)
