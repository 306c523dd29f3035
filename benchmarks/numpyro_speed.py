"""Time per optimizer step of one Bayesian-last-layer MDN: bayes_mdn's whole ``fit`` against
NumPyro with its epochs compiled by ``lax.scan`` (issue #17).

``python -m benchmarks.numpyro_speed [--rows 1000000] [--epochs 2] [--out docs/numpyro_speed]``

bayes_mdn runs twice, eager (``compile=False``) and compiled (``compile=True``, its compile
time included); the report says which of the two the default ``compile="auto"`` picks.

The same model on both sides, one network (no ensemble, no prior function, no validation
split, no input noise, no clipping, constant learning rate, so that both do the same work
per step): x -> ReLU(64) -> ReLU(16) -> 3K outputs, K = 20, point-estimated hidden layers,
a Normal(0, 32 / sqrt(16)) prior on the output weights and Normal(0, 32) on its biases, a
mean-field Normal guide over them, one-particle ELBO, Adam at 3e-3, batches of 500 drawn
by a fresh permutation every epoch, on the inverse-sine toy. Each side's time counts
everything from the call on the in-memory arrays to the fitted parameters: NumPyro's
includes its compilation, reported separately too. One CPU thread each (JAX is told so
through XLA_FLAGS before it is imported). NumPyro and JAX are optional benchmark
dependencies (``pip install numpyro``).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import numpy as np
import torch

from bayes_mdn import BayesianMDN, make_inverse_sine
from bayes_mdn.config import COMPILE_STEPS, FitConfig

from ._report import emit, machine

__all__ = ["main", "time_bayes_mdn", "time_numpyro"]

K, HIDDEN, BATCH, LR, PRIOR = 20, (64, 16), 500, 3e-3, 32.0


def time_bayes_mdn(
    X: np.ndarray, y: np.ndarray, epochs: int, seed: int = 0, compile: bool | str = False
) -> dict:
    torch.set_num_threads(1)
    mdn = BayesianMDN(
        compile=compile,
        n_members=1,
        n_components=K,
        hidden=HIDDEN,
        prior_function=0.0,
        input_noise=0.0,
        val_fraction=0.0,
        patience=None,
        epochs=epochs,
        lr=LR,
        lr_schedule="constant",
        clip_norm=None,
        batch_size=BATCH,
        prior_scale=PRIOR,
        progress=False,
        seed=seed,
        device="cpu",
    )
    start = time.perf_counter()
    mdn.fit(X, y)
    seconds = time.perf_counter() - start
    steps = mdn.n_steps_
    return {"seconds": seconds, "steps": steps, "ms_per_step": 1e3 * seconds / steps}


def time_numpyro(X: np.ndarray, y: np.ndarray, epochs: int, seed: int = 0) -> dict:
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal

    start = time.perf_counter()
    xs = (X - X.mean(0)) / X.std(0)
    ys = (y - y.mean()) / y.std()
    xj = jnp.asarray(xs, dtype=jnp.float32)
    yj = jnp.asarray(ys, dtype=jnp.float32)
    n, d = xj.shape
    rng = np.random.default_rng(seed)
    widths = [d, *HIDDEN]
    init = {}
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        bound = 1 / math.sqrt(a)
        init[f"w{i}"] = jnp.asarray(rng.uniform(-bound, bound, (a, b)), dtype=jnp.float32)
        init[f"b{i}"] = jnp.asarray(rng.uniform(-bound, bound, b), dtype=jnp.float32)

    def model(x, y_obs):
        h = x
        for i in range(len(HIDDEN)):
            h = jax.nn.relu(
                h @ numpyro.param(f"w{i}", init[f"w{i}"]) + numpyro.param(f"b{i}", init[f"b{i}"])
            )
        w = numpyro.sample(
            "head_w",
            dist.Normal(0.0, PRIOR / math.sqrt(HIDDEN[-1]))
            .expand([HIDDEN[-1], 3 * K])
            .to_event(2),
        )
        b = numpyro.sample("head_b", dist.Normal(0.0, PRIOR).expand([3 * K]).to_event(1))
        out = h @ w + b
        logits, loc, raw = out[:, :K], out[:, K : 2 * K], out[:, 2 * K :]
        scale = jax.nn.softplus(raw) + 0.02
        mix = dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(loc, scale))
        with numpyro.plate("data", n, subsample_size=x.shape[0]):
            numpyro.sample("obs", mix, obs=y_obs)

    guide = AutoNormal(model, init_scale=1e-3)
    svi = SVI(model, guide, numpyro.optim.Adam(LR), Trace_ELBO())
    steps_per_epoch = n // BATCH
    key = jax.random.PRNGKey(seed)
    state = svi.init(key, xj[:BATCH], yj[:BATCH])

    @jax.jit
    def epoch(state, key):
        perm = jax.random.permutation(key, n)[: steps_per_epoch * BATCH]
        batches = perm.reshape(steps_per_epoch, BATCH)

        def body(state, idx):
            return svi.update(state, xj[idx], yj[idx])

        return jax.lax.scan(body, state, batches)

    jax.block_until_ready(state)
    compile_start = time.perf_counter()
    compiled = epoch.lower(state, key).compile()
    compile_seconds = time.perf_counter() - compile_start
    run_start = time.perf_counter()
    for e in range(epochs):
        state, losses = compiled(state, jax.random.fold_in(key, e))
    jax.block_until_ready(state)
    end = time.perf_counter()
    seconds = end - start
    steps = epochs * steps_per_epoch
    return {
        "seconds": seconds,
        "setup_seconds": compile_start - start,
        "compile_seconds": compile_seconds,
        "steps": steps,
        "ms_per_step": 1e3 * seconds / steps,
        "ms_per_step_running": 1e3 * (end - run_start) / steps,
        "final_loss_per_row": float(losses[-1]) / n,
    }


def _crossover(b: dict, p: dict) -> str:
    """Where NumPyro's fixed cost (setup and compile) is paid back by its faster steps,
    against bayes_mdn's eager fit ``b``."""
    saved = b["ms_per_step"] - p["ms_per_step_running"]
    if saved <= 0:
        return "NumPyro's compiled steps are not faster than bayes_mdn's eager ones here."
    fixed = p["setup_seconds"] + p["compile_seconds"]
    steps = 1e3 * fixed / saved
    return (
        f"NumPyro's compiled steps are faster ({p['ms_per_step_running']:.2f} ms), so its "
        f"{fixed:.0f} s of setup and compile are paid back after about {steps:,.0f} steps: "
        "longer fits favour NumPyro over the eager fit."
    )


def markdown(result: dict) -> str:
    m, b, p = result["meta"], result["bayes_mdn"], result["numpyro"]
    c = result.get("bayes_mdn_compiled")
    rows = [
        f"| bayes_mdn `fit`, eager (`compile=False`) | {b['seconds']:.1f} | {b['steps']:,} | "
        f"{b['ms_per_step']:.2f} | — | — |"
    ]
    tail = []
    if c is not None:
        rows.append(
            f"| bayes_mdn `fit`, compiled (`compile=True`) | {c['seconds']:.1f} | "
            f"{c['steps']:,} | {c['ms_per_step']:.2f} | — | — |"
        )
        chosen = c if result["auto_compiles"] else b
        tail = [
            "",
            f'The default, `compile="auto"`, {"compiles" if result["auto_compiles"] else "does not compile"} '
            f"a one-network CPU fit of {b['steps']:,} steps (it compiles from "
            f"{result['compile_steps']:,} planned steps on). Ratio of the default's "
            f"time per step to NumPyro's, compile included: "
            f"{chosen['ms_per_step'] / p['ms_per_step']:.2f}; compiled against NumPyro: "
            f"{c['ms_per_step'] / p['ms_per_step']:.2f}.",
        ]
    return "\n".join(
        [
            "# One network, per step: bayes_mdn against NumPyro",
            "",
            f"Generated by `python -m benchmarks.numpyro_speed --rows {m['rows']} --epochs "
            f"{m['epochs']}` on {m['machine']}, torch {m['torch']}, NumPyro {m['numpyro']}, "
            f"JAX {m['jax']}, one thread each, load average {m['load_at_start']} at start and "
            f"{m['load_at_end']} at the end. The model and settings are in the module's "
            "docstring: one network (not the default ensemble), the same work per step. "
            "The compiled bayes_mdn fit includes its compile time (Inductor's on-disk cache "
            "as the machine had it).",
            "",
            "| | seconds, all | steps | ms per step, all | ms per step, steps only | "
            "setup + compile, s |",
            "|---|---|---|---|---|---|",
            *rows,
            f"| NumPyro, `lax.scan` epochs | {p['seconds']:.1f} | {p['steps']:,} | "
            f"{p['ms_per_step']:.2f} | {p['ms_per_step_running']:.2f} | "
            f"{p['setup_seconds']:.1f} + {p['compile_seconds']:.1f} |",
            "",
            f"Ratio bayes_mdn eager / NumPyro per step, compile included: "
            f"{b['ms_per_step'] / p['ms_per_step']:.2f}. " + _crossover(b, p),
            *tail,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    if args.rows < BATCH or args.epochs < 1:
        parser.error(f"--rows must be >= {BATCH} and --epochs >= 1")
    import jax
    import numpyro

    X, y = make_inverse_sine(args.rows, seed=0)
    result = {
        "meta": {
            "rows": args.rows,
            "epochs": args.epochs,
            **machine(),
            "numpyro": numpyro.__version__,
            "jax": jax.__version__,
        },
        "numpyro": time_numpyro(X, y, args.epochs),
        "bayes_mdn": time_bayes_mdn(X, y, args.epochs, compile=False),
        "bayes_mdn_compiled": time_bayes_mdn(X, y, args.epochs, compile=True),
    }
    steps = result["bayes_mdn"]["steps"]
    result["auto_compiles"] = FitConfig().compiles("cpu", steps)
    result["compile_steps"] = COMPILE_STEPS
    result["meta"]["load_at_end"] = round(os.getloadavg()[0], 2)
    emit(result, markdown(result), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
