"""examples/quickstart.ipynb runs top to bottom (on a small subset), so it cannot rot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"
KERNEL = "hf_udkd_test"

SMALL = """MAX_TRAIN_SAMPLES = 256
MAX_EVAL_SAMPLES = 128
TEACHER_EPOCHS = 1
STUDENT_EPOCHS = 1
OUTPUT_DIR = "quickstart-output"
SEMI_SUPERVISED_STEPS = 4
"""


def test_notebook_is_stored_with_the_outputs_of_one_full_run():
    # Readers see the results without running it; counts 1..n mean one top-to-bottom run, nothing stale.
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    assert all(cell.outputs for cell in code if "parameters" not in cell.metadata.get("tags", []))
    assert not any(output.get("output_type") == "error" for cell in code for output in cell.outputs)


@pytest.mark.slow
def test_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    # A kernel spec of our own, pointing at this interpreter (the test's virtual environment).
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "hf_udkd test",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    parameters = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(parameters) == 1
    parameters[0].source = SMALL

    work = tmp_path / "work"
    work.mkdir()
    NotebookClient(
        notebook, kernel_name=KERNEL, timeout=600, resources={"metadata": {"path": str(work)}}
    ).execute()

    text = "\n".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.get("output_type") == "stream"
    )
    assert "the student is" in text and "x smaller" in text
    assert "true label:" in text
    assert "unlabelled (label -100) training images" in text and "UniKD (+ unlabelled)" in text
    out = work / "quickstart-output"
    for name in ["config.json", "model.safetensors", "preprocessor_config.json", "README.md"]:
        assert (out / name).is_file(), name
