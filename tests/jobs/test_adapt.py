"""Adapting to the test donor's unlabelled cells (adapt.py): every method trains a tiny fold under cv=lodo into complete
run directories and never reads a target label (the target donor's labels permuted: the same model); tent of zero
steps and an adversary of weight zero are the unadapted run exactly; a dann run paused by SIGTERM resumes to the
run left alone; self-training and tent adapt again from the kept fitted model, or from a resumed run's newer best
epoch; mlm's pretraining is shared by a fold's seeds, reads no test donor but its targets, and a model of another
vocabulary is refused with one line; self-training's predictions keep data.max_tokens; a target donor without cells
is refused; overwrite=true removes adaptation.json."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from helpers.processes import one_error_line, pause_at, run_script, signal_at_pause
from helpers.runs import canonical_h5ad, fingerprints, metrics_of
from helpers.tiny import CLASSES, compose_tiny, compose_train, datamodule_of, tiny_overrides
from omegaconf import OmegaConf
from test_reliability import refused

from geneformer_colon.assembly.builders import build_module, classifier_from_checkpoint, read_checkpoint
from geneformer_colon.cli import train as train_entry
from geneformer_colon.common.errors import InputError
from geneformer_colon.data.token_rows import padded_length
from geneformer_colon.jobs import donor_cv
from geneformer_colon.jobs.adapt import (
    keep_fitted,
    pretraining_config,
    probabilities,
    target_cells,
    train_adapted,
)
from geneformer_colon.model.adaptation import AdaptSettings
from geneformer_colon.runs.layout import RunLayout
from geneformer_colon.runs.start import prepare_run_dir

# A short colon6 run of the split test KUL01, validation KUL19: one fold of cv=lodo, or the same split alone.
SHORT = ["experiment=colon6", "logger=csv", "trainer.limit_train_batches=3"]
FOLD = ["cv=lodo", "cv.folds=[KUL01]"]
METHODS = {
    "mlm": ["adapt=mlm", "adapt.epochs=1"],
    "self_training": ["adapt=self_training", "adapt.rounds=2", "adapt.threshold=0.34"],
    "dann": ["adapt=dann", "adapt.weight=0.5"],
    "tent": ["adapt=tent", "adapt.steps=3", "adapt.lr=0.05"],
}


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory, shared_dirs) -> dict[str, str]:
    """The tiny cohort as an .h5ad twice: as it is, and with the test donor KUL01's labels permuted."""
    folder = tmp_path_factory.mktemp("cohorts")
    cfg = compose_tiny(folder, shared_dirs)
    datamodule_of(cfg).prepare_data()
    cells = ad.read_h5ad(canonical_h5ad(cfg))
    target = np.flatnonzero(cells.obs["donor"].to_numpy() == "KUL01")
    labels = cells.obs["label"].astype(str).to_numpy()
    permuted = labels.copy()
    permuted[target] = labels[target][np.random.default_rng(0).permutation(len(target))]
    assert (permuted[target] != labels[target]).mean() > 0.3
    paths = {}
    for name, column in (("as_is", labels), ("permuted", permuted)):
        cells.obs["label"] = pd.Categorical(column)
        paths[name] = str(folder / f"{name}.h5ad")
        cells.write_h5ad(paths[name])
    return paths


def fold_run(tmp_path, shared_dirs, run_name: str, *overrides: str, cells: str | None = None, lodo: bool = True):
    """The ``SHORT`` run of one fold of ``FOLD`` (``lodo``, else of the same split alone) trained with ``overrides``,
    of the tiny synthetic cohort or of the .h5ad ``cells``; its run directory."""
    tiny = tiny_overrides(tmp_path / "outputs", shared_dirs)
    if cells is not None:
        tiny = [o for o in tiny if not o.startswith("data.source.")] + [
            "data=h5ad", f"data.source.path={cells}", "data.source.sample_key=sample"]
    donor_cv.run(train_adapted, compose_train([*tiny, *SHORT, *(FOLD if lodo else []), f"run_name={run_name}",
                                               *overrides]))
    return tmp_path / "outputs" / run_name / ("folds/KUL01" if lodo else "")


def predicted(run_dir, split: str = "test") -> pd.DataFrame:
    table = pd.read_csv(run_dir / "predictions" / f"{split}.csv").set_index("cell_id").sort_index()
    return table[[column for column in table.columns if column.startswith("prob")]]


def assert_same_weights(first, second, skip: str = "^$") -> None:
    import re

    states = [read_checkpoint(path)["state_dict"] for path in (first, second)]
    names = [name for name in states[0] if not re.match(skip, name)]
    assert names and all(torch.equal(states[0][name], states[1][name]) for name in names)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_each_method_writes_complete_fold_runs_and_reads_no_target_label(method, cohorts, tmp_path, shared_dirs):
    runs = {name: fold_run(tmp_path, shared_dirs, name, *METHODS[method], cells=path) for name, path in cohorts.items()}
    for run in runs.values():
        record = metrics_of(run)
        assert record["status"] == "finished" and record["donors"]["test"] == ["KUL01"]
        for path in ("config.yaml", "history.md", "checkpoints/best.ckpt",
                     "predictions/val.csv", "predictions/test.csv", "plots/confusion_test.png", "dictionaries"):
            assert (run / path).exists(), path
        assert (run.parent.parent / "cv.json").is_file()
    # the target's labels permuted: the same model, the same probabilities, other true labels in its predictions
    assert_same_weights(runs["as_is"] / "checkpoints/best.ckpt", runs["permuted"] / "checkpoints/best.ckpt")
    pd.testing.assert_frame_equal(predicted(runs["as_is"]), predicted(runs["permuted"]))
    truths = [pd.read_csv(run / "predictions/test.csv").set_index("cell_id").sort_index()["true"] for run in
              runs.values()]
    assert (truths[0] != truths[1]).any()

    run = runs["as_is"]
    best = read_checkpoint(run / "checkpoints/best.ckpt")
    classifier_from_checkpoint(run)  # what eval.py, predict and export load: rebuilt from the checkpoint alone
    if method == "dann":  # the donor head over the four training donors and the target, in the checkpoints
        assert best["hyper_parameters"]["robust"]["target_donors"] == ["KUL01"]
        assert best["state_dict"]["robust.adversary.donor_head.2.bias"].shape == (5,)
        log = pd.concat(pd.read_csv(path) for path in (run / "csv").glob("*/metrics.csv"))
        assert log["adapt/donor_accuracy"].notna().any()
    if method == "self_training":
        adaptation = json.loads((run / "adaptation.json").read_text())
        assert [entry["round"] for entry in adaptation["rounds"]] == [1, 2]
        assert all(set(entry["counts"]) == set(CLASSES) for entry in adaptation["rounds"])
        assert best["adaptation"] == adaptation and (run / "checkpoints/fitted.ckpt").is_file()
    if method == "tent":  # only LayerNorm affine parameters moved from the fitted model
        fitted = read_checkpoint(run / "checkpoints/fitted.ckpt")["state_dict"]
        changed = {name for name, tensor in best["state_dict"].items() if not torch.equal(tensor, fitted[name])}
        assert changed and all(".LayerNorm." in name for name in changed), changed
    if method == "mlm":  # fine-tuned from the fold's pretraining, cached apart from the run
        encoder = OmegaConf.load(run / "config.yaml").model.encoder
        assert encoder._target_.endswith("pretrained_bert") and "adapt-mlm" in encoder.pretrained
        assert (Path(encoder.pretrained) / "config.json").is_file()


@pytest.mark.slow
def test_tent_of_zero_steps_and_an_adversary_of_weight_zero_are_the_unadapted_run_exactly(tmp_path, shared_dirs):
    plain = fold_run(tmp_path, shared_dirs, "plain")
    tent = fold_run(tmp_path, shared_dirs, "tent", "adapt=tent", "adapt.steps=0")
    dann = fold_run(tmp_path, shared_dirs, "dann", "adapt=dann", "adapt.weight=0")
    for run in (tent, dann):
        pd.testing.assert_frame_equal(predicted(run), predicted(plain))
        assert metrics_of(run)["epochs"] == metrics_of(plain)["epochs"]
    assert_same_weights(plain / "checkpoints/best.ckpt", tent / "checkpoints/best.ckpt")
    assert_same_weights(plain / "checkpoints/best.ckpt", dann / "checkpoints/best.ckpt")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["self_training", "tent"])
def test_an_adaptation_interrupted_after_fitting_adapts_again_from_the_kept_fitted_model(method, tmp_path,
                                                                                          shared_dirs):
    run = fold_run(tmp_path, shared_dirs, method, *METHODS[method], lodo=False)
    fitted = fingerprints(run / "checkpoints")["fitted.ckpt"]
    shutil.copy(run / "checkpoints/best.ckpt", tmp_path / "adapted.ckpt")
    # as if stopped after adapting, the run not finished: best.ckpt adapted (here an adapted-looking other model)
    torch.save({**read_checkpoint(run / "checkpoints/last.ckpt"), "adaptation": {"method": method}},
               run / "checkpoints/best.ckpt")
    record = metrics_of(run)
    (run / "metrics.json").write_text(json.dumps({**record, "status": "running"}))
    fold_run(tmp_path, shared_dirs, method, *METHODS[method], "resume=true", lodo=False)
    assert_same_weights(tmp_path / "adapted.ckpt", run / "checkpoints/best.ckpt")
    assert fingerprints(run / "checkpoints")["fitted.ckpt"] == fitted
    assert metrics_of(run)["test"] == record["test"]
    assert read_checkpoint(run / "checkpoints/best.ckpt")["adaptation"]["method"] == method


def test_the_model_to_adapt_is_a_fresh_best_epoch_or_the_one_an_adapted_best_came_from(tmp_path):
    best, fitted = tmp_path / "best.ckpt", tmp_path / "fitted.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, fitted)  # the first run's best epoch
    torch.save({"state_dict": {"w": torch.ones(1)}, "adaptation": {"method": "tent"}}, best)  # adapted from it
    keep_fitted(best, fitted)  # a run interrupted after adapting: adapts again from the same model
    assert torch.equal(read_checkpoint(fitted)["state_dict"]["w"], torch.zeros(1))
    torch.save({"state_dict": {"w": torch.full((1,), 2.0)}}, best)  # resumed with more epochs: a newer best epoch
    keep_fitted(best, fitted)
    assert torch.equal(read_checkpoint(fitted)["state_dict"]["w"], torch.full((1,), 2.0))
    torch.save({"state_dict": {}, "adaptation": {}}, best)
    fitted.unlink()
    with pytest.raises(InputError, match="fitted.ckpt, the model it was adapted from, is missing"):
        keep_fitted(best, fitted)


def test_overwrite_removes_the_adaptation_record(tmp_path):
    layout = RunLayout(tmp_path / "run")
    layout.checkpoints.mkdir(parents=True)
    layout.checkpoint().write_bytes(b"")
    layout.adaptation.write_text("{}")
    prepare_run_dir(layout, overwrite=True)
    assert not layout.adaptation.exists() and not layout.checkpoints.exists()


def test_mlm_pretrains_on_no_test_donor_but_its_targets(tmp_path, shared_dirs):
    cfg = compose_tiny(tmp_path, shared_dirs, "data.test_donors=[KUL01,KUL21]", "adapt=mlm", "adapt.targets=[KUL01]")
    pre = pretraining_config(cfg, AdaptSettings.of(cfg.adapt), ["KUL01"])
    assert pre.data.test_donors == ["KUL21"] and pre.data.val_donors == ["KUL19"] and pre.data.train_donors is None


def test_self_trainings_predictions_keep_the_token_budget_and_a_target_without_cells_is_refused(tmp_path,
                                                                                                shared_dirs):
    cfg = compose_tiny(tmp_path, shared_dirs, "data.max_tokens=512")
    datamodule = datamodule_of(cfg)
    datamodule.prepare_data()
    datamodule.setup()
    module = build_module(cfg, datamodule)
    cells = target_cells(datamodule, ["KUL01"])
    shapes = []
    infer = module.infer
    module.infer = lambda ids, mask: shapes.append(ids.shape) or infer(ids, mask)
    budgeted = probabilities(module, datamodule, cells)
    assert len(shapes) > 1 and all(rows * padded_length(length) <= 512 or rows == 1 for rows, length in shapes)
    datamodule.max_tokens = None
    assert np.allclose(probabilities(module, datamodule, cells), budgeted, atol=1e-5)
    with pytest.raises(InputError, match=r"target donor\(s\) \['KUL21'\] have no cell .*data.cell_types=None"):
        target_cells(datamodule, ["KUL01", "KUL21"])


@pytest.mark.slow
def test_mlm_pretrains_once_for_a_folds_seeds(tmp_path, shared_dirs):
    cache = tmp_path / "cache"
    shared = {**shared_dirs, "cache": cache}
    fold_run(tmp_path, shared, "mlm", "cv.seeds=[0,1]", *METHODS["mlm"])
    built = [path for path in (cache / "adapt-mlm").iterdir() if (path / "hf").is_dir()]
    assert len(built) == 1
    for seed in (0, 1):
        config = OmegaConf.load(tmp_path / "outputs/mlm/folds/KUL01" / f"seed{seed}" / "config.yaml")
        assert config.model.encoder.pretrained == str(built[0] / "hf")


@pytest.mark.parametrize(("arguments", "expected"), [
    (["adapt=self_training", "adapt.threshold=1.5"], "adapt.threshold is 1.5; set it to a probability strictly"),
    (["adapt=self_training", "adapt.rounds=0"], "adapt.rounds is 0; set it to a whole number of rounds >= 1"),
    ([*FOLD, "adapt=tent", "adapt.targets=[KUL01,KUL21]"], "adapt.targets names ['KUL21'], not a validation or test"),
])
def test_a_bad_adaptation_is_one_line_exit_2_and_writes_nothing(arguments, expected, tmp_path, shared_dirs, capsys):
    refused(train_entry.main, [*tiny_overrides(tmp_path / "outputs", shared_dirs), *SHORT, *arguments], capsys,
            tmp_path / "outputs", expected)
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").iterdir())


@pytest.mark.slow
def test_mlm_with_a_model_of_another_vocabulary_is_one_line_and_writes_nothing(tmp_path, shared_dirs):
    common = tiny_overrides(tmp_path / "outputs", shared_dirs)
    done = run_script("pretrain.py", *common, "logger=csv", "trainer.limit_train_batches=2", "run_name=pre",
                      "data.source.n_genes=250")  # a cohort of fewer genes: a smaller vocabulary
    assert done.returncode == 0, done.stderr[-3000:]
    hf = tmp_path / "outputs/pre/hf"
    before = fingerprints(tmp_path / "outputs")
    shape = [o for o in common if not o.startswith("model.encoder.")]  # the checkpoint has its own shape
    # the run derives its dictionaries from its own cohort's training cells
    refused = run_script("train.py", *shape, *SHORT, *FOLD, "adapt=mlm", "model=pretrained",
                         f"model.encoder.pretrained={hf}", "model.tokenizer.token_dictionary=null",
                         "model.tokenizer.gene_median_dictionary=null",
                         "model.tokenizer.input_size=128", "run_name=other")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "does not match the token dictionary" in one_error_line(refused.stderr)
    assert fingerprints(tmp_path / "outputs") == before


# a dann run whose every training step draws target cells, three epochs, paused in the second
RECIPE = ["adapt=dann", "adapt.weight=0.5", "trainer.max_epochs=3", "callbacks.early_stopping=null", "logger=csv",
          "augment.token_mask_prob=0.05", "data.balance_strategy=class_donor"]


@pytest.mark.slow
def test_a_dann_run_paused_by_sigterm_resumes_to_the_run_left_alone(tmp_path, shared_dirs):
    outputs = tmp_path / "outputs"
    common = tiny_overrides(outputs, shared_dirs) + RECIPE
    marker, log = tmp_path / "paused.marker", tmp_path / "paused.log"
    with log.open("w") as output:
        paused = run_script("train.py", *common, "run_name=paused", *pause_at(marker, batch=2), wait=False,
                            stdout=output, stderr=output)
        straight = run_script("train.py", *common, "run_name=straight")
        assert straight.returncode == 0, straight.stderr[-3000:]
        assert "resume=true" in signal_at_pause(paused, marker, signal.SIGTERM, log)
    resumed = run_script("train.py", *common, "run_name=paused", *pause_at(marker, batch=2), "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, finished = metrics_of(outputs / "straight"), metrics_of(outputs / "paused")
    assert finished["epochs"] == expected["epochs"] and finished["test"] == expected["test"]
    assert_same_weights(outputs / "straight/checkpoints/last.ckpt", outputs / "paused/checkpoints/last.ckpt")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mlm", "self_training"])
def test_a_method_that_trains_beside_the_fine_tuning_runs_under_two_process_ddp(method, tmp_path, shared_dirs):
    """mlm pretrains on one device before the fine-tuning's processes start; self-training's rounds are Trainers of
    their own in every process."""
    result = run_script("train.py", *tiny_overrides(tmp_path / "outputs", shared_dirs), *SHORT, *METHODS[method],
                        "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "data.eval_batch_size=16",
                        "run_name=ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "ddp"
    assert metrics_of(run_dir)["status"] == "finished" and (run_dir / "train_ddp_process_1.log").is_file()
    assert len(pd.read_csv(run_dir / "predictions/test.csv")) == metrics_of(run_dir)["cells"]["test"]
