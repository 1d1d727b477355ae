"""Evaluate a finished run's best checkpoint on other cells: ``python eval.py run_dir=... [overrides]``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict

from geneformer_colon.assembly.builders import (
    build_datamodule,
    classifier_from_checkpoint,
    resolve_precision,
)
from geneformer_colon.assembly.scoring import score_split
from geneformer_colon.assembly.trust import RunTrust, head_logits
from geneformer_colon.common.errors import InputError
from geneformer_colon.common.names import FINISHED, TEST
from geneformer_colon.data.dictionaries import MAPPING_FILE, MEDIAN_FILE, TOKEN_FILE
from geneformer_colon.report.summary import print_summary
from geneformer_colon.report.wandb_run import log_finished_run
from geneformer_colon.runs.config import compose_run_config, plain, trusted_content
from geneformer_colon.runs.layout import RunLayout
from geneformer_colon.runs.lock import holding
from geneformer_colon.runs.reading import read_config, read_run
from geneformer_colon.runs.record import run_record, write_metrics
from geneformer_colon.runs.start import save_config

log = logging.getLogger(__name__)

OWN_KEYS = {"run_dir": None, "name": None, "allow_training_donors": False}


def parse_arguments(argv: Sequence[str]) -> dict[str, Any]:
    """``run_dir=``, ``name=`` and ``allow_training_donors=`` from the command line; the rest are overrides."""
    arguments: dict[str, Any] = dict(OWN_KEYS, overrides=[])
    for argument in argv:
        key, equals, value = argument.partition("=")
        if key in OWN_KEYS and equals:
            arguments[key] = value.lower() == "true" if key == "allow_training_donors" else value
        elif argument in ("-h", "--help"):
            raise InputError("usage: python eval.py run_dir=<run directory> [name=<folder>] "
                             "[allow_training_donors=true] [override ...]")
        else:
            arguments["overrides"].append(argument)
    if not arguments["run_dir"]:
        raise InputError("run_dir: not given; python eval.py run_dir=outputs/<run_name> [data.test_donors=[...]]")
    return arguments


def run_config(layout: RunLayout, overrides: Sequence[str] = (), conf_dir: Path | None = None) -> DictConfig:
    """The run's saved config (its targets checked), under ``overrides`` in Hydra's grammar when there are any
    (group options come from ``conf_dir``), tokenizing with the run's own dictionaries."""
    if not layout.config.is_file():
        raise InputError(f"{layout.root}: no config.yaml; run_dir must be a directory written by train.py")
    if layout.folds.is_dir():
        raise InputError(f"{layout.root}: a cross-validated run; use one of its folds, run_dir={layout.folds}/<donor>")
    if overrides:
        cfg = compose_run_config(layout.config, overrides, conf_dir)
    else:
        cfg = OmegaConf.create(trusted_content(OmegaConf.load(layout.config), str(layout.config)))
    dictionaries = layout.dictionaries
    with open_dict(cfg):
        cfg.model.tokenizer.token_dictionary = str(dictionaries / TOKEN_FILE)
        cfg.model.tokenizer.gene_median_dictionary = str(dictionaries / MEDIAN_FILE)
        mapping = dictionaries / MAPPING_FILE
        cfg.model.tokenizer.gene_mapping = str(mapping) if mapping.is_file() else None
    return cfg


def check_unseen(layout: RunLayout, cfg: DictConfig, allow_training_donors: bool) -> None:
    """A test donor the run trained on would make its figures meaningless: refused unless allowed.

    Only when the data is the run's own: in another file the same donor name is not the same person.
    """
    saved = read_config(layout.config)
    if allow_training_donors or plain(cfg.data.source) != saved.get("data", {}).get("source"):
        return
    trained_on = set(read_run(layout.root).donors("train"))
    seen = sorted(trained_on & set(cfg.data.test_donors))
    if seen:
        raise InputError(f"data.test_donors: {seen} trained the run in {layout.root}; evaluate on donors it never "
                         f"saw (not {sorted(trained_on)}), or add allow_training_donors=true")


def run_evaluation(run_dir: str | Path, overrides: Sequence[str], conf_dir: Path, name: str | None = None,
                   allow_training_donors: bool = False) -> dict[str, Any]:
    """Test the run's best checkpoint; write metrics, predictions and plots to run_dir/eval/<name>/.

    Evaluations of a run may run together, never beside a process that writes the run (train.py, resume=true).
    """
    layout = RunLayout(Path(run_dir))
    with holding(layout, shared=True):
        return evaluate_run(layout, overrides, conf_dir, name, allow_training_donors)


def evaluate_run(layout: RunLayout, overrides: Sequence[str], conf_dir: Path, name: str | None,
                 allow_training_donors: bool) -> dict[str, Any]:
    cfg = run_config(layout, ["data.val_donors=[]", *overrides], conf_dir)  # any donor may be a test donor
    check_unseen(layout, cfg, allow_training_donors)
    name = name or "test-" + "-".join(cfg.data.test_donors)
    out = layout.evaluation(name)
    module, checkpoint = classifier_from_checkpoint(layout.root)
    if cfg.data.get("labels") is None:  # the classes the run learned (data.labels=null: its training donors')
        with open_dict(cfg):
            cfg.data.labels = list(module.class_names)
    datamodule = build_datamodule(cfg, stage="test")
    if datamodule.class_names != module.class_names:
        raise InputError(f"data.labels {datamodule.class_names} differ from the classes the run learned "
                         f"{module.class_names}; evaluate with the run's own labels")
    trainer = pl.Trainer(accelerator=cfg.trainer.accelerator, devices=1,
                         precision=resolve_precision(cfg.trainer.precision), logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, default_root_dir=out.root)
    module.keep_embeddings = True  # the kNN and energy scores of each cell
    trainer.test(module, datamodule=datamodule, verbose=False)
    result = module.results[TEST]
    test = score_split(out, TEST, datamodule.store.cells.iloc[result["index"]], result["targets"],
                       result["probabilities"], module.class_names, f"{cfg.run_name} on {name}",
                       (result["metrics"], result["confusion_matrix"]), trust=RunTrust.load(layout.root),
                       logits=head_logits(module.head, result["embeddings"]), embeddings=result["embeddings"])
    record = run_record(f"{cfg.run_name} on {name}", "eval", FINISHED, {TEST: datamodule.split_donors(TEST)},
                        {TEST: len(datamodule.splits[TEST])}, final={TEST: test},
                        recipe={"run_dir": str(layout.root), "checkpoint": str(checkpoint),
                                "overrides": list(overrides)}, data=datamodule.source.provenance())
    record = write_metrics(out, record)
    save_config(out, cfg)
    log_finished_run(cfg, out, "eval", record, module.class_names, save_dir=str(out.root), name=record["run_name"],
                     resume=False)
    print_summary(record, module.class_names, out.root)
    return record
