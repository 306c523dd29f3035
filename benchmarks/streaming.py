"""Streamed fits from Parquet: rows per second and peak memory, one process against two.

``python -m benchmarks.streaming [--rows 100000 1000000 10000000] [--batch 500 4096 16384]
[--repeats 3] [--out docs/streaming]``

Writes inverse-sine rows (x, y) to a Parquet file per size in a temporary folder (written in
chunks, never held whole; deleted afterwards), then, each in a fresh Python process so that
peak memory is the fit's own:

* **throughput**: ``BayesianMDN(devices=d, batch_size=b, epochs=1).fit(ParquetSource(...))``
  for d = 1 and 2 and each batch size: the whole call (scan, process start, training, validation),
  rows trained per second (steps times the global batch, over the call's wall time) and the
  peak resident memory of each process (``ru_maxrss``: the fitting process and, with d = 2,
  the largest worker);
* **quality**: at the first size, the default fit (``BayesianMDN()``) from the Parquet file
  against the default in-memory fit of the same rows: test NLL on 20,000 fresh rows (exact
  optimum about 1.29 nats).

On this benchmark's machine two processes share two cores; each process runs one torch
thread. Results (``docs/streaming.md``) state the machine and the load when the run began.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import fmean

from ._report import emit, machine, mean_se

__all__ = ["main", "write_rows"]

CHUNK = 1_000_000
TEST_ROWS = 20_000


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    """n inverse-sine rows (columns x, y) to ``path``, a million at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bayes_mdn import make_inverse_sine

    writer = None
    try:
        for i, start in enumerate(range(0, n, CHUNK)):
            X, y = make_inverse_sine(min(CHUNK, n - start), seed=seed + i)
            table = pa.table({"x": X[:, 0], "y": y})
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table, row_group_size=100_000)
    finally:
        if writer is not None:
            writer.close()


def _peak_mb() -> dict:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_mb": round(own, 1), "worker_peak_mb": round(children, 1)}


def _worker(args: argparse.Namespace) -> None:
    """One measurement, printed as JSON on the last line."""
    from bayes_mdn import BayesianMDN, ParquetSource, make_inverse_sine

    X_test, y_test = make_inverse_sine(TEST_ROWS, seed=10_000)
    options = json.loads(args.options)
    mdn = BayesianMDN(progress=False, **options)
    baseline = _peak_mb()["peak_mb"]
    start = time.perf_counter()
    if args.in_memory:
        import pyarrow.parquet as pq

        table = pq.read_table(args.file)
        mdn.fit(table.column("x").to_numpy()[:, None], table.column("y").to_numpy())
    else:
        mdn.fit(ParquetSource(args.file, x=["x"], y=["y"]))
    seconds = time.perf_counter() - start
    # Read before scoring: the peak of the fit itself (the test predictions come after).
    peak = _peak_mb()
    batch = options.get("batch_size", mdn.batch_size)
    steps = mdn.n_steps_ / mdn.n_members_
    result = {
        "seconds": round(seconds, 2),
        # The training loop alone (rank 0's): no scan, no process start.
        "loop_seconds": round(mdn.history_.seconds, 2),
        "steps_per_member": steps,
        "rows_per_second": round(steps * batch / seconds),
        "import_mb": round(baseline, 1),
        **peak,
        "test_nll": round(-mdn.score(X_test, y_test), 4),
    }
    print(json.dumps(result))


def _measure(file: Path, options: dict, in_memory: bool = False) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.streaming", "--worker", "--file", str(file)]
    cmd += ["--options", json.dumps(options)] + (["--in-memory"] if in_memory else [])
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(rows: list[int], batches: list[int], repeats: int = 1) -> dict:
    """Every (rows, batch) cell ``repeats`` times, one and two processes each round, in
    alternating order (1 then 2, then 2 then 1) so that a drift in the machine's load
    does not favour either."""
    result: dict = {**machine(), "repeats": repeats, "throughput": [], "quality": None}
    with tempfile.TemporaryDirectory() as tmp:
        for i, n in enumerate(rows):
            file = Path(tmp) / f"rows{n}.parquet"
            start = time.perf_counter()
            write_rows(file, n)
            print(f"wrote {n} rows in {time.perf_counter() - start:.1f} s", flush=True)
            if i == 0:
                result["quality"] = {
                    "rows": n,
                    "parquet": _measure(file, {}),
                    "in_memory": _measure(file, {}, in_memory=True),
                }
                print(result["quality"], flush=True)
            for batch in batches:
                for r in range(repeats):
                    for devices in (1, 2) if r % 2 == 0 else (2, 1):
                        options = {"devices": devices, "batch_size": batch, "epochs": 1}
                        entry = {"rows": n, "batch": batch, "devices": devices, "round": r}
                        entry |= _measure(file, options)
                        result["throughput"].append(entry)
                        print(entry, flush=True)
            file.unlink()
    return result


def _fmt(mean: float, se: float) -> str:
    return f"{mean:.2f}" if math.isnan(se) else f"{mean:.2f} ± {se:.2f}"


def _cells(result: dict) -> dict:
    """(rows, batch) -> {"one": [entries by round], "two": [...], "ratio": [...],
    "loop_ratio": [...]}: ratios paired within each round."""
    cells: dict = {}
    for e in result["throughput"]:
        cell = cells.setdefault((e["rows"], e["batch"]), {1: {}, 2: {}})
        cell[e["devices"]][e.get("round", 0)] = e
    out = {}
    for key, cell in cells.items():
        rounds = sorted(set(cell[1]) & set(cell[2]))
        one = [cell[1][r] for r in rounds]
        two = [cell[2][r] for r in rounds]
        out[key] = {
            "one": one,
            "two": two,
            "ratio": [b["rows_per_second"] / a["rows_per_second"] for a, b in zip(one, two)],
            "loop_ratio": [
                a["loop_seconds"] / b["loop_seconds"]
                for a, b in zip(one, two)
                if "loop_seconds" in a and "loop_seconds" in b
            ],
        }
    return out


def report(result: dict) -> str:
    repeats = result.get("repeats", 1)
    lines = [
        "# Streamed fits from Parquet: throughput and memory",
        "",
        f"Machine: {result['machine']}, torch {result['torch']}, load average at start "
        f"{result['load_at_start']}. Command: `python -m benchmarks.streaming "
        f"--repeats {repeats}` (`make benchmark-streaming`).",
        "",
        "One epoch of the default model (5 stacked mean-field members) from a Parquet file "
        "of inverse-sine rows; each fit in a fresh process. Rows/s = optimizer steps times "
        "the global batch over the whole call (scan, process start, training, validation); "
        "the training loop is rank 0's time from building the members to the end of "
        "training (no scan, no process start). "
        f"Each cell ran {repeats} time(s), one and two processes in each round (alternating "
        "which went first); seconds and rows/s are means over the rounds, and each speed-up "
        "is the mean ± standard error of the per-round ratios (two processes against one "
        "in the same round). "
        "Peak memory is `ru_maxrss` when `fit` returns (before the test predictions), the "
        "largest over the rounds, of the fitting process and, for 2 processes, of the "
        "largest worker; importing "
        f"bayes_mdn and its dependencies alone takes about {result['throughput'][0]['import_mb']:.0f} "
        "MB.",
        "",
        "| rows | batch | processes | seconds | rows/s | speed-up | training loop, s | "
        "loop speed-up | peak MB (main / worker) | test NLL |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    cells = _cells(result)
    for (n, batch), cell in cells.items():
        for devices, entries in ((1, cell["one"]), (2, cell["two"])):
            seconds = fmean([e["seconds"] for e in entries])
            rate = fmean([e["rows_per_second"] for e in entries])
            has_loop = all("loop_seconds" in e for e in entries)
            loop_s = fmean([e["loop_seconds"] for e in entries]) if has_loop else None
            if devices == 1:
                speedup, loop_up = "1.00", "1.00"
            else:
                speedup = _fmt(*mean_se(cell["ratio"]))
                loop_up = _fmt(*mean_se(cell["loop_ratio"])) if cell["loop_ratio"] else "-"
            loop = f"{loop_s:.1f} | {loop_up}" if loop_s is not None else "- | -"
            peak = max(e["peak_mb"] for e in entries)
            worker = f"{max(e['worker_peak_mb'] for e in entries):.0f}" if devices > 1 else "-"
            lines.append(
                f"| {n:,} | {batch} | {devices} | {seconds:.1f} | {rate:,.0f} | {speedup} | "
                f"{loop} | {peak:.0f} / {worker} | {entries[0]['test_nll']:.4f} |"
            )
    q = result["quality"]
    if q:
        lines += [
            "",
            f"Default fit on {q['rows']:,} rows, streamed from Parquet against in memory "
            f"(test NLL on {TEST_ROWS:,} fresh rows; exact optimum about 1.29):",
            "",
            "| data | seconds | optimizer steps per member | test NLL | peak MB |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, key in (("Parquet, streamed", "parquet"), ("in memory", "in_memory")):
            e = q[key]
            lines.append(
                f"| {name} | {e['seconds']:.1f} | {e['steps_per_member']:.0f} | "
                f"{e['test_nll']:.4f} | {e['peak_mb']:.0f} |"
            )
        gap = q["parquet"]["test_nll"] - q["in_memory"]["test_nll"]
        lines += ["", f"Streamed minus in-memory test NLL: {gap:+.4f} nats (one seed)."]
    lines += ["", "## Reading", ""]
    largest = max(n for n, _ in cells)
    smallest = min(n for n, _ in cells)
    for batch in sorted({b for _, b in cells}):
        big, small = cells[(largest, batch)], cells[(smallest, batch)]
        sizes = sorted(n for n, b in cells if b == batch and n >= 1e6)
        per_row = [
            1e6 / fmean([e["rows_per_second"] for e in cells[(n, batch)]["one"]]) for n in sizes
        ]
        loop = (
            f" ({_fmt(*mean_se(big['loop_ratio']))}x in the training loop alone)"
            if big["loop_ratio"]
            else ""
        )
        lines.append(
            f"- Batch {batch}: at {largest:,} rows two processes train "
            f"{_fmt(*mean_se(big['ratio']))}x the rows per second of one{loop}, over "
            f"{len(big['ratio'])} round(s); at {smallest:,} rows, where training is short, "
            "the whole call took "
            f"{fmean([e['seconds'] for e in small['two']]):.1f} s with two processes "
            f"and {fmean([e['seconds'] for e in small['one']]):.1f} s with one. "
            "One process: "
            + ", ".join(f"{t:.1f}" for t in per_row)
            + f" s per million rows trained at {', '.join(f'{n:,}' for n in sizes)} rows."
        )
    peak = max(max(e["peak_mb"], e["worker_peak_mb"]) for e in result["throughput"])
    lines.append(f"- Largest peak of any process: {peak:.0f} MB.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--batch", type=int, nargs="+", default=[500, 4096, 16384])
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds of every cell (one and two processes)"
    )
    parser.add_argument("--out", type=Path, default=None, help="write <out>.json and <out>.md")
    parser.add_argument(
        "--from-json", type=Path, default=None, help="rewrite the report of a saved result"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        emit(result, report(result), args.out)
        return
    result = run(args.rows, args.batch, args.repeats)
    emit(result, report(result), args.out)


if __name__ == "__main__":
    main()
