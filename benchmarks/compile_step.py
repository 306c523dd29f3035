"""Does ``torch.compile`` pay for the training step? (issue #17)

``python -m benchmarks.compile_step [--rows 10000] [--steps 300] [--members 5] [--whole-fit]``

Builds the default ensemble's stacked loss (``--members`` members, K = 20, the default
network and prior functions) exactly as ``BayesianMDN().fit`` does, then times one optimizer
step (forward, backward, fused Adam) eager and under ``torch.compile`` of the loss module
(Inductor; the backward through AOTAutograd): the first step, which compiles, and the
mean of ``--steps`` steps after a warm-up of 20. One torch thread. Prints both.

With ``--whole-fit`` it times the library's own ``BayesianMDN(n_members=...,
compile=c).fit`` on ``--rows`` inverse-sine rows instead, c = False then True, compile
time included, and the test NLL of each on 20,000 fresh rows.
"""

from __future__ import annotations

import argparse
import time

import torch

from bayes_mdn import BayesianMDN, make_inverse_sine
from bayes_mdn._utils import pyro_scope
from bayes_mdn.fit import FitConfig, _adam, _step_module, make_loss
from bayes_mdn.stacked import StackedLoss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--whole-fit", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    X, y = make_inverse_sine(args.rows, seed=0)
    if args.whole_fit:
        X_test, y_test = make_inverse_sine(20_000, seed=10_000)
        for flag in (False, True):
            mdn = BayesianMDN(n_members=args.members, compile=flag, progress=False, seed=0)
            start = time.perf_counter()
            mdn.fit(X, y)
            seconds = time.perf_counter() - start
            print(
                f"compile={flag!s:>5}: fit {seconds:6.1f} s, {mdn.n_steps_} steps, "
                f"test NLL {-mdn.score(X_test, y_test):.4f}",
                flush=True,
            )
        return 0
    x = torch.tensor(X, dtype=torch.float32)
    yt = torch.tensor(y[:, None], dtype=torch.float32)
    est = BayesianMDN(progress=False, seed=0)
    spec = est.model_spec()
    stats = (x.mean(0), x.std(0), yt.mean(0), yt.std(0))
    members = [spec.build(1, 1, 20, stats, seed) for seed in range(args.members)]
    n = int(0.9 * args.rows)
    with pyro_scope():
        losses = []
        for model, guide in members:
            loss = make_loss(model, guide, FitConfig())
            loss(x[:500], yt[:500], subsample=torch.arange(500), n_total=n)
            losses.append(loss)
        stack = StackedLoss(losses, 1) if len(losses) > 1 else losses[0]
        params = [p for p in stack.parameters() if p.requires_grad]
        optimizer = _adam(params, 3e-3, torch.device("cpu"))
        idx = torch.randint(0, args.rows, (len(members), 500))

        def step(loss_fn) -> None:
            if len(members) > 1:
                value = loss_fn(x[idx], yt[idx], n)
            else:  # one member trains through its own loss, as fit_svi calls it
                value = loss_fn(x[idx[0]], yt[idx[0]], subsample=idx[0], n_total=n)
            optimizer.zero_grad(set_to_none=True)
            value.sum().backward()
            optimizer.step()

        compiled = _step_module(
            stack, FitConfig(compile=True), torch.device("cpu"), 1, len(members) > 1
        )
        for name, loss_fn in (("eager", stack), ("torch.compile", compiled)):
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
