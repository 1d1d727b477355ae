"""notebooks/compare_runs.ipynb runs top to bottom on runs the tests made (nbclient, a real kernel)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from helpers.paths import REPO_ROOT
from ipykernel.kernelspec import install
from nbclient import NotebookClient

from geneformer_colon.assembly.trained_classifier import TrainedClassifier
from geneformer_colon.jobs.perturb import perturb
from geneformer_colon.jobs.predict import GeneIds, predict_h5ad
from geneformer_colon.report.compare import TABLE_FILE

NOTEBOOK = REPO_ROOT / "notebooks" / "compare_runs.ipynb"
KERNEL = "geneformer-colon-tests"


@pytest.mark.slow  # processes (or every command in turn): make test-slow, in CI
def test_notebook_executes_on_two_runs_and_a_predicted_file(trained_runs, cohort, tmp_path, monkeypatch):
    canonical = cohort(trained_runs[0])
    predicted = tmp_path / "predicted.h5ad"
    predict_h5ad(TrainedClassifier.load(trained_runs[0]), canonical, predicted, genes=GeneIds("ensembl_id"))
    monkeypatch.setenv("GENEFORMER_COLON_PREDICTED", str(predicted))
    perturbed = perturb(trained_runs[0], "Normal", where=["label=Tumor"], min_cells=5, out_dir=tmp_path / "perturbed",
                        progress=False)
    monkeypatch.setenv("GENEFORMER_COLON_PERTURBED", str(perturbed))
    # a kernelspec running this very interpreter (ipykernel writes sys.executable), found via JUPYTER_PATH
    install(kernel_name=KERNEL, prefix=str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter" / "share" / "jupyter"))
    monkeypatch.setenv("GENEFORMER_COLON_RUNS", os.pathsep.join(map(str, trained_runs)))
    monkeypatch.setenv("GENEFORMER_COLON_COMPARE_OUT", str(tmp_path / "comparison"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, kernel_name=KERNEL, timeout=120,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    text = "\n".join(str(output.get("data", {}).get("text/plain", "")) + str(output.get("text", ""))
                     for output in outputs)
    for run_dir in trained_runs:
        assert run_dir.name in text  # in the comparison table and the confusion-matrix headings
    assert "loss.focal_gamma" in text and "val/macro_f1" in text
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) == 3 + 2 * len(trained_runs)  # epochs, recall, val and test confusion per run, the UMAP
    assert "gfc_label" in text
    assert "mean_delta_Normal" in text and "donor_KUL01" in text  # genes.csv's top genes, by donor
    assert (tmp_path / "comparison" / TABLE_FILE).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("where", [".", "notebooks"])
def test_the_notebook_runs_with_the_documented_command_from_the_root_and_from_notebooks(trained_runs, tmp_path, where):
    """`make notebook`'s command (nbconvert), run from the repository root or from notebooks/, with run paths
    relative to the root (as a user writes them): every cell runs, and no cell prints a warning."""
    relative = [os.path.relpath(run, REPO_ROOT) for run in trained_runs]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GENEFORMER_COLON_RUNS": os.pathsep.join(relative), "GENEFORMER_COLON_COMPARE_OUT": str(tmp_path / "cmp")}
    env.pop("GENEFORMER_COLON_PREDICTED", None)
    notebook = os.path.relpath(NOTEBOOK, REPO_ROOT / where)
    result = subprocess.run([str(Path(sys.executable).parent / "jupyter"), "nbconvert", "--to", "notebook",
                             "--execute", notebook, "--output-dir", str(tmp_path),
                             "--output", "ran", "--ExecutePreprocessor.startup_timeout=600"],  # a busy machine
                            cwd=REPO_ROOT / where, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    ran = nbformat.read(tmp_path / "ran.ipynb", as_version=4)
    outputs = [output for cell in ran.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    printed = "\n".join(str(output.get("text", "")) for output in outputs if output.get("name") == "stderr")
    assert "Warning" not in printed and "Warning" not in result.stderr, printed + result.stderr
    text = "\n".join(str(output.get("data", {}).get("text/plain", "")) for output in outputs)
    assert all(run.name in text for run in trained_runs)
