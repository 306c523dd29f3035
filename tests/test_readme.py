"""The README's Python example runs as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_a_python_example() -> None:
    assert python_blocks()


@pytest.mark.slow
def test_readme_python_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict = {}
    exec(compile(python_blocks()[0], str(README), "exec"), namespace)
    assert namespace["draws"].shape == (100, 5)
    assert namespace["lower"].shape == namespace["upper"].shape == (5,)
    printed = capsys.readouterr().out
    nll = float(re.search(r"test NLL\s+([\d.]+)", printed).group(1))
    oracle = float(re.search(r"oracle NLL\s+([\d.]+)", printed).group(1))
    # The README's numbers (gap 0.043); the bound as in test_quality.py.
    assert oracle < nll < oracle + 0.06
    # The next block reads the fitted posterior of the first.
    exec(compile(python_blocks()[1], str(README), "exec"), namespace)
    assert namespace["mix"].batch_shape == (5,)
    assert namespace["quantiles"].shape == (5, 3, 1)
    assert (namespace["quantiles"].diff(dim=1) > 0).all()
