"""The CSV front end: bayes_mdn.tabular, the CLI verbs fit/predict/evaluate, scripts/."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bayes_mdn.cli import main
from bayes_mdn.datasets import load_dataset
from bayes_mdn.tabular import read_columns

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--components", "2", "--hidden", "8", "--epochs", "3", "--no-progress", "--device", "cpu"]


@pytest.fixture
def faithful_csv(tmp_path: Path) -> Path:
    ds = load_dataset("faithful")
    path = tmp_path / "faithful.csv"
    rows = np.column_stack([ds.X[:, 0], ds.y])
    path.write_text("waiting,eruptions\n" + "\n".join(f"{a},{b}" for a, b in rows) + "\n")
    return path


@pytest.fixture
def model_file(faithful_csv: Path, tmp_path: Path) -> Path:
    path = tmp_path / "mdn.safetensors"
    argv = ["fit", "--csv", str(faithful_csv), "--x", "waiting", "--y", "eruptions"]
    assert main([*argv, "--model", str(path), *TINY]) == 0
    return path


def _read(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], np.asarray(rows[1:], dtype=float)


def test_read_columns_in_requested_order(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a, b ,c\n1,2,3\n\n4,5,6\n")
    assert read_columns(path, ["c", "a"]).tolist() == [[3.0, 1.0], [6.0, 4.0]]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            "a,b\n1,2\n",
            r"column\(s\) \['x'\] given by --x not found; the columns are \['a', 'b'\]",
        ),
        ("x,b\n1,2\nfoo,3\n", r"line 3, column 'x': 'foo' is not a finite number"),
        ("x,b\n1,2\n,3\n", r"line 3, column 'x': an empty cell is not a finite number"),
        ("x,b\nnan,2\n", r"line 2, column 'x': 'nan' is not a finite number"),
        ("x,b\n1,2\n3\n", r"line 3: 1 fields, but the header has 2"),
        ("x,b\n", r"no data rows"),
        ("", r"empty file"),
    ],
)
def test_read_columns_rejects_bad_files(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_columns(path, ["x"], "--x")


def test_fit_predict_evaluate_verbs(faithful_csv: Path, model_file: Path, tmp_path: Path) -> None:
    pred = tmp_path / "pred.csv"
    argv = ["predict", "--model", str(model_file), "--csv", str(faithful_csv), "--x", "waiting"]
    assert main([*argv, "--out", str(pred)]) == 0
    header, values = _read(pred)
    assert header == ["mean", "std", "lower_0.5", "upper_0.5", "lower_0.9", "upper_0.9"]
    assert values.shape == (272, 6) and np.isfinite(values).all()
    assert (values[:, 1] > 0).all()
    # Nested central intervals: the 90 % one contains the 50 % one.
    assert (values[:, 4] <= values[:, 2]).all() and (values[:, 3] <= values[:, 5]).all()

    samples = tmp_path / "samples.csv"
    assert main([*argv, "--out", str(samples), "--samples", "7"]) == 0
    header, values = _read(samples)
    assert header == [f"sample_{s}" for s in range(7)] and values.shape == (272, 7)
    assert np.isfinite(values).all() and values.std(1).mean() > 0

    out = tmp_path / "report"
    argv = ["evaluate", "--model", str(model_file), "--csv", str(faithful_csv)]
    assert main([*argv, "--x", "waiting", "--y", "eruptions", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 272 and math.isfinite(metrics["nll"])
    assert set(metrics["coverage"]) == {"0.5", "0.9"}
    assert 0 <= metrics["coverage"]["0.5"][0] <= metrics["coverage"]["0.9"][0] <= 1
    assert 0 < metrics["pit_mean"][0] < 1
    for name in ("pit_histogram.png", "predictive_samples.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_two_targets_get_suffixed_columns(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 80)
    rows = np.column_stack([x, x + 0.1 * rng.standard_normal(80), -x + rng.standard_normal(80)])
    data = tmp_path / "two.csv"
    data.write_text("x,u,v\n" + "\n".join(",".join(map(str, r)) for r in rows))
    model = tmp_path / "m.safetensors"
    assert (
        main(["fit", "--csv", str(data), "--x", "x", "--y", "u,v", "--model", str(model), *TINY])
        == 0
    )
    pred = tmp_path / "p.csv"
    argv = ["predict", "--model", str(model), "--csv", str(data), "--x", "x", "--out", str(pred)]
    assert main([*argv, "--levels", "0.8"]) == 0
    header, values = _read(pred)
    assert header == [
        "mean_0",
        "mean_1",
        "std_0",
        "std_1",
        "lower_0.8_0",
        "lower_0.8_1",
        "upper_0.8_0",
        "upper_0.8_1",
    ]
    assert np.isfinite(values).all()


def test_bad_csv_exits_2_before_fitting(
    faithful_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "never.safetensors"
    argv = ["fit", "--csv", str(faithful_csv), "--x", "wait", "--y", "eruptions"]
    assert main([*argv, "--model", str(model), *TINY]) == 2
    err = capsys.readouterr().err
    assert "bayes-mdn fit: error:" in err and "['wait'] given by --x not found" in err
    assert not model.exists()

    bad = tmp_path / "bad.csv"
    bad.write_text("waiting,eruptions\n79,3.6\n54,short\n")
    argv = ["fit", "--csv", str(bad), "--x", "waiting", "--y", "eruptions"]
    assert main([*argv, "--model", str(model), *TINY]) == 2
    assert "line 3, column 'eruptions': 'short' is not a finite number" in capsys.readouterr().err

    argv = ["predict", "--model", str(tmp_path / "missing.safetensors"), "--csv", str(bad)]
    assert main([*argv, "--x", "waiting", "--out", str(tmp_path / "p.csv")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err


def _script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize("name", ["train.py", "evaluate.py"])
def test_script_help(name: str) -> None:
    result = _script(name, "--help")
    assert result.returncode == 0 and f"usage: {name}" in result.stdout


def test_scripts_train_then_evaluate(faithful_csv: Path, tmp_path: Path) -> None:
    model = tmp_path / "mdn.safetensors"
    common = ["--csv", str(faithful_csv), "--x", "waiting", "--y", "eruptions"]
    result = _script("train.py", *common, "--model", str(model), *TINY)
    assert result.returncode == 0, result.stderr
    assert model.exists()
    out = tmp_path / "eval"
    result = _script("evaluate.py", "--model", str(model), *common, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert math.isfinite(json.loads((out / "metrics.json").read_text())["nll"])

    result = _script(
        "evaluate.py",
        "--model",
        str(model),
        *common[:2],
        "--x",
        "waiting",
        "--y",
        "duration",
        "--out",
        str(out),
    )
    assert result.returncode == 2
    assert "evaluate.py: error:" in result.stderr and "['duration'] given by --y" in result.stderr
