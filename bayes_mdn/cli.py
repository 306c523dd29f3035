"""The ``bayes-mdn`` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main", "verb_main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**63), got {text}")
    return value


def _device(text: str) -> str:
    # Checked while parsing, so a typo fails at once instead of after the first fit.
    from ._utils import resolve_device

    try:
        resolve_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bayes-mdn",
        description="Bayesian mixture density networks in Pyro.",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch CPU threads for the whole command (default: %(default)s; MDN-sized "
        "work runs fastest on one thread, and far slower on several when cores are busy)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="fit a regression net and a Bayesian MDN on the inverse-sine problem",
        description=(
            "Redo the founding MDN tutorial: the inverse-sine problem, where a plain "
            "regression net fails and a 20-component Bayesian MDN captures every branch. "
            "Writes PNG figures and summary.json (test NLL of both models and of the "
            "exact oracle) to the output folder."
        ),
    )
    demo.add_argument("--out", default="demo_output", help="output folder (default: %(default)s)")
    demo.add_argument("--n-train", type=_positive_int, default=5000, help="training points")
    demo.add_argument("--n-test", type=_positive_int, default=20000, help="fresh test points")
    demo.add_argument(
        "--epochs",
        type=_positive_int,
        help="maximum epochs of both fits (default: 300 for the regression net, the "
        "library's step budget for the MDN)",
    )
    demo.add_argument("--seed", type=_seed, default=0, help="seed of data and fits")
    demo.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    diag = sub.add_parser(
        "diagnose",
        help="fit a model and write a diagnostics report (JSON, figures, netCDF)",
        description=(
            "Fit a Bayesian MDN on the inverse-sine problem (default) or on a CSV file, "
            "then write report.json (PSIS-LOO, variational k-hat, PIT, coverage, CRPS, NLL), "
            "inference_data.nc (ArviZ data, netCDF) and PNG figures to the output folder. "
            "A quarter of the rows is held out for the calibration numbers."
        ),
    )
    diag.add_argument("--out", default="diagnostics", help="output folder (default: %(default)s)")
    diag.add_argument(
        "--model",
        default=None,
        help="diagnose this saved model on --csv instead of fitting one (every row is used)",
    )
    diag.add_argument("--csv", default=None, help="CSV file with a header row (default: demo)")
    diag.add_argument("--x", type=_columns, default=None, help="input columns of --csv")
    diag.add_argument("--y", type=_columns, default=None, help="target columns of --csv")
    diag.add_argument("--n-train", type=_positive_int, default=2000, help="demo training points")
    diag.add_argument("--epochs", type=_positive_int, default=200, help="maximum epochs")
    diag.add_argument("--components", type=_positive_int, default=10, help="mixture components")
    diag.add_argument("--bayesian", choices=("none", "last", "all"), default="last")
    diag.add_argument("--guide", choices=("delta", "normal", "lowrank"), default="normal")
    diag.add_argument("--num-draws", type=_positive_int, default=100, help="posterior draws")
    diag.add_argument("--seed", type=_seed, default=0, help="seed of data, fit and draws")
    diag.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    diag.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    for verb, (help_text, description, add_arguments, _) in VERBS.items():
        add_arguments(sub.add_parser(verb, help=help_text, description=description))
    return parser


def _columns(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated column names, got {text!r}")
    return names


def _levels(text: str) -> tuple[float, ...]:
    try:
        levels = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.5,0.9, got {text!r}") from None
    if not all(0 < v < 1 for v in levels):
        raise argparse.ArgumentTypeError(f"levels must lie strictly in (0, 1), got {text!r}")
    return levels


def _hidden(text: str) -> tuple[int, ...]:
    return tuple(_positive_int(v) for v in text.split(","))


def _add_fit_arguments(p: argparse.ArgumentParser) -> None:
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--csv", help="training CSV file with a header row")
    data.add_argument(
        "--parquet",
        help="training Parquet file or folder, streamed in windows (memory flat in the rows)",
    )
    p.add_argument("--x", required=True, type=_columns, help="input columns, comma-separated")
    p.add_argument("--y", required=True, type=_columns, help="target column(s), comma-separated")
    p.add_argument("--model", required=True, help="model file to write")
    # Left unset, every model setting is the library's default (see BayesianMDN).
    p.add_argument("--components", type=_positive_int, help="mixture components K")
    p.add_argument("--members", type=_positive_int, help="ensemble members")
    p.add_argument(
        "--jobs",
        type=int,
        help="worker processes fitting the members one by one (-1: every core); only for "
        "--guide lowrank: delta and normal members train stacked in one process",
    )
    p.add_argument("--hidden", type=_hidden, help="hidden widths, e.g. 64,16")
    p.add_argument("--activation", choices=("tanh", "relu", "elu", "gelu", "silu"))
    p.add_argument("--bayesian", choices=("none", "last", "all"))
    p.add_argument("--guide", choices=("delta", "normal", "lowrank"))
    p.add_argument(
        "--prior-function",
        type=float,
        help="scale of each member's randomized prior function, in sds of y (0: none)",
    )
    p.add_argument(
        "--epochs", type=_positive_int, help="maximum epochs (default: a budget in steps)"
    )
    p.add_argument("--batch-size", type=_positive_int, help="mini-batch size")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the fit")
    p.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default="float32",
        help="precision of the model (default: %(default)s; float64 holds values beyond "
        "3.4e38 and spreads finer than float32 resolves)",
    )
    p.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--devices",
        type=_positive_int,
        default=1,
        help="processes of a data-parallel fit (DDP via Lightning Fabric: gloo on the CPU, "
        "one GPU each with --device cuda); each takes a slice of every mini-batch",
    )
    p.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="torch.compile the training step (default: %(default)s: long fits where that "
        "measured faster, see FitConfig.compiles; 'on' needs a C++ compiler on the CPU)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model file written by fit")
    p.add_argument("--csv", required=True, help="CSV file holding the input columns")
    p.add_argument("--x", required=True, type=_columns, help="input columns, comma-separated")
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("--levels", type=_levels, default=(0.5, 0.9), help="interval levels")
    p.add_argument(
        "--samples",
        type=_positive_int,
        default=None,
        help="write this many posterior-predictive draws per row instead of summaries",
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed of the posterior draws")
    p.add_argument("--device", type=_device, default="cpu", help="where to load the model")


def _add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model file written by fit")
    p.add_argument("--csv", required=True, help="held-out CSV file with inputs and targets")
    p.add_argument("--x", required=True, type=_columns, help="input columns, comma-separated")
    p.add_argument("--y", required=True, type=_columns, help="target column(s), comma-separated")
    p.add_argument("--out", required=True, help="folder for metrics.json and figures")
    p.add_argument("--levels", type=_levels, default=(0.5, 0.9), help="interval levels")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the posterior draws")
    p.add_argument("--device", type=_device, default="cpu", help="where to load the model")


def _refuse_overwrite(out: str, out_flag: str, inputs: dict[str, str | None]) -> None:
    """Refuse an output path that names one of the inputs (the same file, by any path)."""
    target = Path(out).resolve()
    for flag, path in inputs.items():
        if path is None:
            continue
        same = target == Path(path).resolve()
        if not same and target.exists() and Path(path).exists():
            same = os.path.samefile(target, path)
        if same:
            raise ValueError(
                f"{out_flag} {out!r} is the file given by {flag}: writing there would "
                "overwrite an input; choose another output path"
            )


def _run_fit(args: argparse.Namespace) -> int:
    from .tabular import fit_csv, fit_parquet

    _refuse_overwrite(args.model, "--model", {"--csv": args.csv, "--parquet": args.parquet})
    given = {
        "n_components": args.components,
        "n_members": args.members,
        "n_jobs": args.jobs,
        "hidden": args.hidden,
        "activation": args.activation,
        "bayesian": args.bayesian,
        "guide": "delta" if args.bayesian == "none" else args.guide,
        "prior_function": args.prior_function,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
    }
    mdn = (fit_csv if args.csv is not None else fit_parquet)(
        args.csv if args.csv is not None else args.parquet,
        args.x,
        args.y,
        args.model,
        **{k: v for k, v in given.items() if v is not None},
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
        devices=args.devices,
        compile={"auto": "auto", "on": True, "off": False}[args.compile],
        progress=not args.no_progress,
    )
    print(f"{fit_summary(mdn)}; model written to {args.model}")
    return 0


def fit_summary(mdn: Any) -> str:
    """One line on what a fit did: members, steps, the kept validation or training score."""
    parts = []
    for h in mdn.histories_:
        if h.val_nll:
            parts.append(f"{min(h.val_nll):.4f}")
        else:
            parts.append(f"{h.train_loss[-1]:.4f}")
    what = "validation NLL" if mdn.history_.val_nll else "train loss"
    members = f"{mdn.n_members_} member{'s' if mdn.n_members_ > 1 else ''}"
    return f"fitted {members} in {mdn.n_steps_} steps (kept {what}: {', '.join(parts)})"


def _run_predict(args: argparse.Namespace) -> int:
    from .io import load
    from .tabular import check_columns_fit, predict_table, read_columns, write_csv

    _refuse_overwrite(args.out, "--out", {"--csv": args.csv, "--model": args.model})
    model = load(args.model, device=args.device)
    X = read_columns(args.csv, args.x, "--x")
    check_columns_fit(args.csv, X, args.x, "--x", model.dtype)
    header, cols = predict_table(model, X, args.levels, n_samples=args.samples, seed=args.seed)
    write_csv(args.out, header, cols)
    print(
        f"{len(X)} rows of {', '.join(header[:6])}{', ...' if len(header) > 6 else ''} "
        f"written to {args.out}"
    )
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from .io import load
    from .tabular import check_columns_fit, evaluate_model, read_columns

    _refuse_overwrite(args.out, "--out", {"--csv": args.csv, "--model": args.model})
    model = load(args.model, device=args.device)
    X = read_columns(args.csv, args.x, "--x")
    y = read_columns(args.csv, args.y, "--y")
    check_columns_fit(args.csv, X, args.x, "--x", model.dtype)
    check_columns_fit(args.csv, y, args.y, "--y", model.dtype)
    metrics = evaluate_model(model, X, y, args.out, args.levels, seed=args.seed)
    cover = ", ".join(f"{k}: {v[0]:.3f}" for k, v in metrics["coverage"].items())
    print(f"NLL {metrics['nll']:.4f} nats/point; interval coverage {cover}")
    print(f"metrics.json and {len(metrics['figures'])} figure(s) written to {args.out}")
    return 0


# verb -> (help, description, add_arguments, handler)
VERBS = {
    "fit": (
        "fit a Bayesian MDN on columns of a CSV file and save it",
        "Fit a Bayesian MDN of p(y | x) on the --x and --y columns of a CSV file (header "
        "row, numbers only) and write the model file (no pickle) to --model.",
        _add_fit_arguments,
        _run_fit,
    ),
    "predict": (
        "predict from a model file for the rows of a CSV file",
        "Load a model file and write a CSV with, per input row, the predictive mean, "
        "standard deviation and central interval bounds, or --samples posterior-"
        "predictive draws.",
        _add_predict_arguments,
        _run_predict,
    ),
    "evaluate": (
        "score a model file on a held-out CSV file",
        "Load a model file and score it on held-out rows: metrics.json (NLL, RMSE, "
        "interval coverage, mean PIT), a PIT histogram and, for one input and one "
        "output, a predictive-samples figure, all written to --out.",
        _add_evaluate_arguments,
        _run_evaluate,
    ),
}


# What bad input (files, columns, values, settings) raises: each becomes exit status 2 and
# one line on stderr. ArithmeticError covers a fit that diverges (FloatingPointError) and
# a moment beyond float64 (OverflowError).
_BAD_INPUT = (ValueError, TypeError, OSError, ArithmeticError)


def _run(name: str, handler: Any, args: argparse.Namespace) -> int:
    try:
        return handler(args)
    except _BAD_INPUT as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{name}: error: {message}", file=sys.stderr)
        return 2


def verb_main(verb: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run one verb (``fit``, ``predict`` or ``evaluate``) as a standalone program.

    The scripts in ``scripts/`` are this function under another name; returns the exit
    status (2 for bad input, with the reason on stderr).
    """
    help_text, description, add_arguments, handler = VERBS[verb]
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser)
    return _run(parser.prog, handler, parser.parse_args(argv))


def _run_diagnose(args: argparse.Namespace) -> int:
    import numpy as np

    from .datasets import make_inverse_sine
    from .diagnostics import run_diagnostics
    from .estimator import BayesianMDN
    from .io import load
    from .tabular import check_columns_fit, read_columns

    model = None
    if args.csv is not None or args.model is not None:
        if args.csv is None or args.x is None or args.y is None:
            raise ValueError("--model and --csv need --csv, --x and --y (column names)")
        X = read_columns(args.csv, args.x, "--x")
        Y = read_columns(args.csv, args.y, "--y")
        # The report folder is written piece by piece: values the model's dtype cannot
        # hold are refused before anything is written.
        model = load(args.model, device=args.device) if args.model is not None else None
        dtype = "float32" if model is None else model.dtype
        check_columns_fit(args.csv, X, args.x, "--x", dtype)
        check_columns_fit(args.csv, Y, args.y, "--y", dtype)
        y = Y[:, 0] if Y.shape[1] == 1 else Y
    else:
        X, y = make_inverse_sine(args.n_train + args.n_train // 3, seed=args.seed)
    if model is not None:
        report = run_diagnostics(
            model, X, y, out_dir=args.out, num_draws=args.num_draws, seed=args.seed
        )
        return _print_report(report, args.out)
    perm = np.random.default_rng(args.seed).permutation(len(X))
    n_test = len(X) // 4
    test, train = perm[:n_test], perm[n_test:]
    guide = "delta" if args.bayesian == "none" else args.guide
    model = BayesianMDN(
        n_components=args.components,
        hidden=(32, 32),
        bayesian=args.bayesian,
        guide=guide,  # type: ignore[arg-type]  # argparse choices already restrict it
        epochs=args.epochs,
        num_draws=args.num_draws,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    ).fit(X[train], y[train])
    report = run_diagnostics(
        model, X[train], y[train], X[test], y[test], out_dir=args.out, seed=args.seed
    )
    return _print_report(report, args.out)


def _print_report(report: dict[str, Any], out: str) -> int:
    cal = report["calibration"]
    lines = []
    if "heldout_lpd" in report:
        lines.append(f"held-out log predictive density: {report['heldout_lpd']:.4f} nats/point")
    if "loo" in report:
        lines.append(
            f"PSIS-LOO elpd: {report['loo']['elpd_loo']:.1f} (se {report['loo']['se']:.1f})"
        )
        lines.append(report["loo"]["reading"])
    else:
        lines.append(report["posterior"])
    if "variational_check" in report:
        lines.append(report["variational_check"]["reading"])
    lines.append(
        f"PIT KS p-value: {cal['ks'][0]['p_value']:.3g}; CRPS: {cal['crps'][0]:.4f}; "
        f"coverage at {cal['levels']}: {[round(c[0], 3) for c in cal['coverage']]}"
    )
    lines.append(f"report written to {out}/")
    print("\n".join(lines))
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import format_summary, run_demo

    summary = run_demo(
        args.out,
        n_train=args.n_train,
        n_test=args.n_test,
        epochs=args.epochs,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
    )
    print(format_summary(summary, args.out))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    handlers = {"demo": _run_demo, "diagnose": _run_diagnose} | {
        verb: spec[3] for verb, spec in VERBS.items()
    }
    return _run(f"bayes-mdn {args.command}", handlers[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
