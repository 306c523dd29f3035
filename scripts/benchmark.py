"""Speed and memory benchmark of bayes_mdn on the inverse-sine problem (issue #7).

Measures, against a hand-written plain-PyTorch MDN loop on the same network:

- step:       time per SVI step of ``fit_svi`` for each guide, and the ratio to the
              hand-written MLE step (same network, batch and Adam);
- target:     training time to reach a test NLL within 0.05 nats of the exact oracle;
- predictive: draws x points per second and peak memory of ``sample_predictive`` and
              ``log_predictive_density`` (1,000 draws over 10,000 x in the full run);
- scaling:    time per epoch and peak memory against training rows N and components K.

Every timing is the median of repeated runs interleaved across variants (A, B, A, B, ...)
so that drift in machine load hits every variant alike. Memory is the peak resident set
growth of a fresh subprocess per measurement (Linux ``/proc/self/status``, peak reset after
setup), so peaks neither accumulate nor include another measurement's.

Usage::

    python scripts/benchmark.py            # full run, writes docs/benchmarks.{json,md}
    python scripts/benchmark.py --quick --out /tmp/bench.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    # Run from a checkout: benchmark this tree's bayes_mdn, not an installed copy.
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bayes_mdn import predict  # noqa: E402
from bayes_mdn._files import atomic_path, write_json  # noqa: E402
from bayes_mdn._utils import pyro_scope  # noqa: E402
from bayes_mdn.datasets import inverse_sine_log_density, make_inverse_sine  # noqa: E402
from bayes_mdn.fit import FitConfig, _make_loss, fit_svi  # noqa: E402
from bayes_mdn.guides import make_guide  # noqa: E402
from bayes_mdn.model import MixtureDensityModel  # noqa: E402
from bayes_mdn.nets import MixtureDensityNetwork  # noqa: E402

# (label, bayesian, guide): the guides of issue #7.
STEP_VARIANTS = [
    ("MLE (bayesian=none, delta)", "none", "delta"),
    ("MAP (bayesian=last, delta)", "last", "delta"),
    ("mean-field last layer (normal)", "last", "normal"),
    ("mean-field all layers (normal)", "all", "normal"),
    ("low-rank last layer (lowrank)", "last", "lowrank"),
]

FULL = {
    "n_train": 5000,
    "batch": 500,
    "hidden": [64, 16],
    "components": 20,
    "step_epochs": 4,
    "repeats": 9,
    "target_max_epochs": 400,
    "eval_every": 5,
    "n_test": 5000,
    "pred_draws": 1000,
    "pred_points": 10_000,
    "pred_repeats": 3,
    "max_elements": [2**21, 2**23, 2**25],
    "rows": [10**3, 10**4, 10**5, 10**6],
    "rows_batch": 500,
    "big_batch": 4096,
    "k_rows": 10**4,
    "k_values": [5, 10, 20, 50],
    "scaling_epochs": 2,
    "scaling_repeats": 3,
}
QUICK = {
    "n_train": 400,
    "batch": 100,
    "hidden": [16],
    "components": 5,
    "step_epochs": 1,
    "repeats": 3,
    "target_max_epochs": 4,
    "eval_every": 2,
    "n_test": 400,
    "pred_draws": 20,
    "pred_points": 200,
    "pred_repeats": 1,
    "max_elements": [2**23],
    "rows": [300],
    "rows_batch": 100,
    "big_batch": None,
    "k_rows": 300,
    "k_values": [3],
    "scaling_epochs": 1,
    "scaling_repeats": 1,
}
TARGET_GAP = 0.05
SECTIONS = ("step", "target", "predictive", "scaling")


# -- problem and networks ----------------------------------------------------------------
def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = make_inverse_sine(n, seed=seed)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)[:, None]


def _build(x: torch.Tensor, y: torch.Tensor, bayesian: str, guide: str, hidden, k: int):
    torch.manual_seed(0)
    net = MixtureDensityNetwork(1, 1, k, hidden=tuple(hidden))
    model = MixtureDensityModel(
        net,
        bayesian=bayesian,
        x_loc=x.mean(0),
        x_scale=x.std(0),
        y_loc=y.mean(0),
        y_scale=y.std(0),
    )
    return model, make_guide(model, guide)


def _config(batch: int, epochs: int, **kw: Any) -> FitConfig:
    # Constant learning rate, no clipping, no input noise: the hand-written loop does none
    # of these, and the comparison is of the same work.
    base = dict(
        epochs=epochs,
        batch_size=batch,
        lr=1e-3,
        lr_schedule="constant",
        clip_norm=None,
        input_noise=0.0,
        val_fraction=0.0,
        patience=None,
        seed=0,
        device="cpu",
        progress=False,
    )
    base.update(kw)
    return FitConfig(**base)


class HandWritten:
    """The plain-PyTorch MDN loop a user would write: same network, pre-standardized data,
    a mixture NLL with logsumexp, Adam."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, hidden, k: int, lr: float) -> None:
        torch.manual_seed(0)
        self.net = MixtureDensityNetwork(1, 1, k, hidden=tuple(hidden))
        self.x_loc, self.x_scale = x.mean(0), x.std(0)
        self.y_loc, self.y_scale = y.mean(0), y.std(0)
        self.xs, self.ys = self._std(x, y)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)

    def _std(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x - self.x_loc) / self.x_scale, (y - self.y_loc) / self.y_scale

    def nll(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """Per-point negative log density in y's units, shape (n,)."""
        p = self.net(xs)
        log_comp = (-0.5 * ((ys[:, None, :] - p.loc) / p.scale).pow(2) - p.scale.log()).sum(-1)
        log_p = torch.logsumexp(torch.log_softmax(p.logits, -1) + log_comp, -1)
        return -(log_p - 0.5 * math.log(2 * math.pi) - self.y_scale.log().sum())

    def epochs(self, n_epochs: int, batch: int) -> int:
        n, steps = len(self.xs), 0
        for _ in range(n_epochs):
            perm = torch.randperm(n)
            for start in range(0, n, batch):
                idx = perm[start : start + batch]
                loss = self.nll(self.xs[idx], self.ys[idx]).mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                steps += 1
        return steps

    @torch.no_grad()
    def test_nll(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return self.nll(*self._std(x, y)).mean().item()


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


# -- 1. time per step ------------------------------------------------------------------------
def bench_step(s: dict) -> list[dict]:
    x, y = _data(s["n_train"], seed=0)
    runners: dict[str, Callable[[], float]] = {}

    # Steady-state cost per step: (T(1 + E epochs) - T(1 epoch)) / (E * steps per epoch),
    # so the once-per-fit setup (first ELBO call, optimizer) is not spread over the steps.
    extra = s["step_epochs"]

    def plain() -> float:
        elapsed = []
        for n_epochs in (1, 1 + extra):
            loop = HandWritten(x, y, s["hidden"], s["components"], lr=1e-3)
            start = time.perf_counter()
            steps = loop.epochs(n_epochs, s["batch"])
            elapsed.append((time.perf_counter() - start, steps))
        return (elapsed[1][0] - elapsed[0][0]) / (elapsed[1][1] - elapsed[0][1])

    def pyro_run(bayesian: str, guide: str) -> Callable[[], float]:
        def run() -> float:
            elapsed = []
            for n_epochs in (1, 1 + extra):
                model, g = _build(x, y, bayesian, guide, s["hidden"], s["components"])
                history = fit_svi(model, g, x, y, _config(s["batch"], n_epochs))
                elapsed.append((history.seconds, history.steps))
            return (elapsed[1][0] - elapsed[0][0]) / (elapsed[1][1] - elapsed[0][1])

        return run

    runners["plain"] = plain
    for label, bayesian, guide in STEP_VARIANTS:
        runners[label] = pyro_run(bayesian, guide)
    for run in runners.values():  # warm-up: first-call allocations and imports
        run()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(s["repeats"]):
        for key, run in runners.items():
            times[key].append(run())
    plain_ms = _median(times["plain"]) * 1e3
    rows = []
    for label, bayesian, guide in STEP_VARIANTS:
        ratios = [a / b for a, b in zip(times[label], times["plain"])]
        rows.append(
            {
                "variant": label,
                "bayesian": bayesian,
                "guide": guide,
                "ms_per_step": _median(times[label]) * 1e3,
                "plain_ms_per_step": plain_ms,
                "ratio": _median(ratios),
            }
        )
    return rows


# -- 2. time to target -----------------------------------------------------------------------
def bench_target(s: dict) -> dict:
    x, y = _data(s["n_train"], seed=0)
    x_test, y_test = _data(s["n_test"], seed=1)
    oracle = float(-inverse_sine_log_density(x_test.numpy(), y_test[:, 0].numpy()).mean())
    target = oracle + TARGET_GAP
    lr, batch, chunk = 5e-3, s["batch"], s["eval_every"]

    class PyroLoop:
        def __init__(self, bayesian: str, guide: str) -> None:
            self.model, self.guide = _build(x, y, bayesian, guide, s["hidden"], s["components"])
            self.draws = 1 if guide == "delta" else 32
            with pyro_scope():
                self.loss = _make_loss(self.model, self.guide, _config(batch, 1))
                self.loss(x[:batch], y[:batch], subsample=torch.arange(batch), n_total=len(x))
            params = [p for p in self.loss.parameters() if p.requires_grad]
            self.optimizer = torch.optim.Adam(params, lr=lr)

        def epochs(self, n_epochs: int) -> None:
            n = len(x)
            with pyro_scope():
                for _ in range(n_epochs):
                    perm = torch.randperm(n)
                    for start in range(0, n, batch):
                        idx = perm[start : start + batch]
                        loss = self.loss(x[idx], y[idx], subsample=idx, n_total=n)
                        self.optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        self.optimizer.step()

        def test_nll(self) -> float:
            lpd = predict.log_predictive_density(
                self.model, self.guide, x_test, y_test, num_draws=self.draws
            )
            return -lpd.mean().item()

    class PlainLoop:
        def __init__(self) -> None:
            self.loop = HandWritten(x, y, s["hidden"], s["components"], lr=lr)

        def epochs(self, n_epochs: int) -> None:
            self.loop.epochs(n_epochs, batch)

        def test_nll(self) -> float:
            return self.loop.test_nll(x_test, y_test)

    loops = {"plain (hand-written MLE)": PlainLoop()}
    for label, bayesian, guide in STEP_VARIANTS[:3]:
        loops[label] = PyroLoop(bayesian, guide)
    state = {
        k: {"seconds": 0.0, "epochs": 0, "best_nll": math.inf, "reached": None} for k in loops
    }
    # Round-robin chunks of epochs: load drift hits every loop alike. Evaluation is off
    # the clock.
    for _ in range(0, s["target_max_epochs"], chunk):
        for key, loop in loops.items():
            st = state[key]
            if st["reached"] is not None:
                continue
            start = time.perf_counter()
            loop.epochs(chunk)
            st["seconds"] += time.perf_counter() - start
            st["epochs"] += chunk
            nll = loop.test_nll()
            st["best_nll"] = min(st["best_nll"], nll)
            if nll <= target:
                st["reached"] = {"seconds": st["seconds"], "epochs": st["epochs"]}
        if all(st["reached"] is not None for st in state.values()):
            break
    rows = [
        {
            "variant": key,
            "reached": st["reached"] is not None,
            "seconds_to_target": st["reached"]["seconds"] if st["reached"] else None,
            "epochs_to_target": st["reached"]["epochs"] if st["reached"] else None,
            "seconds_trained": st["seconds"],
            "epochs_trained": st["epochs"],
            "best_test_nll": st["best_nll"],
        }
        for key, st in state.items()
    ]
    return {"oracle_nll": oracle, "target_nll": target, "lr": lr, "rows": rows}


# -- 3 and 4. subprocess measurements ------------------------------------------------------
def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) for k in ("VmRSS", "VmHWM")}


def _reset_peak() -> tuple[int, bool]:
    """Reset the kernel's peak RSS counter; return the current RSS (kB) and success."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    return _status()["VmRSS"], reset


def _memory(rss0: int, reset: bool) -> dict:
    peak = _status()["VmHWM"]
    return {
        "peak_rss_mb": peak / 1024,
        "peak_growth_mb": (peak - rss0) / 1024,
        "peak_reset": reset,
    }


def worker(job: dict) -> dict:
    """One measurement in this (fresh) process."""
    torch.set_num_threads(job["threads"])
    if job["kind"] == "predictive":
        x, y = _data(2000, seed=0)
        model, guide = _build(x, y, "last", "normal", job["hidden"], job["components"])
        with pyro_scope():
            guide(x[:10], y[:10])  # create the guide's parameters
        xq, yq = _data(job["points"], seed=2)
        draws, me = job["draws"], job["max_elements"]
        if job["fn"].startswith("sample_predictive"):
            sampler = "direct" if job["fn"].endswith("direct") else "predictive"

            def call():
                return predict.sample_predictive(
                    model, guide, xq, draws, max_elements=me, sampler=sampler
                )
        else:

            def call():
                return predict.log_predictive_density(model, guide, xq, yq, draws, max_elements=me)

        call()  # warm-up outside the peak window
        rss0, reset = _reset_peak()
        times = []
        for _ in range(job["repeats"]):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        out = {"seconds": _median(times), **_memory(rss0, reset)}
        out["draws_x_points_per_second"] = draws * job["points"] / out["seconds"]
        return out
    if job["kind"] == "fit":
        x, y = _data(job["rows"], seed=0)
        model, guide = _build(x, y, "last", "normal", job["hidden"], job["components"])
        config = _config(job["batch"], job["epochs"], val_fraction=0.1, lr=1e-3)
        # Warm-up on a few rows: lazy imports and first-call setup are not per-epoch costs.
        fit_svi(model, guide, x[:64], y[:64], _config(32, 1, val_fraction=0.1))
        rss0, reset = _reset_peak()
        history = fit_svi(model, guide, x, y, config)
        return {
            "seconds_per_epoch": history.seconds / job["epochs"],
            "seconds_per_step": history.seconds / history.steps,
            **_memory(rss0, reset),
            "rss_before_fit_mb": rss0 / 1024,
        }
    raise ValueError(f"unknown job kind {job['kind']!r}")


def _spawn(job: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {job} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_predictive(s: dict, threads: int) -> list[dict]:
    jobs = [
        (fn, me, threads)
        for fn in ("sample_predictive", "log_predictive_density")
        for me in s["max_elements"]
    ]
    # The direct sampler (the model's sampler without Pyro's tracing) at the default chunks.
    jobs.append(("sample_predictive_direct", predict.DEFAULT_MAX_ELEMENTS, threads))
    # Sampling at the default chunk size again with every core: whether more threads pay
    # (on a shared machine the other cores are busy, and oversubscribing them costs).
    cores = os.cpu_count() or 1
    if cores > threads:
        jobs.append(("sample_predictive", predict.DEFAULT_MAX_ELEMENTS, cores))
    rows = []
    for fn, me, n_threads in jobs:
        job = {
            "kind": "predictive",
            "fn": fn,
            "max_elements": me,
            "draws": s["pred_draws"],
            "points": s["pred_points"],
            "repeats": s["pred_repeats"],
            "hidden": s["hidden"],
            "components": s["components"],
            "threads": n_threads,
        }
        rows.append(
            {
                "function": fn,
                "draws": s["pred_draws"],
                "points": s["pred_points"],
                "max_elements": me,
                "threads": n_threads,
                **_spawn(job),
            }
        )
    return rows


def bench_scaling(s: dict, threads: int) -> dict:
    """Fits of ``scaling_epochs`` epochs per setting, each in a fresh process, repeated
    ``scaling_repeats`` times in interleaved rounds; medians per setting."""
    epochs = s["scaling_epochs"]
    settings = [(n, s["rows_batch"], s["components"]) for n in s["rows"]]
    if s["big_batch"]:
        settings.append((s["rows"][-1], s["big_batch"], s["components"]))
    settings += [(s["k_rows"], s["rows_batch"], k) for k in s["k_values"]]
    runs: dict[tuple, list[dict]] = {key: [] for key in settings}
    for _ in range(s["scaling_repeats"]):
        for rows, batch, k in settings:
            job = {
                "kind": "fit",
                "rows": rows,
                "batch": batch,
                "epochs": epochs,
                "hidden": s["hidden"],
                "components": k,
                "threads": threads,
            }
            runs[(rows, batch, k)].append(_spawn(job))

    def summary(key: tuple) -> dict:
        rows, batch, k = key
        out = {"rows": rows, "batch": batch, "components": k, "epochs": epochs}
        for field in runs[key][0]:
            if field != "peak_reset":
                out[field] = _median([r[field] for r in runs[key]])
        out["peak_reset"] = all(r["peak_reset"] for r in runs[key])
        out["repeats"] = len(runs[key])
        return out

    n_rows = len(s["rows"]) + (1 if s["big_batch"] else 0)
    return {
        "guide": "normal",
        "bayesian": "last",
        "by_rows": [summary(key) for key in settings[:n_rows]],
        "by_components": [summary(key) for key in settings[n_rows:]],
    }


def targets(result: dict) -> list[dict]:
    """The targets of issue #7 checked against this run's numbers (those it measured)."""
    out = []
    step = {r["guide"] + "/" + r["bayesian"]: r for r in result.get("step", [])}
    for key, label, limit in (
        ("delta/last", "MAP step / hand-written step", 1.1),
        ("normal/last", "mean-field last-layer step / hand-written step", 1.5),
    ):
        if key in step:
            value = step[key]["ratio"]
            out.append({"target": label, "limit": limit, "value": value, "met": value <= limit})
    for r in result.get("predictive", []):
        if r["function"].startswith("sample_predictive") and r["max_elements"] == (
            predict.DEFAULT_MAX_ELEMENTS
        ):
            out.append(
                {
                    "target": f"{r['draws']} draws x {r['points']} x, seconds, "
                    f"{r['function']} "
                    f"({r['threads']} thread(s), default chunks)",
                    "limit": 2.0,
                    "value": r["seconds"],
                    "met": r["seconds"] <= 2.0,
                }
            )
    by_rows = [
        r
        for r in result.get("scaling", {}).get("by_rows", [])
        if r["batch"] == (result["meta"]["settings"]["rows_batch"])
    ]
    if by_rows:
        big = by_rows[-1]
        out.append(
            {
                "target": f"peak RSS MB, fit on {big['rows']:,} rows",
                "limit": 1536,
                "value": big["peak_rss_mb"],
                "met": big["peak_rss_mb"] < 1536,
            }
        )
    if len(by_rows) > 1:
        # Linear in N: the cost per row of an epoch stays flat (within 2x of the median
        # over sizes; the smallest sizes carry the fixed cost of a fit).
        per_row = [r["seconds_per_epoch"] / r["rows"] for r in by_rows]
        spread = max(per_row[1:]) / min(per_row[1:]) if len(per_row) > 2 else 1.0
        out.append(
            {
                "target": "epoch time linear in N: max/min seconds per row, sizes >= "
                f"{by_rows[1]['rows']:,}",
                "limit": 2.0,
                "value": spread,
                "met": spread <= 2.0,
            }
        )
    return out


# -- report ----------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "not reached"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def markdown(result: dict) -> str:
    m = result["meta"]
    st = m["settings"]
    lines = [
        "# bayes_mdn benchmarks",
        "",
        f"Generated by `scripts/benchmark.py{' --quick' if m['quick'] else ''}` on "
        f"{m['machine']}, torch {m['torch']}, {m['threads']} torch thread(s), "
        f"load average {m['load_average']} at start"
        + (f", {m['load_average_end']} at the end" if "load_average_end" in m else "")
        + ". The machine is shared with other users' jobs: every timing is the median of "
        "repeated runs interleaved across the variants it is compared with (A, B, A, B, "
        "...), so that load drift hits them alike; absolute times are noisy, ratios less so.",
        "",
        "These are per-step and per-prediction timings. The whole default `fit` (a stacked "
        "ensemble with early stopping) against a hand-written loop doing the same work is "
        "in [`speed.md`](speed.md) (`python -m benchmarks.speed`), one network per step against "
        "NumPyro in [`numpyro_speed.md`](numpyro_speed.md), streamed fits from Parquet on one "
        "and two processes in [`streaming.md`](streaming.md); measured notes that "
        "docstrings used to quote are in [`notes.md`](notes.md).",
    ]
    if "step" in result:
        lines += [
            "",
            f"## Time per SVI step (N={st['n_train']}, batch {st['batch']}, hidden "
            f"{st['hidden']}, K={st['components']}, Adam, no clipping)",
            "",
            "Steady-state `fit_svi` time per step, (T(1 + E epochs) - T(1 epoch)) / (E steps "
            "per epoch), against the hand-written plain-PyTorch MLE step on the same network "
            "and batches; ratio is the median of the interleaved pairs' ratios.",
            "",
            "| variant | ms/step | hand-written ms/step | ratio |",
            "|---|---|---|---|",
        ]
        for r in result["step"]:
            lines.append(
                f"| {r['variant']} | {_fmt(r['ms_per_step'])} | "
                f"{_fmt(r['plain_ms_per_step'])} | {_fmt(r['ratio'])} |"
            )
    if "target" in result:
        t = result["target"]
        lines += [
            "",
            f"## Time to test NLL within {TARGET_GAP} nats of the oracle "
            f"(oracle {t['oracle_nll']:.4f}, target {t['target_nll']:.4f}; Adam lr {t['lr']}, "
            f"batch {st['batch']}, evaluation every {st['eval_every']} epochs, off the clock)",
            "",
            "| variant | seconds to target | epochs to target | best test NLL | epochs trained |",
            "|---|---|---|---|---|",
        ]
        for r in t["rows"]:
            lines.append(
                f"| {r['variant']} | {_fmt(r['seconds_to_target'])} | "
                f"{_fmt(r['epochs_to_target'])} | {r['best_test_nll']:.4f} | "
                f"{r['epochs_trained']} |"
            )
    if "predictive" in result:
        lines += [
            "",
            "## Posterior predictive (bayesian=last, guide=normal)",
            "",
            f"Median of {st['pred_repeats']} calls after a warm-up call, in a fresh process "
            "per row; peak RSS growth is over the process's size after setup.",
            "",
            "| function | draws x points | max_elements | threads | seconds | draws*points/s "
            "| peak RSS growth MB | peak RSS MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in result["predictive"]:
            lines.append(
                f"| {r['function']} | {r['draws']} x {r['points']} | "
                f"2^{int(math.log2(r['max_elements']))} | {r['threads']} | "
                f"{_fmt(r['seconds'])} | "
                f"{_fmt(r['draws_x_points_per_second'])} | {_fmt(r['peak_growth_mb'])} | "
                f"{_fmt(r['peak_rss_mb'])} |"
            )
    if "scaling" in result:
        sc = result["scaling"]
        lines += [
            "",
            "## Scaling of fit_svi (bayesian=last, guide=normal, val_fraction=0.1)",
            "",
            f"Each row: median of {st['scaling_repeats']} fits of {st['scaling_epochs']} "
            "epoch(s), each in a fresh process, the settings interleaved round by round. "
            "Seconds per epoch are the whole fit_svi time (setup, the steps, and the "
            "validation pass over the held-out 10% after every epoch) over the epochs.",
            "",
            "| rows | batch | K | s/epoch | ms/step | peak RSS growth MB | peak RSS MB |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sc["by_rows"] + sc["by_components"]:
            lines.append(
                f"| {r['rows']:,} | {r['batch']} | {r['components']} | "
                f"{_fmt(r['seconds_per_epoch'])} | {_fmt(r['seconds_per_step'] * 1e3)} | "
                f"{_fmt(r['peak_growth_mb'])} | {_fmt(r['peak_rss_mb'])} |"
            )
    if result.get("targets"):
        lines += [
            "",
            "## Targets of issue #7 on this run",
            "",
            *(
                [
                    "Quick run: tiny sizes, so these rows only show the check works; the "
                    "targets are about the full run's sizes.",
                    "",
                ]
                if m["quick"]
                else []
            ),
            "| target | limit | measured | met |",
            "|---|---|---|---|",
        ]
        for r in result["targets"]:
            lines.append(
                f"| {r['target']} | {r['limit']} | {_fmt(r['value'])} | "
                f"{'yes' if r['met'] else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument(
        "--out", default=str(ROOT / "docs" / "benchmarks.json"), help="JSON result path"
    )
    parser.add_argument(
        "--markdown",
        default=None,
        help="markdown table path (default: benchmarks.md beside --out)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--sections",
        type=lambda v: v.split(","),
        default=list(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections must name some of {SECTIONS}, got {sorted(unknown)}")
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else FULL
    result: dict[str, Any] = {
        "meta": {
            "quick": args.quick,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s)",
            "torch": torch.__version__,
            "numpy": np.__version__,
            "threads": args.threads,
            "load_average": round(os.getloadavg()[0], 2),
            "settings": settings,
        }
    }
    started = time.perf_counter()
    text = ""
    sections: list[tuple[str, Callable[[], Any]]] = [
        ("step", lambda: bench_step(settings)),
        ("target", lambda: bench_target(settings)),
        ("predictive", lambda: bench_predictive(settings, args.threads)),
        ("scaling", lambda: bench_scaling(settings, args.threads)),
    ]
    for name, fn in sections:
        if name not in args.sections:
            continue
        t0 = time.perf_counter()
        result[name] = fn()
        print(f"[{name}] {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        # Written after every section, so a long run that fails late keeps what it measured.
        result["meta"]["seconds"] = time.perf_counter() - started
        result["meta"]["load_average_end"] = round(os.getloadavg()[0], 2)
        result["targets"] = targets(result)
        text = _write(result, args)
    print(text)
    return 0


def _write(result: dict, args: argparse.Namespace) -> str:
    write_json(args.out, result)
    md_path = Path(args.markdown) if args.markdown else Path(args.out).with_suffix(".md")
    text = markdown(result)
    with atomic_path(md_path) as tmp:
        tmp.write_text(text)
    return text


if __name__ == "__main__":
    raise SystemExit(main())
