import json

import numpy as np
import pytest

from bayes_mdn.cli import main


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(
        [
            "demo",
            "--out",
            str(out),
            "--n-train",
            "600",
            "--n-test",
            "2000",
            "--epochs",
            "40",
            "--no-progress",
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    nll = summary["test_nll"]
    assert set(nll) == {"bayesian_mdn", "regression_net_gaussian", "oracle"}
    assert all(np.isfinite(v) for v in nll.values())
    # Even a short fit beats the unimodal regression net, and nothing beats the oracle by much.
    assert nll["bayesian_mdn"] < nll["regression_net_gaussian"]
    assert nll["bayesian_mdn"] > nll["oracle"] - 0.05
    for name in summary["figures"]:
        assert (out / name).stat().st_size > 5_000
    assert not list(out.glob(".*.tmp"))
    printed = capsys.readouterr().out
    assert "exact oracle" in printed and str(out) in printed


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--n-train", "0"])
    assert exc.value.code == 2
    assert "--n-train" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["frobnicate"])
