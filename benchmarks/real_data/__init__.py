"""Real-data benchmark suite of bayes_mdn against peers (issue #12).

Six data sets (faithful, mcycle, airquality, Computers, Wages1, Caschool), repeated random
train/test splits shared by every model, test NLL per point in y's original units, 90 %
interval coverage and fit seconds. Peers: a plain PyTorch MLE MDN, NGBoost (Normal), a zuko
NSF conditional flow, a Gaussian linear model and a conditional KDE. Per-split results are
cached by configuration, so a change to bayes_mdn reruns bayes_mdn only.

Command line: ``python -m benchmarks.real_data --help``. From Python::

    from benchmarks.real_data import run_suite, summarize, make_models
    results = run_suite(make_models(["bayes_mdn", "linear"]), n_splits=1, cache=None)
    summarize(results)["faithful"]["paired"]["bayes_mdn"]
"""

from .cli import MODELS, main, make_models, parse_variant
from .datasets import DATASETS, RealDataset, load
from .harness import (
    Model,
    ResultCache,
    SplitResult,
    default_splits,
    model_config,
    paired_differences,
    run_suite,
    split_indices,
    summarize,
)
from .peers import MLEMDN, PEERS, ConditionalKDE, GaussianLinear, NGBoostNormal, ZukoNSF

__all__ = [
    "DATASETS",
    "MLEMDN",
    "MODELS",
    "PEERS",
    "ConditionalKDE",
    "GaussianLinear",
    "Model",
    "NGBoostNormal",
    "RealDataset",
    "ResultCache",
    "SplitResult",
    "ZukoNSF",
    "default_splits",
    "load",
    "main",
    "make_models",
    "model_config",
    "paired_differences",
    "parse_variant",
    "run_suite",
    "split_indices",
    "summarize",
]
