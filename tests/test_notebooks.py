"""Every notebook runs top to bottom in smoke mode (tiny settings), in a fresh kernel.

The kernel is started with this interpreter through a throw-away kernelspec, so the test
does not depend on which ``python3`` kernel a machine happens to have installed. The
notebook is executed in memory: the committed outputs are never overwritten.
"""

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="notebook tests need the dev extra")
nbclient = pytest.importorskip("nbclient", reason="notebook tests need the dev extra")
pytest.importorskip("ipykernel", reason="notebook tests need the dev extra")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _kernel_manager(spec_dir: Path) -> KernelManager:
    kernel = spec_dir / "bayes-mdn-test"
    kernel.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec = {"argv": argv, "display_name": "bayes-mdn test", "language": "python"}
    (kernel / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(spec_dir)])
    return KernelManager(kernel_name="bayes-mdn-test", kernel_spec_manager=specs)


def test_notebooks_are_found() -> None:
    assert [p.name for p in NOTEBOOKS] == [
        "01_inverse_sine.ipynb",
        "02_epistemic_vs_aleatoric.ipynb",
        "03_calibration_and_model_choice.ipynb",
        "04_custom_backbone.ipynb",
        "05_real_data.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_outputs(path: Path) -> None:
    # Readers see the figures without running anything: every code cell was executed.
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BAYES_MDN_SMOKE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # The kernel must import this checkout's bayes_mdn, whatever is installed.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        km=_kernel_manager(tmp_path / "kernels"),
        timeout=300,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert "smoke mode: True" in "".join(o.get("text", "") for o in outputs)
