"""Evaluate a finished run's best checkpoint on any donors: `python eval.py run_dir=...`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict

from geneformer_colon.builders import (
    build_datamodule,
    build_module,
    load_weights,
    resolve_precision,
)
from geneformer_colon.errors import InputError
from geneformer_colon.io import write_json
from geneformer_colon.training import write_split_outputs


def evaluation_config(run_dir: Path, overrides: list[str]) -> DictConfig:
    """The run's saved config with the command line's overrides, reading the run's own dictionaries.

    Validation donors are dropped unless given, so any donor may be a test donor.
    """
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise InputError(f"{run_dir}: no config.yaml; run_dir must be a directory written by train.py")
    cfg = OmegaConf.load(saved)
    with open_dict(cfg):
        cfg.data.val_donors = []
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
        dictionaries = run_dir / "dictionaries"
        cfg.model.tokenizer.token_dictionary = str(dictionaries / "token_dictionary.pkl")
        cfg.model.tokenizer.gene_median_dictionary = str(dictionaries / "gene_median_dictionary.pkl")
        mapping = dictionaries / "ensembl_mapping_dict.pkl"
        cfg.model.tokenizer.gene_mapping = str(mapping) if mapping.is_file() else None
        # config.yaml is saved resolved: data.tokenizer is a copy of model.tokenizer, not a link.
        cfg.data.tokenizer = cfg.model.tokenizer
    return cfg


def run_evaluation(run_dir: str | Path, overrides: list[str], name: str | None = None) -> dict[str, Any]:
    """Test the run's best checkpoint; write metrics, predictions and plots to run_dir/eval/<name>/."""
    run_dir = Path(run_dir)
    cfg = evaluation_config(run_dir, overrides)
    name = name or "test-" + "-".join(cfg.data.test_donors)
    out_dir = run_dir / "eval" / name
    datamodule = build_datamodule(cfg, stage="test")
    module = build_module(cfg, datamodule)
    checkpoint = load_weights(module, run_dir)
    trainer = pl.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=resolve_precision(cfg.trainer.precision),
        logger=False,
        enable_checkpointing=False,
        default_root_dir=out_dir,
    )
    trainer.test(module, datamodule=datamodule, verbose=False)
    test = write_split_outputs(out_dir, module, datamodule, "test", f"{cfg.run_name} on {name}")
    result = {"run_dir": str(run_dir), "checkpoint": str(checkpoint), "test_donors": list(cfg.data.test_donors),
              "overrides": overrides, "test": test}
    write_json(out_dir / "metrics.json", result)
    return result
