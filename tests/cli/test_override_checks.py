"""A Hydra entry point's command line checked before Hydra runs (override_checks.py): a bad override is one line
naming the closest key or option."""

from __future__ import annotations

import pytest

from geneformer_colon.cli.override_checks import check_command_line
from geneformer_colon.common.errors import InputError
from geneformer_colon.runs.config import CONF_DIR

# Each bad command line to (a part of) its one line.
BAD_COMMAND_LINES = {
    "optimizer.lrr=1": "optimizer.lrr: no such key in the config (did you mean optimizer.lr?)",
    "experiment=nope": "experiment=nope: experiment has no option 'nope'; choose one of colon1, colon3",
    "+optimizer.lrr=1": "+optimizer.lrr: torch.optim.AdamW takes no argument 'lrr' (did you mean optimizer.lr?)",
    "optimizer.lr=[1": "optimizer.lr=[1: not an override",
    "loss.focal_gamma=0,1.5": "several values are a sweep; add -m",
    "experimnt=colon6": "(did you mean experiment?)",
}


@pytest.mark.parametrize("config", ["train", "pretrain", "baseline"])
def test_hydras_errors_are_one_line_naming_the_closest_key_or_option(config):
    for argument, expected in BAD_COMMAND_LINES.items():
        if config == "pretrain" and argument.startswith(("experiment", "loss")):
            continue  # pretraining has no experiments nor loss
        with pytest.raises(InputError) as refused:
            check_command_line(CONF_DIR, config, [argument])
        assert expected in str(refused.value) and "\n" not in str(refused.value), (argument, str(refused.value))
    check_command_line(CONF_DIR, "train", ["-m", "loss.focal_gamma=0,1.5", "+callbacks.early_stopping.min_delta=1",
                                       "+callbacks.extra._target_=pytorch_lightning.callbacks.LearningRateMonitor"])
