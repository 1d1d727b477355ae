"""What a user sees around the numbers: a log line an epoch wherever the output goes, a CV run's table at
its end, files colleagues can read."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pytest
from conftest import compose_train, run_script, tiny_overrides

from geneformer_colon.assembly.trained_classifier import FoldEnsemble, TrainedClassifier
from geneformer_colon.common.cpus import THREADS_ENV, chosen_threads
from geneformer_colon.common.errors import InputError
from geneformer_colon.common.names import EVAL_SPLITS as SPLITS
from geneformer_colon.data.dictionaries import MEDIAN_FILE, TOKEN_FILE, GeneDictionaries
from geneformer_colon.jobs import donor_cv
from geneformer_colon.jobs.export import export_run
from geneformer_colon.jobs.predict import GeneIds, predict_h5ad
from geneformer_colon.jobs.train import train
from geneformer_colon.model.callbacks import EpochProgressBar
from geneformer_colon.runs.layout import RunLayout
from geneformer_colon.runs.record import train_losses

CV = ["experiment=colon6", "cv=lodo", "cv.folds=[KUL01]", "logger=csv", "trainer.limit_train_batches=4",
      "trainer.max_epochs=2"]
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+): train loss [\d.]+, val acc ([\d.]+), val macro F1 ([\d.]+), "
                        r"val ROC AUC [\d.]+, val loss [\d.]+, recall Normal [\d.]+ Border [\d.]+ Tumor [\d.]+; "
                        r"\d+:\d\d:\d\d elapsed, ~\d+:\d\d:\d\d left")


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory, shared_dirs) -> tuple[Path, str]:
    """A one-fold CV run of two epochs a fold, its stdout and stderr redirected to a file, umask 022; its
    progress bar configured (the default), to show that it stays out of a file."""
    out = tmp_path_factory.mktemp("user_view")
    log_file = out / "train.out"
    overrides = [o for o in tiny_overrides(out, shared_dirs) if not o.startswith("callbacks.progress_bar")]
    with log_file.open("w") as handle:
        result = run_script("train.py", *overrides, *CV, "run_name=cv", wait=False,
                            stdout=handle, stderr=handle, umask=0o022)
        assert result.wait(timeout=600) == 0, log_file.read_text()[-3000:]
    return out / "cv", log_file.read_text()


def test_a_redirected_run_logs_a_line_an_epoch_equal_to_metrics_json(cv_run):
    run_dir, output = cv_run
    lines = [match.groups() for match in EPOCH_LINE.finditer(output)]
    expected = []
    for fold in ("KUL01",):
        epochs = json.loads((run_dir / "folds" / fold / "metrics.json").read_text())["epochs"]
        expected += [(str(epoch["epoch"] + 1), "2", f"{epoch['val/accuracy']:.4f}", f"{epoch['val/macro_f1']:.4f}")
                     for epoch in epochs]
    assert len(expected) == 2 and lines == expected
    assert "Epoch " not in output  # no progress bar in a file


def test_a_cv_run_ends_with_its_table_across_folds(cv_run):
    run_dir, output = cv_run
    tail = output.rstrip().splitlines()[-16:]
    assert any("across folds" in line for line in tail)
    table = [line for line in tail if line.startswith("| ")]
    assert table[0].startswith("| figure | folds | mean | sd")
    cv = json.loads((run_dir / "cv.json").read_text())
    row = next(line for line in table if line.startswith("| test macro F1 |"))
    assert f"| {cv['aggregate']['test']['macro_f1']['mean']:.3f} |" in row
    assert output.rstrip().endswith(table[-1])


def _unreadable_by_others(root: Path) -> list[str]:
    return [str(path) for path in root.rglob("*") if path.is_file() and not path.stat().st_mode & stat.S_IROTH]


def test_files_of_a_run_and_an_export_are_readable_by_group_and_others(cv_run, tmp_path):
    run_dir, _ = cv_run
    assert not _unreadable_by_others(run_dir)
    mask = os.umask(0o022)
    try:
        export = export_run(run_dir / "folds" / "KUL01", tmp_path / "export")
    finally:
        os.umask(mask)
    assert (export / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert not _unreadable_by_others(export)


def test_loading_an_export_is_quiet(cv_run, tmp_path, capfd):
    export = export_run(cv_run[0] / "folds" / "KUL01", tmp_path / "export")
    capfd.readouterr()
    TrainedClassifier.load(export)
    assert "not sharded" not in capfd.readouterr().err  # transformers' tensor-parallel line, once 900 characters


def test_the_progress_bar_counts_epochs_from_one():
    bar = EpochProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=4)
    assert bar._get_train_description(0).strip() == "Epoch 1/4" and bar._get_train_description(3).strip() == "Epoch 4/4"


def test_a_run_draws_its_loss_and_per_class_roc_and_pr_curves(cv_run):
    fold = RunLayout(cv_run[0] / "folds" / "KUL01")
    assert sorted(train_losses(fold)) == [0, 1]
    for plot in (fold.loss_plot, *(fold.curve_plot(curve, split) for curve in ("roc", "pr") for split in SPLITS)):
        assert plot.stat().st_size > 1000, plot


def test_the_model_card_and_history_name_the_data_source(cv_run, tmp_path):
    fold = cv_run[0] / "folds" / "KUL01"
    data = json.loads((fold / "metrics.json").read_text())["data"]
    assert data["source"] == "synthetic" and data["n_cells"] == 480 and data["generator_version"]
    card = (export_run(fold, tmp_path / "export") / "README.md").read_text()
    for text in (card, (fold / "history.md").read_text(), (cv_run[0] / "history.md").read_text()):
        assert "**Data:** the embedded synthetic KUL3 look-alike, not real cells" in text
        assert "480 cells x 300 genes, seed 0" in text


@pytest.fixture(scope="module")
def shared_dictionary_cv(cv_run, shared_dirs, tmp_path_factory) -> Path:
    """A two-fold CV run whose folds tokenize alike: every fold uses the dictionaries of ``cv_run``'s fold."""
    out = tmp_path_factory.mktemp("ensemble")
    dictionaries = cv_run[0] / "folds" / "KUL01" / "dictionaries"
    donor_cv.run(train, compose_train(tiny_overrides(out, shared_dirs) + [
        "experiment=colon6", "cv=lodo", "cv.folds=[KUL01,KUL19]", "logger=csv", "trainer.limit_train_batches=2",
        f"model.tokenizer.token_dictionary={dictionaries / TOKEN_FILE}",
        f"model.tokenizer.gene_median_dictionary={dictionaries / MEDIAN_FILE}"]))
    return out / "colon6"


def test_a_cv_run_predicts_exports_and_embeds_as_the_ensemble_of_its_folds(shared_dictionary_cv, shared_dirs,
                                                                             tmp_path):
    cells = next((shared_dirs["cache"] / "ingest").glob("*.h5ad"))
    genes = GeneIds("ensembl_id")

    def predicted(model: TrainedClassifier, name: str) -> ad.AnnData:
        predict_h5ad(model, cells, tmp_path / f"{name}.h5ad", genes=genes)
        return ad.read_h5ad(tmp_path / f"{name}.h5ad")

    ensemble = TrainedClassifier.load(shared_dictionary_cv)
    assert isinstance(ensemble, FoldEnsemble) and ensemble.origin["folds"] == ["KUL01", "KUL19"]
    both = predicted(ensemble, "ensemble")
    folds = [predicted(TrainedClassifier.load(shared_dictionary_cv, fold), fold) for fold in ("KUL01", "KUL19")]
    probabilities = "gfc_probabilities"
    np.testing.assert_allclose(both.obsm[probabilities], np.mean([fold.obsm[probabilities] for fold in folds], axis=0),
                               atol=1e-6)
    np.testing.assert_allclose(both.obsm["X_gfc"], np.hstack([fold.obsm["X_gfc"] for fold in folds]), atol=1e-5)

    export = export_run(shared_dictionary_cv, tmp_path / "export")
    card = (export / "README.md").read_text()
    assert "an ensemble of 2" in card and "| KUL01 |" in card and "| KUL19 |" in card
    from_export = predicted(TrainedClassifier.load(export), "from_export")
    np.testing.assert_allclose(from_export.obsm[probabilities], both.obsm[probabilities], atol=1e-5)
    with pytest.raises(InputError, match="no fold 'KUL77'; choose one of KUL01, KUL19"):
        TrainedClassifier.load(shared_dictionary_cv, "KUL77")


def test_folds_with_their_own_dictionaries_are_not_averaged_but_one_can_be_chosen(shared_dictionary_cv, tmp_path):
    """As when each fold derives its dictionaries from its own training cells (the embedded default)."""
    mixed = tmp_path / "mixed"
    shutil.copytree(shared_dictionary_cv / "folds", mixed / "folds")
    own = RunLayout(mixed / "folds" / "KUL19").dictionaries
    dictionaries = GeneDictionaries.load_directory(own)
    gene = next(iter(dictionaries.median))
    dictionaries.median[gene] *= 2
    dictionaries.save(own)
    with pytest.raises(InputError, match=r"different gene dictionaries .* use one fold with --fold \(one of KUL01, "):
        TrainedClassifier.load(mixed)
    assert TrainedClassifier.load(mixed, "KUL19").origin["trained_on"]


def test_threads_fit_the_cpus_the_process_may_use(monkeypatch):
    for name in (THREADS_ENV, "OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(name, raising=False)
    assert chosen_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert chosen_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv(THREADS_ENV, "5")
    assert chosen_threads() == 5 and chosen_threads(2) == 2
    monkeypatch.setenv(THREADS_ENV, "many")
    with pytest.raises(InputError, match=r"\$GENEFORMER_COLON_THREADS is 'many'"):
        chosen_threads()
    with pytest.raises(InputError, match="threads: 0"):
        chosen_threads(0)
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # set as the package is imported (the tests do not set it)
