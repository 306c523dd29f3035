"""End-to-end fit time: the library's own ``BayesianMDN().fit`` against a hand-written loop.

``python -m benchmarks.speed [--rows 10000 100000] [--repeats 3] [--out docs/speed]``

For each size, on the inverse-sine toy (x uniform, y = x + 0.3 sin(2 pi x) + noise, inverted),
one round times, in this order and then in reverse order in the next round (so that load
drift on a shared machine hits both alike):

* ``library``: ``BayesianMDN(progress=False, seed=r).fit(X, y)`` with the defaults (an
  ensemble of mean-field members, stacked), wall time of the whole call;
* ``hand-written``: the same model written directly in eager PyTorch, 25-odd lines, doing
  the same work: the same members, each for the number of optimizer steps the library's
  member took, with the same network, batch size, input noise, learning-rate schedule,
  clipping and validation of 16 draws as often as the library checks. Members are trained one after the other, as a
  loop written by hand would; its time is counted from the first member's setup to the
  last member's end.

Reports the median over rounds of each and of the per-round ratio, with the test NLL of
both. Both run on one torch thread.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bayes_mdn import BayesianMDN, make_inverse_sine
from bayes_mdn.fit import FitConfig

from ._report import emit, machine

__all__ = ["hand_written_fit", "main", "run"]

PRIOR_FUNCTION = BayesianMDN().prior_function


def hand_written_fit(
    x: np.ndarray,
    y: np.ndarray,
    steps: list[int],
    k: int,
    seed: int,
    batch: int = 500,
    val_fraction: float = 0.1,
) -> tuple[float, list[nn.Module]]:
    """Mean-field last layer MDN members trained by a plain loop; (seconds, members).

    Each member: 1-64-16 ReLU network with point-estimated hidden layers, a Gaussian
    mean-field posterior over the head's weights and bias (prior N(0, 32 / sqrt(fan_in))
    and N(0, 32)), ELBO with one particle, Adam (fused) at 3e-3 annealed by a cosine
    schedule to 3e-5, gradient clipping at 10 per point, input noise 0.05, a randomized
    prior function (a fixed random 1-64-16-K ReLU network times 0.5 added to the means),
    validation of 16 draws on its 10 % held-out split as often as the library's loop
    checks.
    """
    start = time.perf_counter()
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.float32).reshape(len(y), -1)
    xs = (xt - xt.mean(0)) / xt.std(0)
    ys = (yt - yt.mean(0)) / yt.std(0)
    members = []
    for m, n_steps in enumerate(steps):
        g = torch.Generator().manual_seed(seed + m)
        perm = torch.randperm(len(xs), generator=g)
        n_val = round(len(xs) * val_fraction)
        val, train = perm[:n_val], perm[n_val:]
        n = len(train)
        body = nn.Sequential(nn.Linear(xs.shape[1], 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU())
        head = nn.Linear(16, 3 * k)
        loc = nn.ParameterList(
            [nn.Parameter(head.weight.detach()), nn.Parameter(head.bias.detach())]
        )
        raw = nn.ParameterList(
            [nn.Parameter(torch.full_like(p, math.log(math.expm1(1e-3)))) for p in loc]
        )
        prior = [32 / math.sqrt(16), 32.0]
        # The randomized prior function: a fixed random network added to the means.
        prior_net = nn.Sequential(
            nn.Linear(xs.shape[1], 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, k)
        ).requires_grad_(False)
        params = [*body.parameters(), *loc, *raw]
        opt = torch.optim.Adam(params, lr=3e-3, fused=True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n_steps, eta_min=3e-5)

        def nll(xb, yb, w, b, body=body, prior_net=prior_net):
            out = F.linear(body(xb), w, b)
            logits, mu, s = out.split(k, -1)
            mu = mu + PRIOR_FUNCTION * prior_net(xb)
            s = F.softplus(s) + 0.02
            comp = -0.5 * ((yb - mu) / s) ** 2 - s.log() - 0.5 * math.log(2 * math.pi)
            return -torch.logsumexp(F.log_softmax(logits, -1) + comp, -1)

        # Validation as often as the library's loop checks (every eval_every epochs).
        _, _, eval_every, _ = FitConfig(val_fraction=val_fraction).schedule(n)
        check_every = eval_every * math.ceil(n / batch)
        step = 0
        while step < n_steps:
            order = train[torch.randperm(n)]
            for i in range(0, n, batch):
                if step == n_steps:
                    break
                idx = order[i : i + batch]
                xb = xs[idx] + 0.05 * torch.randn(len(idx), xs.shape[1])
                scales = [F.softplus(r) for r in raw]
                eps = [torch.randn_like(p) for p in loc]
                w, b = (p + e * s for p, e, s in zip(loc, eps, scales))
                kl_terms = 0.0
                for v, s, e, sd in zip((w, b), scales, eps, prior):
                    log_q = (-0.5 * e**2 - s.log()).sum()
                    log_p = (-0.5 * (v / sd) ** 2 - math.log(sd)).sum()
                    kl_terms = kl_terms + log_q - log_p
                loss = nll(xb, ys[idx], w, b).sum() * (n / len(idx)) + kl_terms
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 10.0 * n)
                opt.step()
                sched.step()
                step += 1
                if step % check_every == 0:
                    with torch.no_grad():
                        s = [F.softplus(r) for r in raw]
                        ws = loc[0] + torch.randn(16, *loc[0].shape) * s[0]
                        bs = loc[1] + torch.randn(16, *loc[1].shape) * s[1]
                        h = body(xs[val])
                        out = torch.einsum("nh,doh->dno", h, ws) + bs[:, None]
                        logits, mu, sc = out.split(k, -1)
                        mu = mu + PRIOR_FUNCTION * prior_net(xs[val])
                        sc = F.softplus(sc) + 0.02
                        comp = -0.5 * ((ys[val] - mu) / sc) ** 2 - sc.log()
                        torch.logsumexp(F.log_softmax(logits, -1) + comp, -1).mean()
        members.append(nn.ModuleList([body, head]))
    return time.perf_counter() - start, members


def run(rows: list[int], repeats: int) -> dict:
    torch.set_num_threads(1)
    meta = machine()
    results = []
    for n in rows:
        X, y = make_inverse_sine(n, seed=0)
        Xt, yt = make_inverse_sine(5000, seed=1)
        library, hand, ratios, steps, nll = [], [], [], [], []
        for r in range(repeats):
            order = ("library", "hand") if r % 2 == 0 else ("hand", "library")
            t_lib = t_hand = 0.0
            for which in order:
                if which == "library":
                    # Seed 0 every round: the same fit, so the same steps, each round.
                    t0 = time.perf_counter()
                    est = BayesianMDN(progress=False, seed=0).fit(X, y)
                    t_lib = time.perf_counter() - t0
                    member_steps = [h.steps for h in est.histories_]
                    k = est.n_components_
                    nll.append(-est.score(Xt, yt))
                else:
                    # Round 0 runs the library first, which fixes the steps to take.
                    t_hand, _ = hand_written_fit(X, y, member_steps, k, seed=0)
            library.append(t_lib)
            hand.append(t_hand)
            ratios.append(t_lib / t_hand)
            steps.append(member_steps)
        results.append(
            {
                "rows": n,
                "library_seconds": statistics.median(library),
                "hand_written_seconds": statistics.median(hand),
                "ratio": statistics.median(ratios),
                "member_steps": steps,
                "library_test_nll": statistics.median(nll),
            }
        )
    return {
        "meta": {
            **meta,
            "threads": 1,
            "load_at_end": round(os.getloadavg()[0], 2),
            "repeats": repeats,
        },
        "rows": results,
    }


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [
        "# End-to-end fit time",
        "",
        f"Generated by `python -m benchmarks.speed` on {m['machine']}, torch {m['torch']}, "
        f"{m['threads']} torch thread, load average {m['load_at_start']} at start and "
        f"{m['load_at_end']} at the end; median of {m['repeats']} interleaved rounds.",
        "",
        "`library`: the whole `BayesianMDN(progress=False).fit` with the defaults. "
        "`hand-written`: the same members and model in a plain eager PyTorch loop, each "
        "member for the steps the library's member took (see `benchmarks/speed.py`).",
        "A ratio below 1 means the library's whole fit is faster than the loop: it trains "
        "the members as one stacked network (one batched step for all of them, a member "
        "leaving the steps when it stops), where the loop trains them one after another. "
        "Absolute seconds move with the machine's load; the ratio is measured in one run.",
        "",
        "| rows | library s | hand-written s | ratio | steps per member (round 1) | library test NLL |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['rows']:,} | {r['library_seconds']:.1f} | {r['hand_written_seconds']:.1f} "
            f"| {r['ratio']:.2f} | {r['member_steps'][0]} | {r['library_test_nll']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000], help="data sizes")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds per size")
    parser.add_argument("--out", type=Path, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    if args.repeats < 1 or any(n < 20 for n in args.rows):
        parser.error("--repeats must be >= 1 and every --rows >= 20")
    result = run(args.rows, args.repeats)
    emit(result, markdown(result), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
