"""The tests' fixtures; the helpers they import are modules of tests/helpers/ (``from helpers.tiny import ...``).

- ``tiny_cfg(*overrides)``: the train config with the tiny settings, outputs under the test's ``tmp_path/outputs``.
- ``cohort(run_dir or cfg)``: the canonical .h5ad of the cells that run (or config) reads.
- ``shared_dirs``: the synthetic GEO files and caches every test shares (each entry keyed by its inputs).
- ``trained_runs``: two finished tiny runs in a sweep-like folder; ``new_cells``: their test donor's cells as
  another lab hands them in; ``logged_cv_run``: a one-fold CV run made by ``train.py`` with its console in a file;
  ``two_fold_cv_run``: a two-fold CV run whose folds share one set of gene dictionaries (an ensemble, or ``--fold``);
  ``programme_run``: a run that learnt the synthetic Tumor programme (slow tests only).
- ``geneformer_dicts``: the real Geneformer dictionaries, or the test is skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers.paths import GENEFORMER_DICTS, REPO_ROOT  # noqa: F401  (REPO_ROOT: test_readme.py imports it here)
from helpers.processes import run_script
from helpers.runs import JOBS, PROGRAMME_COHORT, SWEEP, canonical_h5ad
from helpers.tiny import compose_tiny, tiny_overrides

# Forced, not defaults: a shell's WANDB_MODE=online must not send the tests' runs to W&B.
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread a process: the tests' models are tiny, and two threads on two cores shared with wandb-core
# and the tests' own subprocesses spend most of their time waiting for each other (a run is 10x slower).
# Numba too: its parallel synthetic generator would set OpenMP, and so torch, back to a thread a core.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def geneformer_dicts() -> Path:
    """The folder of the real Geneformer gene dictionaries; tests using it skip where it is absent."""
    if not (GENEFORMER_DICTS / "token_dictionary_gc30M.pkl").is_file():
        pytest.skip(f"real Geneformer dictionaries not found in {GENEFORMER_DICTS}")
    return GENEFORMER_DICTS


@pytest.fixture(scope="session")
def shared_dirs(tmp_path_factory) -> dict[str, Path]:
    """Synthetic GEO files and caches shared by the tests (each is keyed by its inputs)."""
    root = tmp_path_factory.mktemp("shared")
    return {"data": root / "data", "cache": root / "cache"}


@pytest.fixture
def tiny_cfg(tmp_path, shared_dirs):
    """``tiny_cfg(*overrides, config_name="train")``: the config composed as the command line composes it, with the
    tiny settings (helpers.tiny), its runs under ``tmp_path/outputs``, data and caches in ``shared_dirs``."""

    def compose(*overrides: str, config_name: str = "train"):
        return compose_tiny(tmp_path / "outputs", shared_dirs, *overrides, config_name=config_name)

    return compose


@pytest.fixture(scope="session")
def cohort():
    """``cohort(run_dir or cfg)``: the path of the canonical .h5ad of the cohort that run read (or that config
    reads), the one file of its settings among the several cohorts a shared cache holds."""
    return canonical_h5ad


@pytest.fixture(scope="session", name="trained_runs")
def trained_runs_fixture(tmp_path_factory, shared_dirs) -> list[Path]:
    """Two finished 2-epoch tiny runs in a sweep-like folder <base>/multirun/<date>/<time>/<job>/."""
    sweep = tmp_path_factory.getbasetemp() / "trained_runs" / SWEEP
    from geneformer_colon.jobs.train import train

    runs = [sweep / job for job in JOBS]
    for run_dir, overrides in zip(runs, JOBS.values()):
        train(compose_tiny(sweep / "outputs", shared_dirs, "experiment=colon6", "logger=csv", "trainer.max_epochs=2",
                           f"paths.run_dir='{run_dir}'", *overrides))
    return runs


@pytest.fixture(scope="session")
def new_cells(trained_runs, cohort, tmp_path_factory) -> Path:
    """The held-out test donor's cells as another lab would hand them in: genes in another order, indexed by
    Ensembl id, raw counts in a layer and log-normalised values in X, no label or donor column."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    cells = ad.read_h5ad(cohort(trained_runs[0]))
    cells = cells[cells.obs["donor"] == "KUL01"].copy()
    cells = cells[:, cells.var["ensembl_id"] != ""].copy()
    cells = cells[:, cells.var_names[::-1]].copy()
    counts = sp.csr_matrix(cells.X)
    normalised = counts.multiply(1e4 / np.asarray(counts.sum(1))).tocsr().log1p().astype(np.float32)
    adata = ad.AnnData(X=normalised, layers={"counts": counts},
                       obs=pd.DataFrame({"batch": "lab2", "n_counts": cells.obs["n_counts"]}, index=cells.obs_names),
                       var=pd.DataFrame(index=cells.var["ensembl_id"].astype(str).to_numpy()))
    path = tmp_path_factory.mktemp("new") / "new_cells.h5ad"
    adata.write_h5ad(path)
    return path


# A CV run of one fold, two epochs a fold, as train.py makes it.
LOGGED_CV = ["experiment=colon6", "cv=lodo", "cv.folds=[KUL01]", "logger=csv", "trainer.limit_train_batches=4",
             "trainer.max_epochs=2"]


@pytest.fixture(scope="session")
def logged_cv_run(tmp_path_factory, shared_dirs) -> tuple[Path, str]:
    """A one-fold CV run of two epochs a fold (``LOGGED_CV``), its stdout and stderr redirected to a file, umask
    022; its progress bar configured (the default), to show that it stays out of a file. Its run directory and
    its console output."""
    out = tmp_path_factory.mktemp("user_view")
    log_file = out / "train.out"
    overrides = [o for o in tiny_overrides(out, shared_dirs) if not o.startswith("callbacks.progress_bar")]
    with log_file.open("w") as handle:
        result = run_script("train.py", *overrides, *LOGGED_CV, "run_name=cv", wait=False,
                            stdout=handle, stderr=handle, umask=0o022)
        assert result.wait(timeout=600) == 0, log_file.read_text()[-3000:]
    return out / "cv", log_file.read_text()


@pytest.fixture(scope="session")
def two_fold_cv_run(logged_cv_run, shared_dirs, tmp_path_factory) -> Path:
    """A CV run of folds KUL01 and KUL19 (two training batches, one epoch) that tokenize alike: every fold uses the
    dictionaries of ``logged_cv_run``'s fold, so the run loads as the ensemble of its folds as well as fold by fold."""
    from geneformer_colon.data.dictionaries import MEDIAN_FILE, TOKEN_FILE
    from geneformer_colon.jobs import donor_cv
    from geneformer_colon.jobs.train import train

    out = tmp_path_factory.mktemp("ensemble")
    dictionaries = logged_cv_run[0] / "folds" / "KUL01" / "dictionaries"
    donor_cv.run(train, compose_tiny(
        out, shared_dirs, "experiment=colon6", "cv=lodo", "cv.folds=[KUL01,KUL19]", "logger=csv",
        "trainer.limit_train_batches=2", f"model.tokenizer.token_dictionary={dictionaries / TOKEN_FILE}",
        f"model.tokenizer.gene_median_dictionary={dictionaries / MEDIAN_FILE}"))
    return out / "colon6"


@pytest.fixture(scope="session")
def programme_run(tmp_path_factory, shared_dirs) -> Path:
    """A tiny run that learns the Tumor programme of ``PROGRAMME_COHORT``: more cells, genes and steps than the
    shared runs (minutes: for slow tests)."""
    from geneformer_colon.jobs.train import train

    run_dir = tmp_path_factory.mktemp("programme") / "run"
    cohort_settings = [f"data.source.{key}={value}" for key, value in PROGRAMME_COHORT.items()]
    train(compose_tiny(run_dir.parent / "outputs", shared_dirs, "experiment=colon6", "logger=csv",
                       f"paths.run_dir='{run_dir}'", "trainer.max_epochs=4", "optimizer.lr=5e-3", *cohort_settings))
    return run_dir
