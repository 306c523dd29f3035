"""The real-data benchmark (benchmarks/real_data): harness, peers, data, and a reduced run."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from benchmarks.real_data import (
    DATASETS,
    PEERS,
    GaussianLinear,
    RealDataset,
    SplitResult,
    load,
    main,
    make_models,
    model_config,
    paired_differences,
    parse_variant,
    run_suite,
    split_indices,
    summarize,
)
from benchmarks.real_data.datasets import DATA_DIR

ROOT = Path(__file__).resolve().parents[1]


def _synthetic(n: int = 200, scale: float = 1.0, seed: int = 0) -> RealDataset:
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, size=(n, 2))
    y = scale * (X[:, 0] + 0.5 * np.sin(3 * X[:, 1]) + 0.3 * rng.standard_normal(n))
    return RealDataset("synthetic", X, y, ("a", "b"), "y", "test data", f"s{seed}x{scale}")


class Recorder:
    """Remembers the rows it was fitted and scored on; log density of N(0, 1)."""

    seen: ClassVar[list[tuple[str, int, bytes, bytes]]] = []
    fits: ClassVar[int] = 0

    def __init__(self, seed: int, tag: str = "a", param: int = 0) -> None:
        self.seed, self.tag, self.param = seed, tag, param

    def config(self) -> str:
        return f"Recorder(param={self.param})"

    def fit(self, X: np.ndarray, y: np.ndarray) -> Recorder:
        type(self).fits += 1
        self._train = X.tobytes()
        return self

    def log_prob(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        type(self).seen.append((self.tag, self.seed, self._train, X.tobytes()))
        return -0.5 * y**2 - 0.5 * math.log(2 * math.pi)


@pytest.fixture
def recorder():
    Recorder.seen, Recorder.fits = [], 0
    return Recorder


# -- data ---------------------------------------------------------------------------


def test_bundled_files_match_the_readme_checksums():
    readme = (DATA_DIR / "README.md").read_text()
    listed = dict(
        (name, digest)
        for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+\.csv)$", readme, re.M)
    )
    assert set(listed) == {"airquality.csv", "caschool.csv", "computers.csv", "wages1.csv"}
    for name, digest in listed.items():
        assert hashlib.sha256((DATA_DIR / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.parametrize(
    ("name", "n", "d", "target"),
    [
        ("airquality", 111, 3, "Ozone"),
        ("mcycle", 133, 1, "accel"),
        ("faithful", 272, 1, "eruptions"),
        ("caschool", 420, 10, "testscr"),
        ("wages1", 3294, 3, "wage"),
        ("computers", 6259, 9, "price"),
    ],
)
def test_load_shapes_and_columns(name, n, d, target):
    ds = load(name)
    assert ds.X.shape == (n, d) and ds.y.shape == (n,) and ds.target_name == target
    assert np.isfinite(ds.X).all() and np.isfinite(ds.y).all()
    assert target not in ds.feature_names
    assert len(ds.fingerprint) == 16


def test_data_choices_of_the_readme():
    cas = load("caschool")
    assert not {"readscr", "mathscr", "distcod", "county", "district"} & set(cas.feature_names)
    comp = load("computers")
    for col in ("cd", "multi", "premium"):
        assert set(np.unique(comp.X[:, comp.feature_names.index(col)])) == {0.0, 1.0}
    wages = load("wages1")
    assert set(np.unique(wages.X[:, wages.feature_names.index("sex")])) == {0.0, 1.0}
    assert DATASETS[0] == "airquality" and len(DATASETS) == 6


def test_unknown_data_set_is_named():
    with pytest.raises(ValueError, match="unknown data set 'nope'"):
        load("nope")


# -- splits and the harness ---------------------------------------------------------


def test_split_indices_are_a_seeded_partition():
    tr, te = split_indices(111, 3)
    assert len(te) == 22 and len(tr) == 89
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(111))
    tr2, te2 = split_indices(111, 3)
    assert np.array_equal(te, te2) and np.array_equal(tr, tr2)
    assert not np.array_equal(te, split_indices(111, 4)[1])
    with pytest.raises(ValueError, match="test_fraction"):
        split_indices(10, 0, test_fraction=1.5)


def test_every_model_sees_the_same_splits(recorder):
    ds = _synthetic()
    models = {"a": lambda s: recorder(s, "a"), "b": lambda s: recorder(s, "b")}
    results = run_suite(models, [ds], n_splits=3, cache=None, log=None)
    assert len(results) == 6 and all(r.status == "ok" for r in results)
    by_model = {tag: [s for s in recorder.seen if s[0] == tag] for tag in "ab"}
    assert [s[1:] for s in by_model["a"]] == [s[1:] for s in by_model["b"]]
    assert len({s[3] for s in by_model["a"]}) == 3  # the three test sets differ
    tr, te = split_indices(ds.n, 2)
    assert by_model["a"][2][3] == ds.X[te].tobytes()
    assert by_model["a"][2][2] == ds.X[tr].tobytes()


def test_nll_is_the_mean_negative_log_density_on_the_test_rows(recorder):
    ds = _synthetic()
    (r,) = run_suite({"a": lambda s: recorder(s)}, [ds], n_splits=1, cache=None, log=None)
    _, te = split_indices(ds.n, 0)
    expected = np.mean(0.5 * ds.y[te] ** 2 + 0.5 * math.log(2 * math.pi))
    assert r.nll == pytest.approx(expected, rel=1e-12)
    assert r.n_test == len(te) and r.coverage is None


def test_gaussian_linear_matches_the_closed_form_nll():
    """y = 2 x + N(0, sigma^2) with sigma = 1000: the true conditional's NLL per point is
    0.5 log(2 pi e sigma^2) = 8.3266; OLS on 8,000 rows estimates it to within ~0.02
    (sampling sd of the test mean 0.5 z^2 is sqrt(0.5 / 2000) = 0.016)."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((10_000, 1))
    y = 2 * X[:, 0] + 1000 * rng.standard_normal(10_000)
    ds = RealDataset("gauss", X, y, ("x",), "y", "closed form", "g")
    models = {"linear": lambda s: GaussianLinear(seed=s)}
    (r,) = run_suite(models, [ds], n_splits=1, cache=None, log=None)
    truth = 0.5 * math.log(2 * math.pi * math.e * 1000**2)
    assert r.nll == pytest.approx(truth, abs=0.05)
    assert r.coverage == pytest.approx(0.9, abs=0.03)


@pytest.mark.parametrize("peer", ["linear", "mle_mdn", "ngboost", "zuko_nsf", "kde"])
def test_peers_report_densities_in_the_units_of_y(peer):
    """Rescaling y by 1000 must add log(1000) to every NLL: each peer that standardizes y
    inside pays the Jacobian. Trees and the KDE see y only through its z-scores, the
    networks train on the same z-scores, so the fits agree up to float rounding."""
    optional = {"ngboost": "ngboost", "zuko_nsf": "zuko", "kde": "statsmodels"}
    if peer in optional:
        pytest.importorskip(optional[peer], reason="optional peer: pip install -e '.[benchmark]'")
    small = {
        "mle_mdn": {"max_steps": 100},
        "zuko_nsf": {"max_steps": 50, "n_interval_samples": 50},
        "ngboost": {"n_estimators": 20},
    }.get(peer, {})
    nll = []
    for scale in (1.0, 1000.0):
        ds = _synthetic(100, scale=scale)
        factory = lambda s: PEERS[peer](seed=s, **small)  # noqa: E731
        (r,) = run_suite({peer: factory}, [ds], n_splits=1, cache=None, log=None)
        assert r.status == "ok", r.error
        nll.append(r.nll)
    tol = 0.05 if peer == "ngboost" else 1e-3
    assert nll[1] - nll[0] == pytest.approx(math.log(1000.0), abs=tol)


def test_cache_reuses_results_and_misses_on_a_new_config(tmp_path, recorder):
    ds = _synthetic()
    cache = tmp_path / "cache.json"
    models = {"a": lambda s: recorder(s)}
    first = run_suite(models, [ds], n_splits=2, cache=cache, log=None)
    assert recorder.fits == 2
    again = run_suite(models, [ds], n_splits=2, cache=cache, log=None)
    assert recorder.fits == 2 and [r.nll for r in again] == [r.nll for r in first]
    changed = {"a": lambda s: recorder(s, param=1)}
    run_suite(changed, [ds], n_splits=2, cache=cache, log=None)
    assert recorder.fits == 4
    run_suite(models, [ds], n_splits=2, cache=cache, refresh=["a"], log=None)
    assert recorder.fits == 6
    run_suite(models, [ds], n_splits=3, cache=cache, log=None)
    assert recorder.fits == 7  # only the new split
    entries = json.loads(cache.read_text())["results"]
    assert len(entries) == 5 and all("|split=" in k for k in entries)


def test_bayes_mdn_config_follows_its_arguments():
    from bayes_mdn import BayesianMDN

    base = model_config(BayesianMDN(seed=0, progress=False))
    assert base == model_config(BayesianMDN(seed=7, progress=False))
    assert base != model_config(BayesianMDN(seed=0, progress=False, n_components=5))
    assert "|src=" in base and "|torch=" in base


def test_a_failing_model_is_recorded_or_raised(recorder):
    class Broken(Recorder):
        def fit(self, X, y):
            raise RuntimeError("boom")

    ds = _synthetic()
    (r,) = run_suite({"x": lambda s: Broken(s)}, [ds], n_splits=1, cache=None, log=None)
    assert r.status == "failed" and "boom" in r.error and r.nll is None
    with pytest.raises(RuntimeError, match="boom"):
        run_suite({"x": lambda s: Broken(s)}, [ds], 1, cache=None, on_error="raise", log=None)


def test_a_peer_declines_tables_over_its_row_limit(recorder):
    class Small(Recorder):
        max_train_rows = 100

    (r,) = run_suite({"k": lambda s: Small(s)}, [_synthetic(200)], 1, cache=None, log=None)
    assert r.status == "skipped" and recorder.fits == 0


def _result(model: str, split: int, nll: float) -> SplitResult:
    return SplitResult("d", split, model, "c", "ok", 80, 20, nll=nll, fit_seconds=1.0)


def test_summary_picks_the_best_peer_and_pairs_the_splits():
    a = [1.0, 2.0, 3.0]
    b = [1.5, 2.5, 2.0]  # + 0.1 below: mean 2.1, worse than a's 2.0 though better on split 2
    ours = [0.9, 2.2, 3.1]
    results = [_result("peer_a", s, v) for s, v in enumerate(a)]
    results += [_result("peer_b", s, v + 0.1) for s, v in enumerate(b)]
    results += [_result("bayes_mdn", s, v) for s, v in enumerate(ours)]
    s = summarize(results)["d"]
    assert s["best_peer"] == "peer_a"
    m = s["models"]["peer_a"]
    assert m["nll_mean"] == pytest.approx(2.0)
    assert m["nll_se"] == pytest.approx(np.std(a, ddof=1) / math.sqrt(3))
    d = np.array(ours) - np.array(a)
    p = s["paired"]["bayes_mdn"]
    assert p["vs"] == "peer_a" and p["mean"] == pytest.approx(d.mean())
    assert p["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(3))


def test_parse_variant():
    assert parse_variant("k5=n_components=5") == ("bayes_mdn[k5]", {"n_components": 5})
    name, kw = parse_variant("x=hidden=(32, 32),guide=delta,lr=1e-3")
    assert kw == {"hidden": (32, 32), "guide": "delta", "lr": 1e-3}
    for bad in ("k5", "k5=", "k5=seed=1", "k5=5", "k5=not_an_argument=1"):
        with pytest.raises((ValueError, TypeError)):
            parse_variant(bad)
    with pytest.raises(ValueError, match="unknown model"):
        make_models(["bayes_mdn", "gbm"])


def test_command_line_writes_the_report(tmp_path):
    out = tmp_path / "out"
    cache = tmp_path / "cache.json"
    args = ["--models", "linear", "--datasets", "airquality,mcycle", "--splits", "2"]
    assert main([*args, "--out", str(out), "--cache", str(cache)]) == 0
    md = (out / "real_data.md").read_text()
    assert "| airquality | 111 | 3 | 2 |" in md and "## Protocol" in md
    data = json.loads((out / "real_data.json").read_text())
    assert len(data["results"]) == 4 and data["summary"]["mcycle"]["best_peer"] == "linear"
    assert (out / "real_data.png").stat().st_size > 10_000
    assert len(json.loads(cache.read_text())["results"]) == 4


# -- the reduced run of CI ------------------------------------------------------------

# Paired gap d = NLL(bayes_mdn) - NLL(mle_mdn) per split under the library defaults of main at
# bc41a22, from the full run of 2026-12-01 (docs/real_data.json; 10 splits under 1,000 rows,
# else 5): (mean over splits, split-to-split sd). The MLE MDN is the stronger of the two
# dependency-free peers (lower mean NLL than the Gaussian linear model on 5 of the 6 sets).
# To recompute after a deliberate change of defaults and a full run:
#     results = run_suite(make_models(["bayes_mdn", "mle_mdn"]),
#                         cache="benchmarks/real_data_cache.json")
#     paired_differences(results, "bayes_mdn", "mle_mdn")
REFERENCE_GAP: dict[str, tuple[float, float]] = {
    "airquality": (0.980, 0.345),
    "mcycle": (0.660, 0.495),
    "faithful": (0.065, 0.143),
    "caschool": (0.528, 0.128),
    "wages1": (0.015, 0.021),
    "computers": (-0.033, 0.027),
}
# CI runs split 0 only, where the reference run measured gaps within 1.2 sd of each mean
# (+0.956, +0.882, +0.193, +0.558, +0.022, -0.063). Another CPU or library build moves split
# 0's gap by about what a new seed does. Measured on split 0 with model seeds 1-4, that
# seed-to-seed sd is 0.017 nats on wages1 and 0.031 on computers: as large as the
# split-to-split sd there, not smaller. So the bar is mean + 4 sd: 3.5 seed sds above split
# 0's mean gap over seeds 0-4 on computers, 5 on wages1 (seed noise on the small sets was not
# measured; their split sd is 0.13-0.50 nats). It still flags a default far worse than
# today's: a diverged or collapsed fit, or lost units (a wrong log-Jacobian moves the NLL by
# log sd(y): 3.5 nats on airquality, 6.4 on computers). A floor against breakage, not a
# quality target: today's defaults already lose to the MLE MDN by 0.5-1 nats on airquality,
# mcycle and caschool.
K_SD = 4.0


@pytest.mark.slow
def test_reduced_run_keeps_bayes_mdn_near_the_mle_mdn():
    """CI's reduced real-data run: split 0 of every data set, bayes_mdn at its defaults and
    the MLE MDN; bayes_mdn's test NLL must be finite and its gap to the MLE MDN under the
    margin above (printed per data set)."""
    results = run_suite(
        make_models(["bayes_mdn", "mle_mdn"]), DATASETS, n_splits=1, cache=None, log=print
    )
    gaps = {ds: d[0] for ds, d in paired_differences(results, "bayes_mdn", "mle_mdn").items()}
    failures = []
    for r in results:
        if r.model == "bayes_mdn" and (r.status != "ok" or not math.isfinite(r.nll)):
            failures.append(f"{r.dataset}: bayes_mdn {r.status} {r.error}")
    for ds in DATASETS:
        mean, sd = REFERENCE_GAP[ds]
        margin = mean + K_SD * sd
        gap = gaps.get(ds, math.nan)
        print(
            f"{ds:>10}: gap {gap:+.3f} nats (reference mean {mean:+.3f}, split sd {sd:.3f}; "
            f"margin mean + {K_SD:g} sd = {margin:+.3f})"
        )
        if not gap <= margin:
            failures.append(f"{ds}: gap {gap:+.3f} > margin {margin:+.3f}")
    assert not failures, failures
