"""Per-step, time-to-target, predictive and scaling benchmark of bayes_mdn (issue #7).

``python -m benchmarks.steps [--quick] [--out docs/benchmarks.json] [--threads 1]
[--sections step,target,predictive,scaling]``

On the inverse-sine problem, against a hand-written plain-PyTorch MDN loop (the peer: the
same network, pre-standardized data, a logsumexp mixture NLL, Adam), measures:

- step:       time per optimizer step of ``fit_svi`` for each guide, steady state:
              (T(1 + E epochs) - T(1 epoch)) / (E steps per epoch) from the fits' own clock
              (``FitHistory.seconds``), so the once-per-fit setup is not spread over the
              steps; and its ratio to the hand-written MLE step on the same batches;
- target:     training time to a test NLL within 0.05 nats of the exact oracle;
- predictive: draws x points per second and peak memory of ``predict.sample_predictive``
              and ``predict.log_predictive_density`` (1,000 draws over 10,000 x in the full run);
- scaling:    time per epoch and peak memory of ``fit_svi`` against training rows N and
              components K.

Every timing is of the library's public functions (``fit_svi``, ``bayes_mdn.predict``);
nothing here copies the library's loop.

Time to target. The library's rows time whole ``fit_svi`` calls: for budgets of
``eval_every``, 2 ``eval_every``, 3 ``eval_every``, ... epochs, a fresh model from the same
initial weights is fitted from the same seed with a constant learning rate and no validation
split, then its test NLL is evaluated off the clock; the time to target is the wall time of
the first call whose fit reaches the target, setup included. With a constant rate nothing in
the loop depends on the budget, so the fit of b epochs is the first b epochs of every longer
one and the budgets replay a single run, evaluated every ``eval_every`` epochs. The run checks
this rather than assuming it: whether each fit's per-epoch training losses
(``FitHistory.train_loss``) begin with the previous, shorter fit's is reported as
``replays_one_run`` and stated in the report. The price is
quadratic: a variant reaching the target after b epochs trains about b**2 / (2 eval_every)
epochs in all. The hand-written loop is one run trained ``eval_every`` epochs at a time (its
state, Adam's included, carries over) and evaluated in between; its time is the sum of its
training chunks (its set-up, building the network, standardizing the data and creating
Adam, is not counted; the library's, inside ``fit_svi``, is).

Timings are medians of repeated runs interleaved across variants (A, B, A, B, ...), and the
time-to-target budgets are run round by round across variants, so that drift in machine
load hits every variant alike. Memory is the peak resident set growth of a fresh subprocess
per measurement (Linux ``/proc/self/status``, peak reset after setup), so peaks neither
accumulate nor include another measurement's. The result is written after every section
(``<out>.json`` and the report ``<out>.md``), so a long run that fails late keeps what it
measured. ``make benchmark`` runs the full sizes (``FULL``); ``--quick`` runs tiny ones
(``QUICK``), a smoke test whose numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bayes_mdn import (
    FitConfig,
    MixtureDensityModel,
    MixtureDensityNetwork,
    fit_svi,
    inverse_sine_log_density,
    make_guide,
    make_inverse_sine,
    predict,
)
from bayes_mdn.model import DEFAULT_MAX_ELEMENTS

from ._report import emit, machine

__all__ = [
    "FULL",
    "QUICK",
    "HandWritten",
    "bench_predictive",
    "bench_scaling",
    "bench_step",
    "bench_target",
    "main",
    "markdown",
    "targets",
]

ROOT = Path(__file__).resolve().parents[1]

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
    # Three extra epochs (12 steps), not one: a difference of 4 steps' time could come out
    # negative under a load spike on a shared machine.
    "step_epochs": 3,
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
TARGET_LR = 5e-3
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
    # of these, and the comparison is of the same work. num_threads=None: the fit runs on
    # the threads --threads set, as the hand-written loop does.
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
        num_threads=None,
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
    """Whole ``fit_svi`` calls of growing budgets against one hand-written run (see the
    module docstring)."""
    x, y = _data(s["n_train"], seed=0)
    x_test, y_test = _data(s["n_test"], seed=1)
    oracle = float(-inverse_sine_log_density(x_test.numpy(), y_test[:, 0].numpy()).mean())
    target = oracle + TARGET_GAP
    batch, every = s["batch"], s["eval_every"]
    hidden, k = s["hidden"], s["components"]
    plain_label = "plain (hand-written MLE)"

    def library_fit(bayesian: str, guide: str, budget: int) -> tuple[float, float, list[float]]:
        """(wall seconds of the fit_svi call, test NLL, per-epoch training losses)."""
        model, g = _build(x, y, bayesian, guide, hidden, k)
        start = time.perf_counter()
        history = fit_svi(model, g, x, y, _config(batch, budget, lr=TARGET_LR))
        seconds = time.perf_counter() - start
        draws = 1 if guide == "delta" else 32
        lpd = predict.log_predictive_density(model, g, x_test, y_test, num_draws=draws)
        return seconds, -lpd.mean().item(), history.train_loss

    # Warm-up, discarded: first-call allocations and lazy imports are no variant's cost.
    HandWritten(x, y, hidden, k, lr=TARGET_LR).epochs(1, batch)
    for _, bayesian, guide in STEP_VARIANTS[:3]:
        library_fit(bayesian, guide, 1)

    plain = HandWritten(x, y, hidden, k, lr=TARGET_LR)
    variants = {plain_label: None, **{v[0]: v[1:] for v in STEP_VARIANTS[:3]}}
    state: dict[str, dict[str, Any]] = {
        key: {
            "seconds": 0.0,
            "epochs": 0,
            "best_nll": math.inf,
            "reached": None,
            "fits": 0,
            "losses": [],
            "replays": True,
        }
        for key in variants
    }
    for budget in range(every, s["target_max_epochs"] + 1, every):
        for key, spec in variants.items():
            st = state[key]
            if st["reached"] is not None:
                continue
            if spec is None:
                start = time.perf_counter()
                plain.epochs(every, batch)
                st["seconds"] += time.perf_counter() - start
                nll = plain.test_nll(x_test, y_test)
            else:
                st["seconds"], nll, losses = library_fit(*spec, budget)
                st["replays"] &= losses[: len(st["losses"])] == st["losses"]
                st["losses"] = losses
                st["fits"] += 1
            st["epochs"] = budget
            st["best_nll"] = min(st["best_nll"], nll)
            if nll <= target:
                st["reached"] = {"seconds": st["seconds"], "epochs": budget}
        if all(st["reached"] is not None for st in state.values()):
            break
    rows = []
    for key, st in state.items():
        row = {
            "variant": key,
            "reached": st["reached"] is not None,
            "seconds_to_target": st["reached"]["seconds"] if st["reached"] else None,
            "epochs_to_target": st["reached"]["epochs"] if st["reached"] else None,
            "seconds_trained": st["seconds"],
            "epochs_trained": st["epochs"],
            "best_test_nll": st["best_nll"],
        }
        if variants[key] is not None:
            row["fits"] = st["fits"]
            row["replays_one_run"] = st["replays"]
        rows.append(row)
    return {"oracle_nll": oracle, "target_nll": target, "lr": TARGET_LR, "rows": rows}


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
        # A one-epoch fit on a few rows creates the guide's parameters; sampling costs the
        # same whatever their values.
        fit_svi(model, guide, x[:64], y[:64], _config(32, 1))
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
    # From the checkout's root, so that the worker imports this tree's bayes_mdn and
    # benchmarks (the benchmarks package is not installed).
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.steps", "--worker", json.dumps(job)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
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
    jobs.append(("sample_predictive_direct", DEFAULT_MAX_ELEMENTS, threads))
    # Sampling at the default chunk size again with every core: whether more threads pay
    # (on a shared machine the other cores are busy, and oversubscribing them costs).
    cores = os.cpu_count() or 1
    if cores > threads:
        jobs.append(("sample_predictive", DEFAULT_MAX_ELEMENTS, cores))
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
            DEFAULT_MAX_ELEMENTS
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
    """The report of a result, as markdown."""
    m = result["meta"]
    st = m["settings"]
    lines = [
        "# bayes_mdn benchmarks",
        "",
        f"Generated by `python -m benchmarks.steps{' --quick' if m['quick'] else ''}` on "
        f"{m['machine']}, torch {m['torch']}, {m['threads']} torch thread(s), "
        f"load average {m['load_at_start']} at start"
        + (f", {m['load_at_end']} at the end" if "load_at_end" in m else "")
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
        library = [r for r in t["rows"] if "fits" in r]
        replays = all(r["replays_one_run"] for r in library)
        lines += [
            "",
            f"## Time to test NLL within {TARGET_GAP} nats of the oracle "
            f"(oracle {t['oracle_nll']:.4f}, target {t['target_nll']:.4f}; Adam lr {t['lr']}, "
            f"batch {st['batch']}, evaluation every {st['eval_every']} epochs, off the clock)",
            "",
            f"The library's rows time whole `fit_svi` calls with budgets of {st['eval_every']}, "
            f"{2 * st['eval_every']}, {3 * st['eval_every']}, ... epochs from the same seed "
            "(constant learning rate, no validation split): seconds to target are the wall "
            "time of the first call whose fit reaches the target, its setup included. "
            + (
                "On this run each budget's per-epoch training losses began with the shorter "
                "budget's, so the fits replay one training run. "
                if replays
                else "On this run some budget's training losses did NOT begin with the "
                "shorter budget's: the fits are not one run replayed (see the JSON's "
                "`replays_one_run`). "
            )
            + "The hand-written row is one run trained between evaluations, its training "
            "time summed.",
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
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.steps", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes: a smoke test of every section whose numbers mean nothing",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "docs" / "benchmarks.json",
        help="write the result to OUT with its suffix replaced by .json, and the report "
        "beside it with .md (default: docs/benchmarks.json and docs/benchmarks.md)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of every timed call (default 1)"
    )
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
            **machine(),
            "quick": args.quick,
            "numpy": np.__version__,
            "threads": args.threads,
            "settings": settings,
        }
    }
    started = time.perf_counter()
    sections: list[tuple[str, Callable[[], Any]]] = [
        ("step", lambda: bench_step(settings)),
        ("target", lambda: bench_target(settings)),
        ("predictive", lambda: bench_predictive(settings, args.threads)),
        ("scaling", lambda: bench_scaling(settings, args.threads)),
    ]
    chosen = [(name, fn) for name, fn in sections if name in args.sections]
    for i, (name, fn) in enumerate(chosen):
        t0 = time.perf_counter()
        result[name] = fn()
        print(f"[{name}] {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        # Written after every section, so a long run that fails late keeps what it measured.
        result["meta"]["seconds"] = time.perf_counter() - started
        result["meta"]["load_at_end"] = round(os.getloadavg()[0], 2)
        result["targets"] = targets(result)
        emit(result, markdown(result), args.out, echo=i == len(chosen) - 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
