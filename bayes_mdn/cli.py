"""The ``bayes-mdn`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
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
    demo.add_argument("--epochs", type=_positive_int, default=300, help="maximum epochs")
    demo.add_argument("--seed", type=int, default=0, help="seed of data and fits")
    demo.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


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
    handlers = {"demo": _run_demo}
    try:
        return handlers[args.command](args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"bayes-mdn {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
