"""Epistemic uncertainty on data with a hole (issue #16; notebook 02's problem).

``python -m benchmarks.hole [--seeds 11 12 13] [--fits defaults "prior_function=0"] [--out F]``

y = sin x + 0.3 x + noise of sd 0.1 + 0.25 (x + 4) / 8, 150 training points with x uniform
on [-4, -1] and [1.5, 4], K = 1. Each fit is scored on 4,000 fresh points in each of three
regions: in the data, in the hole (-1, 1.5) and beyond the data ([-6, -4] and [4, 6]):
coverage of the central 90 % predictive interval and test NLL. A fit is named by the
``BayesianMDN`` arguments it changes from the defaults, e.g. ``"prior_function=0"`` or
``"method='nuts',bayesian='all',prior_scale=1.0,n_members=1"``; ``defaults`` changes none.
Prints one JSON line per (seed, fit) and the mean over seeds per fit.
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bayes_mdn import BayesianMDN

__all__ = ["REGIONS", "evaluate", "fit", "make_regions", "make_train", "parse_fit"]

REGIONS = ("data", "hole", "beyond")


def true_mean(x: np.ndarray) -> np.ndarray:
    return np.sin(x) + 0.3 * x


def noise_sd(x: np.ndarray) -> np.ndarray:
    return 0.1 + 0.25 * (x + 4) / 8


def _sample(rng: np.random.Generator, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.reshape(-1, 1), true_mean(x) + noise_sd(x) * rng.standard_normal(len(x))


def make_train(seed: int, n: int = 150) -> tuple[np.ndarray, np.ndarray]:
    """The training set of ``seed``: x uniform on [-4, -1] or [1.5, 4], half each."""
    rng = np.random.default_rng(seed)
    x = np.where(rng.random(n) < 0.5, rng.uniform(-4, -1, n), rng.uniform(1.5, 4, n))
    return _sample(rng, x)


def make_regions(seed: int, n: int = 4000) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fresh test points: in the data, in the hole, beyond the data (drawn in that order,
    so the first two do not depend on the third)."""
    rng = np.random.default_rng(seed)
    half = rng.random(n) < 0.5
    data = _sample(rng, np.where(half, rng.uniform(-4, -1, n), rng.uniform(1.5, 4, n)))
    hole = _sample(rng, rng.uniform(-1, 1.5, n))
    beyond = _sample(rng, np.where(half, rng.uniform(-6, -4, n), rng.uniform(4, 6, n)))
    return {"data": data, "hole": hole, "beyond": beyond}


def coverage(mdn: BayesianMDN, X: np.ndarray, y: np.ndarray, level: float = 0.9) -> float:
    lo, hi = mdn.predict_interval(X, level)
    return float(((y > lo) & (y < hi)).mean())


def evaluate(mdn: BayesianMDN, regions: dict) -> dict[str, dict[str, float]]:
    """{region: {"coverage": ..., "nll": ...}}."""
    return {
        name: {"coverage": coverage(mdn, X, y), "nll": float(-mdn.score(X, y))}
        for name, (X, y) in regions.items()
    }


def parse_fit(spec: str) -> dict:
    """``"a=1,b='x'"`` -> {"a": 1, "b": "x"}; ``"defaults"`` -> {}."""
    if spec == "defaults":
        return {}
    call = ast.parse(f"f({spec})", mode="eval").body
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}  # type: ignore[attr-defined]


def fit(seed: int, **options) -> BayesianMDN:
    X, y = make_train(seed)
    return BayesianMDN(n_components=1, seed=seed, progress=False, **options).fit(X, y)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13, 14, 15])
    parser.add_argument("--fits", nargs="+", default=["defaults", "prior_function=0.0"])
    parser.add_argument("--out", type=Path, help="write the per-seed results as JSON")
    args = parser.parse_args(argv)
    try:
        fits = {spec: parse_fit(spec) for spec in args.fits}
    except (SyntaxError, ValueError, AttributeError) as err:
        parser.error(f"cannot parse a fit: {err}")
    torch.set_num_threads(1)
    rows = []
    for seed in args.seeds:
        regions = make_regions(10_000 + seed)
        for spec, options in fits.items():
            start = time.perf_counter()
            result = evaluate(fit(seed, **options), regions)
            row = {"seed": seed, "fit": spec, "seconds": time.perf_counter() - start, **result}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nmean over seeds {args.seeds}: coverage / NLL")
    print("| fit | " + " | ".join(REGIONS) + " |")
    print("|---|" + "---|" * len(REGIONS))
    for spec in fits:
        mine = [r for r in rows if r["fit"] == spec]
        cells = [
            f"{statistics.mean(r[g]['coverage'] for r in mine):.2f} / "
            f"{statistics.mean(r[g]['nll'] for r in mine):.2f}"
            for g in REGIONS
        ]
        print(f"| {spec} | " + " | ".join(cells) + " |")
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
