"""Command line of the real-data suite: ``python -m benchmarks.real_data --help``."""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import importlib.metadata
import importlib.util
import inspect
import platform
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from bayes_mdn import BayesianMDN

from .datasets import DATASETS
from .harness import ModelFactory, _write_json, model_config, run_suite, summarize
from .peers import PEERS
from .report import plot_summary, write_markdown

__all__ = ["DEFAULT_CACHE", "MODELS", "main", "make_models", "parse_variant"]

DEFAULT_CACHE = Path(__file__).resolve().parents[1] / "real_data_cache.json"
MODELS: tuple[str, ...] = ("bayes_mdn", *PEERS)
# Peers whose package is an optional dependency (the "benchmark" extra).
OPTIONAL = {"ngboost": "ngboost", "zuko_nsf": "zuko", "kde": "statsmodels"}


def _bayes_mdn(**kwargs: Any) -> ModelFactory:
    def factory(seed: int) -> BayesianMDN:
        return BayesianMDN(seed=seed, progress=False, **kwargs)

    return factory


def _peer(cls: type) -> ModelFactory:
    def factory(seed: int) -> Any:
        return cls(seed=seed)

    return factory


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``"NAME=key=value,key=value"`` -> (``"bayes_mdn[NAME]"``, keyword arguments).

    Values are Python literals (``hidden=(32, 32)``, ``lr=1e-3``, ``guide='delta'``); a
    bare word is read as a string (``guide=delta``).

    Examples
    --------
    >>> parse_variant("k5=n_components=5,hidden=(32, 32),guide=delta")
    ('bayes_mdn[k5]', {'n_components': 5, 'hidden': (32, 32), 'guide': 'delta'})
    """
    name, sep, rest = text.partition("=")
    if not sep or not name.isidentifier():
        raise ValueError(f"a variant reads NAME=key=value[,key=value], got {text!r}")
    try:
        call = ast.parse(f"f({rest})", mode="eval").body
    except SyntaxError as err:
        raise ValueError(f"cannot parse the arguments of variant {text!r}: {err}") from err
    if not isinstance(call, ast.Call) or call.args or not call.keywords:
        raise ValueError(f"variant {text!r} must give keyword arguments key=value")
    kwargs: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise ValueError(f"variant {text!r}: ** is not supported")
        if isinstance(kw.value, ast.Name):
            kwargs[kw.arg] = kw.value.id
        else:
            kwargs[kw.arg] = ast.literal_eval(kw.value)
    for bad in ("seed", "progress"):
        if bad in kwargs:
            raise ValueError(f"variant {text!r}: {bad} is set by the suite")
    BayesianMDN(**kwargs)  # an unknown keyword fails here, before any fit
    return f"bayes_mdn[{name}]", kwargs


def make_models(names: Sequence[str], variants: Sequence[str] = ()) -> dict[str, ModelFactory]:
    """Factories for the named models (see ``MODELS``) plus bayes_mdn variants."""
    models: dict[str, ModelFactory] = {}
    for name in names:
        if name == "bayes_mdn":
            models[name] = _bayes_mdn()
        elif name in PEERS:
            models[name] = _peer(PEERS[name])
        else:
            raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    for text in variants:
        label, kwargs = parse_variant(text)
        models[label] = _bayes_mdn(**kwargs)
    return models


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "pyro-ppl", "numpy", "ngboost", "zuko", "statsmodels", "scikit-learn"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _setting(model: Any) -> tuple[str, str]:
    """(cache configuration, the class docstring's first paragraph on one line)."""
    doc = inspect.getdoc(type(model)) or ""
    return model_config(model), " ".join(doc.split("\n\n")[0].split())


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.real_data",
        description="Real-data benchmark of bayes_mdn against peers (issue #12).",
    )
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"comma-separated, from {', '.join(MODELS)} (default: all)",
    )
    parser.add_argument(
        "--datasets",
        default=",".join(DATASETS),
        help=f"comma-separated, from {', '.join(DATASETS)} (default: all)",
    )
    parser.add_argument(
        "--splits",
        type=int,
        default=None,
        help="splits per data set (default: 10 under 1,000 rows, else 5)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=KEY=VALUE[,KEY=VALUE]",
        help="an extra bayes_mdn model with these arguments, reported as bayes_mdn[NAME]; "
        "repeatable. Example: --variant 'k5=n_components=5'",
    )
    parser.add_argument("--out", type=Path, default=Path("docs"), help="folder of the report")
    parser.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help="JSON cache of per-split results (default: benchmarks/real_data_cache.json)",
    )
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write a cache")
    parser.add_argument(
        "--refresh",
        default="",
        help="comma-separated model names to recompute even when cached",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    # Third-party fits warn on every split (statsmodels' bandwidth search, scikit-learn's
    # feature names); the report records what matters.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="statsmodels")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    datasets = _csv(args.datasets)
    for ds in datasets:
        if ds not in DATASETS:
            parser.error(f"unknown data set {ds!r}; available: {', '.join(DATASETS)}")
    try:
        models = make_models(_csv(args.models), args.variant)
    except ValueError as err:
        parser.error(str(err))
    for name in models:
        if name in OPTIONAL and importlib.util.find_spec(OPTIONAL[name]) is None:
            parser.error(
                f"model {name} needs the package {OPTIONAL[name]}: "
                "pip install -e '.[benchmark]' (make benchmark-real does)"
            )
    cache = None if args.no_cache else args.cache
    start = time.perf_counter()
    results = run_suite(
        models, datasets, n_splits=args.splits, cache=cache, refresh=_csv(args.refresh)
    )
    wall = time.perf_counter() - start
    summary = summarize(results)
    seconds: dict[str, float] = {}
    for r in results:
        seconds[r.model] = seconds.get(r.model, 0.0) + (r.fit_seconds or 0.0)
        seconds[r.model] += r.eval_seconds or 0.0
    meta = {
        "command": "python -m benchmarks.real_data "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": _dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.system()}",
        "threads": args.threads,
        "versions": _versions(),
        "wall_seconds_computed": wall,
        "seconds_by_model": seconds,
        "splits": args.splits,
    }
    settings = {n: _setting(f(0)) for n, f in models.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    plot_summary(args.out / "real_data.png", summary, list(models))
    write_markdown(
        args.out / "real_data.md",
        summary,
        list(models),
        meta,
        settings,
        figure="real_data.png",
    )
    _write_json(
        args.out / "real_data.json",
        _finite(
            {
                "meta": meta,
                "models": {n: cfg for n, (cfg, _) in settings.items()},
                "summary": summary,
                "results": [asdict(r) for r in results],
            }
        ),
    )
    print(f"wrote {args.out / 'real_data.md'} ({wall:.0f} s)")
    return 0


def _finite(obj: Any) -> Any:
    """NaN (a standard error of one split) as null, so the JSON is strict."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None
    return obj
