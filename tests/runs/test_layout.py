"""The paths of one run directory (layout.py): the tree its docstring draws, and what counts as a run a new one must
not silently replace."""

from __future__ import annotations

import json

from geneformer_colon.runs.layout import RunLayout


def test_the_files_of_a_run_are_where_the_layout_says(tmp_path):
    layout = RunLayout(tmp_path / "colon6")
    relative = {name: path.relative_to(layout.root).as_posix() for name, path in (
        ("config", layout.config), ("metrics", layout.metrics), ("best", layout.checkpoint()),
        ("last", layout.checkpoint("last")), ("test", layout.prediction_file("test")),
        ("confusion", layout.confusion_plot("val")), ("roc", layout.curve_plot("roc", "test")),
        ("loss", layout.loss_plot), ("run_id", layout.wandb_run_id), ("cv", layout.cv_json))}
    assert relative == {"config": "config.yaml", "metrics": "metrics.json", "best": "checkpoints/best.ckpt",
                        "last": "checkpoints/last.ckpt", "test": "predictions/test.csv",
                        "confusion": "plots/confusion_val.png", "roc": "plots/roc_test.png", "loss": "plots/loss.png",
                        "run_id": "wandb/run_id", "cv": "cv.json"}
    assert layout.fold("KUL01").root == layout.root / "folds" / "KUL01"
    assert layout.fold("KUL01", seed=2).root == layout.root / "folds" / "KUL01" / "seed2"
    assert layout.evaluation("test-KUL21").metrics == layout.root / "eval" / "test-KUL21" / "metrics.json"
    assert layout.lock == tmp_path / ".colon6.lock"  # beside the directory: taking it changes nothing inside


def test_a_run_is_a_checkpoint_a_finished_record_folds_or_a_pretrained_model(tmp_path):
    layout = RunLayout(tmp_path / "run")
    assert not layout.holds_a_run() and layout.written() == []
    layout.dictionaries.mkdir(parents=True)  # what a start that failed before training leaves
    layout.metrics.write_text(json.dumps({"status": "running"}))
    (layout.root / ".hydra").mkdir()
    assert not layout.holds_a_run()
    assert layout.written() == [layout.metrics, layout.dictionaries]  # Hydra's .hydra/ is not the run's
    layout.metrics.write_text(json.dumps({"status": "finished"}))
    assert layout.holds_a_run()
    for made in (layout.checkpoints, layout.folds, layout.hf):
        other = RunLayout(tmp_path / made.name)
        (other.root / made.name).mkdir(parents=True)
        if made == layout.checkpoints:
            assert not other.holds_a_run()  # an empty checkpoints/ is no run
            other.checkpoint("last").write_bytes(b"")
        assert other.holds_a_run(), made.name
