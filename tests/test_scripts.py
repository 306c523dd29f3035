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


# -- bad input: exit 2, one line, nothing written ------------------------------------------
def _one_line_error(capsys: pytest.CaptureFixture[str], prog: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{prog}: error: ") and "\n" not in err, err
    return err


def _csv_with(tmp_path: Path, name: str, cells: dict[tuple[int, str], str]) -> Path:
    """A small x,y,note table with some cells replaced: {(row, column): text}."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 40)
    y = np.sin(3 * x) + 0.1 * rng.standard_normal(40)
    rows = [{"x": repr(float(a)), "y": repr(float(b)), "note": "n"} for a, b in zip(x, y)]
    for (row, column), text in cells.items():
        rows[row][column] = text
    path = tmp_path / name
    path.write_text("x,y,note\n" + "".join(f"{r['x']},{r['y']},{r['note']}\n" for r in rows))
    return path


@pytest.fixture
def small_model(tmp_path: Path) -> Path:
    data = _csv_with(tmp_path, "train.csv", {})
    path = tmp_path / "small.safetensors"
    assert (
        main(["fit", "--csv", str(data), "--x", "x", "--y", "y", "--model", str(path), *TINY]) == 0
    )
    return path


def _verbs(data: Path, model: Path, out: Path) -> dict[str, list[str]]:
    common = ["--csv", str(data), "--x", "x"]
    return {
        "fit": ["fit", *common, "--y", "y", "--model", str(out / "m.safetensors"), *TINY],
        "predict": ["predict", "--model", str(model), *common, "--out", str(out / "p.csv")],
        "evaluate": ["evaluate", "--model", str(model), *common, "--y", "y", "--out", str(out)],
        "diagnose": ["diagnose", "--model", str(model), *common, "--y", "y", "--out", str(out)],
    }


def test_cells_longer_than_the_csv_module_allows(
    tmp_path: Path, small_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Python's csv module stops at 131,072 characters a field; every verb once exited 1
    # with a _csv.Error traceback on such a cell, even in a column it does not use.
    long_note = _csv_with(tmp_path, "note.csv", {(3, "note"): "n" * 200_000})
    out = tmp_path / "ok"
    argv = ["predict", "--model", str(small_model), "--csv", str(long_note), "--x", "x"]
    assert main([*argv, "--out", str(out)]) == 0
    assert _read(out)[1].shape == (40, 6)

    long_x = _csv_with(tmp_path, "x.csv", {(3, "x"): "1" * 200_000})
    out = tmp_path / "never"
    for verb, argv in _verbs(long_x, small_model, out).items():
        assert main(argv) == 2, verb
        err = _one_line_error(capsys, f"bayes-mdn {verb}")
        assert "line 5, column 'x': '1111" in err and "(200,000 characters) is not a finite" in err
        assert len(err) < 300
        assert not out.exists()
    result = _script("evaluate.py", *_verbs(long_x, small_model, out)["evaluate"][1:])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "200,000 characters" in result.stderr
    assert not out.exists()


def test_values_beyond_float32_exit_2_and_write_nothing(
    tmp_path: Path, small_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # y = 1e39 is a finite float64 but infinite in a float32 model: fit and diagnose
    # exited 1 with a traceback, evaluate exited 2 only after writing its figures.
    out = tmp_path / "never"
    huge_y = _csv_with(tmp_path, "huge_y.csv", {(6, "y"): "1e39"})
    huge_x = _csv_with(tmp_path, "huge_x.csv", {(7, "x"): "-2e39"})
    for data, where in [
        (huge_y, "huge_y.csv, data row 7, column 'y' given by --y: 1e+39"),
        (huge_x, "huge_x.csv, data row 8, column 'x' given by --x: -2e+39"),
    ]:
        verbs = _verbs(data, small_model, out)
        verbs["diagnose (fit)"] = [
            "diagnose", "--csv", str(data), "--x", "x", "--y", "y", "--out", str(out),
            "--epochs", "1", "--no-progress", "--device", "cpu",
        ]  # fmt: skip
        if data is huge_y:
            del verbs["predict"]  # reads no y
        for verb, argv in verbs.items():
            assert main(argv) == 2, verb
            err = _one_line_error(capsys, f"bayes-mdn {verb.split()[0]}")
            assert f"{where} is beyond the largest float32 (3.403e+38)" in err
            assert not out.exists()
    # float64 holds them.
    model64 = tmp_path / "m64.safetensors"
    argv = ["fit", "--csv", str(huge_y), "--x", "x", "--y", "y", "--model", str(model64), *TINY]
    assert main([*argv, "--dtype", "float64"]) == 0


def test_non_finite_metrics_write_nothing(
    tmp_path: Path, small_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A target 1e20 standard deviations out: its float32 log density is -inf, which
    # metrics.json cannot hold. Nothing is written, figures included.
    far = _csv_with(tmp_path, "far.csv", {(2, "y"): "1e20"})
    out = tmp_path / "report"
    assert main(_verbs(far, small_model, out)["evaluate"]) == 2
    assert "the metrics ['nll'] are not finite (nll=inf)" in _one_line_error(
        capsys, "bayes-mdn evaluate"
    )
    assert not out.exists()


def test_outputs_never_overwrite_inputs(
    tmp_path: Path, small_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _csv_with(tmp_path, "data.csv", {})
    before = data.read_bytes(), small_model.read_bytes()
    (tmp_path / "sub").mkdir()
    alias = tmp_path / "link.csv"
    alias.symlink_to(data)
    for out, flag in [
        (data, "--csv"),
        (tmp_path / "sub" / ".." / "data.csv", "--csv"),
        (alias, "--csv"),
        (small_model, "--model"),
    ]:
        argv = ["predict", "--model", str(small_model), "--csv", str(data), "--x", "x"]
        assert main([*argv, "--out", str(out)]) == 2
        err = _one_line_error(capsys, "bayes-mdn predict")
        assert f"is the file given by {flag}: writing there would overwrite an input" in err
    argv = ["fit", "--csv", str(data), "--x", "x", "--y", "y", "--model", str(data), *TINY]
    assert main(argv) == 2
    assert "--model" in _one_line_error(capsys, "bayes-mdn fit")
    assert (data.read_bytes(), small_model.read_bytes()) == before


def test_fit_passes_the_prior_function(faithful_csv: Path, tmp_path: Path) -> None:
    from bayes_mdn import load

    argv = ["fit", "--csv", str(faithful_csv), "--x", "waiting", "--y", "eruptions"]
    for value in ("0", "0.25"):
        path = tmp_path / f"pf{value}.bmdn"
        assert main([*argv, "--model", str(path), "--prior-function", value, *TINY]) == 0
        mdn = load(path, device="cpu")
        assert mdn.prior_function == float(value)
        assert (mdn.model_.net.prior is None) == (value == "0")
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--model", str(tmp_path / "bad.bmdn"), "--prior-function", "x", *TINY])
    assert exit_info.value.code == 2


def test_fit_passes_compile(faithful_csv: Path, tmp_path: Path) -> None:
    from bayes_mdn import load

    argv = ["fit", "--csv", str(faithful_csv), "--x", "waiting", "--y", "eruptions"]
    path = tmp_path / "eager.bmdn"
    assert main([*argv, "--model", str(path), "--compile", "off", *TINY]) == 0
    assert load(path, device="cpu").compile is False
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--model", str(path), "--compile", "yes", *TINY])
    assert exit_info.value.code == 2


@pytest.fixture
def faithful_parquet(tmp_path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ds = load_dataset("faithful")
    path = tmp_path / "faithful.parquet"
    pq.write_table(pa.table({"waiting": ds.X[:, 0], "eruptions": ds.y}), path, row_group_size=50)
    return path


def test_fit_streams_a_parquet_file(faithful_parquet: Path, tmp_path: Path) -> None:
    from bayes_mdn import load

    path = tmp_path / "m.bmdn"
    argv = ["fit", "--parquet", str(faithful_parquet), "--x", "waiting", "--y", "eruptions"]
    assert main([*argv, "--model", str(path), *TINY]) == 0
    mdn = load(path, device="cpu")
    assert mdn.n_features_in_ == 1 and mdn.predict(np.array([[60.0], [85.0]])).shape == (2,)


def test_fit_refuses_bad_parquet_arguments(
    faithful_parquet: Path, faithful_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "never.bmdn"
    argv = ["fit", "--parquet", str(faithful_parquet), "--x", "wait", "--y", "eruptions"]
    assert main([*argv, "--model", str(model), *TINY]) == 2
    assert "['wait'] are not in" in _one_line_error(capsys, "bayes-mdn fit")
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--csv", str(faithful_csv), "--model", str(model), *TINY])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    argv = ["fit", "--parquet", str(faithful_parquet), "--x", "waiting", "--y", "eruptions"]
    assert main([*argv, "--model", str(faithful_parquet), *TINY]) == 2
    assert not model.exists()


@pytest.mark.slow
def test_fit_on_two_processes_from_the_command_line(
    faithful_parquet: Path, tmp_path: Path
) -> None:
    from bayes_mdn import load

    path = tmp_path / "m.bmdn"
    exe = Path(sys.executable).with_name("bayes-mdn")
    argv = ["fit", "--parquet", str(faithful_parquet), "--x", "waiting", "--y", "eruptions"]
    result = subprocess.run(
        [str(exe), *argv, "--model", str(path), "--devices", "2", *TINY],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model written to" in result.stdout
    assert load(path, device="cpu").predict(np.array([[70.0]])).shape == (1,)
