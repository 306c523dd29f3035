"""The benchmarks package: benchmarks.steps at tiny sizes (every section, finite numbers,
time to target from whole library fits), and the reports of the other benchmarks."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import steps

ROOT = Path(__file__).resolve().parents[1]


def _numbers(obj):
    if isinstance(obj, dict):
        for value in obj.values():
            yield from _numbers(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _numbers(value)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


def test_quick_benchmark_writes_every_section(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.steps", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert {"meta", "step", "target", "predictive", "scaling"} <= result.keys()
    assert result["meta"]["quick"] is True and result["meta"]["settings"] == steps.QUICK
    assert len(result["step"]) == 5
    assert all(r["ms_per_step"] > 0 and r["ratio"] > 0 for r in result["step"])
    target = result["target"]
    assert target["target_nll"] == pytest.approx(target["oracle_nll"] + steps.TARGET_GAP)
    assert all(r["best_test_nll"] > 0 for r in target["rows"])
    # Every variant was either stopped at the target or trained the whole budget; each
    # library row is whole fit_svi calls, one per budget, replaying one run.
    every, budget = steps.QUICK["eval_every"], steps.QUICK["target_max_epochs"]
    plain, *library = target["rows"]
    assert plain["variant"].startswith("plain") and "fits" not in plain
    assert [r["variant"] for r in library] == [v[0] for v in steps.STEP_VARIANTS[:3]]
    for r in target["rows"]:
        assert r["epochs_trained"] == (r["epochs_to_target"] if r["reached"] else budget)
    for r in library:
        assert r["fits"] == r["epochs_trained"] // every and r["replays_one_run"] is True
    for row in result["predictive"]:
        assert row["draws_x_points_per_second"] > 0 and row["peak_rss_mb"] > 0
    scaling = result["scaling"]
    assert scaling["by_rows"] and scaling["by_components"]
    assert all(r["seconds_per_epoch"] > 0 for r in scaling["by_rows"] + scaling["by_components"])
    assert all(math.isfinite(v) for v in _numbers(result))
    assert {t["target"].split(" ")[0] for t in result["targets"]} >= {"MAP", "mean-field"}
    assert all(isinstance(t["met"], bool) for t in result["targets"])
    markdown = out.with_suffix(".md").read_text()
    assert markdown == steps.markdown(result)
    assert "`python -m benchmarks.steps --quick`" in markdown
    assert "| MAP (bayesian=last, delta) |" in markdown and "## Scaling" in markdown
    assert "replay one training run" in markdown and "## Targets of issue #7" in markdown
    assert markdown in proc.stdout  # the report is printed once, at the end
    assert proc.stdout.count("# bayes_mdn benchmarks") == 1


def test_time_to_target_stops_at_the_first_budget_reached(monkeypatch):
    """With a target every fit meets, each variant stops after its first budget: one
    fit_svi call of eval_every epochs, timed."""
    monkeypatch.setattr(steps, "TARGET_GAP", math.inf)
    settings = {**steps.QUICK, "n_train": 200, "n_test": 200, "target_max_epochs": 6}
    result = steps.bench_target(settings)
    for r in result["rows"]:
        assert r["reached"] and r["epochs_to_target"] == settings["eval_every"]
        assert r["seconds_to_target"] == r["seconds_trained"] > 0
        assert r.get("fits", 1) == 1


def test_benchmark_help_and_bad_section(capsys):
    with pytest.raises(SystemExit) as ok:
        steps.main(["--help"])
    text = capsys.readouterr().out
    assert ok.value.code == 0 and "--quick" in text and "--out" in text
    assert "python -m benchmarks.steps" in text
    with pytest.raises(SystemExit) as bad:
        steps.main(["--sections", "steps"])
    assert bad.value.code == 2 and "--sections" in capsys.readouterr().err


@pytest.mark.slow
def test_end_to_end_speed_benchmark_runs(tmp_path, monkeypatch):
    """benchmarks/speed.py times the library's own fit and the hand-written loop doing
    the same members and steps (no timing is asserted, only that both ran)."""
    from bayes_mdn import config as config_module
    from benchmarks import speed

    # A short automatic budget: the default fit, in a few seconds.
    monkeypatch.setattr(config_module, "AUTO_STEPS", 200)
    monkeypatch.setattr(config_module, "AUTO_PATIENCE_STEPS", 100)

    assert speed.main(["--rows", "300", "--repeats", "1", "--out", str(tmp_path / "s")]) == 0
    result = json.loads((tmp_path / "s.json").read_text())
    (row,) = result["rows"]
    assert row["rows"] == 300 and row["library_seconds"] > 0 and row["hand_written_seconds"] > 0
    assert len(row["member_steps"][0]) == 5 and min(row["member_steps"][0]) > 0
    assert "| 300 |" in (tmp_path / "s.md").read_text()


def test_numpyro_speed_report_and_crossover():
    """The NumPyro comparison's report, on a made-up result (NumPyro itself is an optional
    benchmark dependency): the crossover is NumPyro's fixed cost over the time it saves."""
    from benchmarks.numpyro_speed import _crossover, markdown

    lib = {"seconds": 30.0, "steps": 20_000, "ms_per_step": 1.5}
    numpyro = {
        "seconds": 35.0,
        "setup_seconds": 10.0,
        "compile_seconds": 2.0,
        "steps": 20_000,
        "ms_per_step": 1.75,
        "ms_per_step_running": 1.0,
    }
    assert "24,000 steps" in _crossover(lib, numpyro)  # 12 s / 0.5 ms
    assert "not faster" in _crossover(lib, {**numpyro, "ms_per_step_running": 2.0})
    meta = {
        "rows": 10,
        "epochs": 1,
        "machine": "m",
        "torch": "t",
        "numpyro": "n",
        "jax": "j",
        "load_at_start": 0,
        "load_at_end": 0,
    }
    text = markdown({"meta": meta, "bayes_mdn": lib, "numpyro": numpyro})
    assert "| 1.50 |" in text and "0.86" in text  # 1.5 / 1.75
    # With the compiled fit: the default's ratio is the compiled one's where "auto" compiles.
    compiled = {"seconds": 21.0, "steps": 20_000, "ms_per_step": 1.05}
    result = {"meta": meta, "bayes_mdn": lib, "numpyro": numpyro}
    result |= {"bayes_mdn_compiled": compiled, "compile_steps": 20_000}
    text = markdown(result | {"auto_compiles": True})
    assert "| 1.05 |" in text and '`compile="auto"`, compiles' in text
    assert "compile included: 0.60; compiled against NumPyro: 0.60" in text  # 1.05 / 1.75
    text = markdown(result | {"auto_compiles": False})
    assert "does not compile" in text and "compile included: 0.86; compiled" in text


@pytest.mark.slow
def test_streaming_benchmark_measures_a_parquet_fit(tmp_path):
    import pyarrow.parquet as pq

    from benchmarks import streaming

    path = tmp_path / "rows.parquet"
    streaming.write_rows(path, 2500)
    table = pq.read_table(path)
    assert table.num_rows == 2500 and table.column_names == ["x", "y"]
    entry = streaming._measure(path, {"devices": 1, "batch_size": 500, "epochs": 1})
    # 2,250 training rows after the 10% held out: 4 global batches of 500 in the epoch.
    assert entry["steps_per_member"] == 4
    assert entry["peak_mb"] >= entry["import_mb"] > 0
    assert math.isfinite(entry["test_nll"]) and entry["rows_per_second"] > 0
    result = {
        "machine": "m",
        "torch": "t",
        "load_at_start": 0.0,
        "quality": None,
        "throughput": [{"rows": 2500, "batch": 500, "devices": d, **entry} for d in (1, 2)],
    }
    text = streaming.report(result)
    assert "| 2,500 | 500 | 2 |" in text and "Largest peak" in text


def test_streaming_report_pairs_the_rounds():
    from benchmarks import streaming

    def entry(devices, r, seconds):
        return {
            "rows": 1000,
            "batch": 100,
            "devices": devices,
            "round": r,
            "seconds": seconds,
            "loop_seconds": seconds / 2,
            "steps_per_member": 9.0,
            "rows_per_second": 9000 / seconds,
            "import_mb": 400.0,
            "peak_mb": 500.0 + r,
            "worker_peak_mb": 450.0 if devices == 2 else 0.0,
            "test_nll": 1.5,
        }

    # Round 0: 2.0 against 1.0 s (ratio 2.0); round 1: 3.0 against 2.0 s (ratio 1.5).
    throughput = [entry(1, 0, 2.0), entry(2, 0, 1.0), entry(2, 1, 2.0), entry(1, 1, 3.0)]
    result = {"machine": "m", "torch": "t", "load_at_start": 0.0, "repeats": 2}
    text = streaming.report(result | {"quality": None, "throughput": throughput})
    # Mean of the paired ratios 2.0 and 1.5, standard error 0.25 (sd 0.354 / sqrt 2).
    assert "| 1.75 ± 0.25 |" in text
    assert "| 1,000 | 100 | 1 | 2.5 |" in text  # mean seconds of one process
    assert "| 501 / - |" in text  # the largest peak over the rounds
