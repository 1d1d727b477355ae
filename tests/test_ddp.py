"""DDP with two CPU processes (gloo) for one epoch: one run directory, written by rank 0 alone,
with metrics and predictions over the whole validation and test sets, not one rank's share; group DRO
and mixup across donors train under it, the ranks keeping one set of donor weights."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import compose_train, run_script, tiny_overrides
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from geneformer_colon.assembly.builders import build_datamodule
from geneformer_colon.data.samplers import EvalBatchSampler

CLASSES = ["Normal", "Border", "Tumor"]
# Small evaluation batches: the ranks get unequal numbers of cells to evaluate.
SETTINGS = ["run_name=ddp", "logger=csv", "data.eval_batch_size=16", "trainer.max_epochs=1"]
ROBUST = ["robust=group_dro", "robust.step_size=0.5", "augment.mixup_prob=0.5", "augment.mixup_across_donors=true"]


def test_two_process_ddp_evaluates_every_cell_once_and_keeps_one_set_of_donor_weights(tmp_path, shared_dirs):
    overrides = tiny_overrides(tmp_path / "outputs", shared_dirs) + SETTINGS + ROBUST
    result = run_script("train.py", *overrides, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                        "+callbacks.donor_weights._target_=donor_weights.SaveDonorWeights",
                        f"+callbacks.donor_weights.directory={tmp_path / 'weights'}")
    assert result.returncode == 0, result.stderr[-3000:]
    # group DRO sums the donors' losses over the ranks: both end with the same weights, moved from equal
    weights = [json.loads((tmp_path / "weights" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert weights[0] == weights[1] and len(set(weights[0])) == len(weights[0])
    run_dir = tmp_path / "outputs" / "ddp"
    # both ranks ran in the one run directory (rank 1 logs there too); no second run anywhere
    assert (run_dir / "train_ddp_process_1.log").is_file()
    assert sorted(path.name for path in (tmp_path / "outputs").iterdir() if not path.name.startswith(".")) == ["ddp"]

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "finished" and [epoch["epoch"] for epoch in metrics["epochs"]] == [0]
    datamodule = build_datamodule(compose_train(overrides))
    for split in ("val", "test"):
        cells = datamodule.split_cells(split)
        shares = [sum(map(len, EvalBatchSampler(cells["length"].to_numpy(), 16, rank, 2))) for rank in (0, 1)]
        assert shares[0] != shares[1]  # ragged shares: the gather must pad and trim
        table = pd.read_csv(run_dir / "predictions" / f"{split}.csv")
        assert sorted(table["cell_id"]) == sorted(cells["cell_id"])  # every cell exactly once
        truth = table["true"].map(CLASSES.index).to_numpy()
        probabilities = table[[f"prob_{name}" for name in CLASSES]].to_numpy()
        assert sum(map(sum, metrics[split]["confusion_matrix"])) == len(cells)
        assert metrics[split]["accuracy"] == pytest.approx(accuracy_score(truth, probabilities.argmax(1)), abs=1e-4)
        assert metrics[split]["macro_f1"] == pytest.approx(
            f1_score(truth, probabilities.argmax(1), average="macro"), abs=1e-4)
        assert metrics[split]["macro_auroc"] == pytest.approx(
            roc_auc_score(truth, probabilities, multi_class="ovr", average="macro"), abs=1e-4)
    assert metrics["epochs"][0]["val/accuracy"] == pytest.approx(metrics["val"]["accuracy"], abs=1e-4)
