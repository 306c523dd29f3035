"""Does ``torch.compile`` pay for the stacked training step? (issue #17)

``python -m benchmarks.compile_step [--rows 10000] [--steps 300]``

Builds the default ensemble's stacked loss (5 members, K = 20, the default network and
prior functions) exactly as ``BayesianMDN().fit`` does, then times one optimizer step
(forward, backward, fused Adam) eager and under ``torch.compile`` of the loss module
(Inductor; the backward through AOTAutograd): the first step, which compiles, and the
mean of ``--steps`` steps after a warm-up of 20. One torch thread. Prints both.
"""

from __future__ import annotations

import argparse
import time

import torch

from bayes_mdn import BayesianMDN, make_inverse_sine
from bayes_mdn._utils import pyro_scope
from bayes_mdn.fit import FitConfig, _adam, make_loss
from bayes_mdn.stacked import StackedLoss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    X, y = make_inverse_sine(args.rows, seed=0)
    x = torch.tensor(X, dtype=torch.float32)
    yt = torch.tensor(y[:, None], dtype=torch.float32)
    est = BayesianMDN(progress=False, seed=0)
    spec = est.model_spec()
    stats = (x.mean(0), x.std(0), yt.mean(0), yt.std(0))
    members = [spec.build(1, 1, 20, stats, seed) for seed in range(est.n_members)]
    n = int(0.9 * args.rows)
    with pyro_scope():
        losses = []
        for model, guide in members:
            loss = make_loss(model, guide, FitConfig())
            loss(x[:500], yt[:500], subsample=torch.arange(500), n_total=n)
            losses.append(loss)
        stack = StackedLoss(losses, 1)
        params = [p for p in stack.parameters() if p.requires_grad]
        optimizer = _adam(params, 3e-3, torch.device("cpu"))
        idx = torch.randint(0, args.rows, (len(members), 500))

        def step(loss_fn) -> None:
            value = loss_fn(x[idx], yt[idx], n)
            optimizer.zero_grad(set_to_none=True)
            value.sum().backward()
            optimizer.step()

        for name, loss_fn in (("eager", stack), ("torch.compile", torch.compile(stack))):
            start = time.perf_counter()
            step(loss_fn)
            first = time.perf_counter() - start
            for _ in range(20):
                step(loss_fn)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(loss_fn)
            ms = 1e3 * (time.perf_counter() - start) / args.steps
            print(f"{name:>13}: first step {first:6.1f} s, then {ms:.2f} ms a step", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
