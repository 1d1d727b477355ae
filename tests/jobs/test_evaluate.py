"""`python eval.py`: a run's best checkpoint on other cells, with Hydra's override grammar, safely."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import pandas as pd
import pytest
import yaml
from helpers.processes import run_script
from helpers.tiny import CLASSES
from sklearn.metrics import accuracy_score, f1_score

from geneformer_colon.common.errors import InputError
from geneformer_colon.jobs.evaluate import run_evaluation
from geneformer_colon.runs.config import CONF_DIR

CONF = CONF_DIR


@pytest.fixture
def run_dir(trained_runs, tmp_path) -> Path:
    """A copy of a finished run, moved away from where it was trained."""
    return Path(shutil.copytree(trained_runs[0], tmp_path / "moved" / "run"))


@pytest.mark.slow  # eval.py as a process: make test-slow, in CI
def test_eval_scores_the_best_checkpoint_on_several_donors_and_reports_each(run_dir):
    result = run_script("eval.py", f"run_dir={run_dir}", "data.test_donors=[KUL21,KUL28]",
                        "allow_training_donors=true")
    assert result.returncode == 0, result.stderr[-3000:]
    out = run_dir / "eval" / "test-KUL21-KUL28"
    metrics = json.loads((out / "metrics.json").read_text())
    table = pd.read_csv(out / "predictions" / "test.csv")
    assert set(table["donor"]) == {"KUL21", "KUL28"}
    assert (out / "plots" / "confusion_test.png").is_file() and (out / "config.yaml").is_file()
    truth = table["true"].map(CLASSES.index)
    predicted = table[[f"prob_{c}" for c in CLASSES]].to_numpy().argmax(1)
    assert metrics["test"]["accuracy"] == pytest.approx(accuracy_score(truth, predicted), abs=1e-4)
    assert metrics["recipe"]["checkpoint"] == str(run_dir / "checkpoints" / "best.ckpt")  # the copy's own
    # several donors at once: each one's figures, equal to scikit-learn's on its rows, and on the console
    for donor in ("KUL21", "KUL28"):
        rows = table[table["donor"] == donor]
        by_donor = metrics["test"]["by_donor"][donor]
        assert by_donor["cells"] == len(rows)
        assert by_donor["macro_f1"] == pytest.approx(f1_score(rows["true"], rows["predicted"], average="macro"),
                                                     abs=1e-4)
    assert "test by donor" in result.stdout and "KUL28" in result.stdout


@pytest.mark.slow  # eval.py as a process: make test-slow, in CI
def test_a_donor_the_run_trained_on_is_refused_unless_allowed(run_dir):
    with pytest.raises(InputError, match=r"data.test_donors: \['KUL21'\] trained the run.*allow_training_donors"):
        run_evaluation(run_dir, ["data.test_donors=[KUL21]"], CONF)
    bad = run_script("eval.py", f"run_dir={run_dir}", "data.test_donors=[KUL77]")
    assert bad.returncode == 2 and "KUL77" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_group_overrides_evaluate_another_h5ad(run_dir, cohort, tmp_path):
    """`data=h5ad data.source.path=...`: the cells of another file, its own column names, no cell types."""
    cells = ad.read_h5ad(cohort(run_dir))
    cells = cells[cells.obs["donor"] == "KUL01"].copy()
    cells.obs = cells.obs.rename(columns={"donor": "patient", "label": "region"}).drop(columns=["cell_type"])
    other = tmp_path / "other.h5ad"
    cells.write_h5ad(other)
    record = run_evaluation(run_dir, ["data=h5ad", f"data.source.path={other}", "data.source.donor_key=patient",
                                      "data.source.label_key=region", "data.source.cell_type_key=null",
                                      "data.test_donors=[KUL01]"], CONF, name="other")
    table = pd.read_csv(run_dir / "eval" / "other" / "predictions" / "test.csv")
    assert len(table) == record["test"]["cells"] == cells.n_obs
    assert set(table["cell_type"]) == {"unknown"}
    same = pd.read_csv(run_dir / "predictions" / "test.csv").set_index("cell_id")  # KUL01 was the run's test donor
    probabilities = [f"prob_{c}" for c in CLASSES]
    pd.testing.assert_frame_equal(table.set_index("cell_id").loc[same.index, probabilities], same[probabilities],
                                  atol=1e-5)


@pytest.mark.slow  # eval.py as a process: make test-slow, in CI
def test_a_crafted_config_is_refused_and_nothing_is_written(run_dir, tmp_path):
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["data"]["source"] = {"_target_": "shutil.copyfile", "src": str(run_dir / "config.yaml"),
                                "dst": str(tmp_path / "written")}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_script("eval.py", f"run_dir={run_dir}", "data.test_donors=[KUL21]", "allow_training_donors=true")
    assert result.returncode == 2
    assert "data.source._target_ is 'shutil.copyfile'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "written").exists() and not (run_dir / "eval").exists()

    # the same target hidden in an interpolation that makes a node when resolved
    config["data"]["source"] = "${oc.create:{_target_: shutil.copyfile, src: %s, dst: %s}}" % (
        run_dir / "config.yaml", tmp_path / "written")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    for overrides in (["data.test_donors=[KUL21]", "allow_training_donors=true"], []):
        with pytest.raises(InputError, match=r"data.source._target_ is 'shutil.copyfile'"):
            if overrides:
                run_evaluation(run_dir, overrides[:1], CONF, allow_training_donors=True)
            else:
                from geneformer_colon.jobs.evaluate import run_config
                from geneformer_colon.runs.layout import RunLayout

                run_config(RunLayout(run_dir))
    assert not (tmp_path / "written").exists()


def test_eval_overrides_name_the_closest_key_or_option(trained_runs):
    for argument, expected in (("data.tst_donors=[KUL21]", "(did you mean data.test_donors?)"),
                               ("data=h5a", "data has no option 'h5a' (did you mean h5ad?)")):
        with pytest.raises(InputError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
            run_evaluation(trained_runs[0], [argument], CONF)
    assert not Path(trained_runs[0], "eval").exists()
