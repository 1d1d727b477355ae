"""An Optuna study driven by Hydra (study.py): the median pruner stops a trial below the median of earlier ones, and
the trial's outcome says so (a study run twice: test_sweep.py)."""

from __future__ import annotations

import optuna
import pytest

from geneformer_colon.jobs.study import PRUNED_AT, outcome
from geneformer_colon.jobs.train import train


def test_the_median_pruner_stops_a_trial_below_the_median_of_earlier_ones(tiny_cfg, tmp_path):
    storage = f"sqlite:///{tmp_path / 'prune.db'}"
    study = optuna.create_study(study_name="prune", storage=storage, direction="maximize")
    for _ in range(2):  # two earlier trials that scored 1.0 at every epoch (counted from 1, as the runs count)
        earlier = study.ask()
        for epoch in (1, 2):
            earlier.report(1.0, epoch)
        study.tell(earlier, 1.0)

    def trial_run(pruner: str) -> tuple[dict, optuna.trial.Trial]:
        trial = study.ask()
        record = train(tiny_cfg(
            "experiment=colon6", "sweep=optuna", "logger=csv", "trainer.max_epochs=2", "callbacks.early_stopping=null",
            f"run_name={pruner}", "sweep.study=prune", f"sweep.storage='{storage}'", f"sweep.trial={trial.number}",
            f"sweep.pruner={pruner}", "sweep.startup_trials=2"))
        return record, trial

    pruned, trial = trial_run("median")
    assert [epoch["epoch"] for epoch in pruned["epochs"]] == [1] and pruned["status"] == "finished"
    reported = study.trials[trial.number]
    assert reported.user_attrs[PRUNED_AT] == 1
    assert reported.intermediate_values == {1: pytest.approx(pruned["epochs"][0]["val/macro_f1"], abs=1e-4)}
    assert outcome(study, trial.number, pruned["val"]["macro_f1"])[0] == optuna.trial.TrialState.PRUNED
    kept, trial = trial_run("none")
    assert [epoch["epoch"] for epoch in kept["epochs"]] == [1, 2]
    assert PRUNED_AT not in study.trials[trial.number].user_attrs
    assert outcome(study, trial.number, kept["val"]["macro_f1"]) == (optuna.trial.TrialState.COMPLETE,
                                                                     kept["val"]["macro_f1"])
