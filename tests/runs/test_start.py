"""Starting and resuming a run (start.py): a finished run is never overwritten by accident, a start that failed is
cleared, a resume keeps the run's recipe unless changes are allowed, and records them."""

from __future__ import annotations

import pytest

from geneformer_colon.common.errors import InputError
from geneformer_colon.jobs import donor_cv
from geneformer_colon.jobs.train import train
from geneformer_colon.runs.layout import RunLayout
from geneformer_colon.runs.start import prepare_run_dir


def test_a_finished_run_is_not_overwritten_by_accident(tiny_cfg):
    train(tiny_cfg("run_name=once", "trainer.fast_dev_run=true"))
    with pytest.raises(InputError, match="overwrite=true"):
        train(tiny_cfg("run_name=once", "trainer.fast_dev_run=true"))
    train(tiny_cfg("run_name=once", "trainer.fast_dev_run=true", "overwrite=true"))


def test_resume_refuses_a_changed_recipe_unless_allowed_and_then_records_it(tiny_cfg, tmp_path):
    common = ["run_name=recipe", "trainer.limit_train_batches=3"]
    train(tiny_cfg(*common))
    with pytest.raises(InputError) as refused:
        train(tiny_cfg(*common, "resume=true", "optimizer.lr=1e-3", "data.batch_size=8"))
    message = str(refused.value)
    assert "optimizer.lr: 0.002 -> 0.001" in message and "data.batch_size: 32 -> 8" in message
    assert "allow_resume_changes=true" in message and "\n" not in message
    train(tiny_cfg(*common, "resume=true", "optimizer.lr=1e-3", "allow_resume_changes=true"))
    saved = (tmp_path / "outputs/recipe/config.yaml").read_text()
    assert "resume_changes:\n- optimizer.lr:\n  - '0.002'\n  - '0.001'" in saved

    # a cross-validated run: a new recipe is refused for its folds too, and a plain run is no CV run's home
    cv = common + ["cv=lodo", "cv.folds=[KUL01]", "run_name=cv", "trainer.limit_train_batches=2"]
    donor_cv.run(train, tiny_cfg(*cv))
    with pytest.raises(InputError, match=r"optimizer.lr: 0.002 -> 0.001"):
        donor_cv.run(train, tiny_cfg(*cv, "resume=true", "cv.folds=[KUL19]", "optimizer.lr=1e-3"))
    with pytest.raises(InputError, match="not cross-validated"):
        donor_cv.run(train, tiny_cfg(*common, "cv=lodo", "cv.folds=[KUL01]"))


def test_a_failed_start_is_cleared_and_a_run_is_refused(tmp_path):
    layout = RunLayout(tmp_path / "run")
    layout.dictionaries.mkdir(parents=True)
    layout.config.write_text("seed: 0\n")
    assert not layout.holds_a_run()
    prepare_run_dir(layout, overwrite=False)  # what a start that failed before training left
    assert not layout.root.exists() or layout.written() == []
    layout.checkpoints.mkdir(parents=True)
    (layout.checkpoints / "last.ckpt").write_bytes(b"")
    assert layout.holds_a_run()
    with pytest.raises(InputError, match="already holds a run"):
        prepare_run_dir(layout, overwrite=False)
    prepare_run_dir(layout, overwrite=True)
    assert layout.written() == []
