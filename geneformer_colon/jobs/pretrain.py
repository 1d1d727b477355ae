"""One pretraining run: masked genes on the cells of any data source, then a Hugging Face checkpoint.

The run directory is a training run's (refusal, ``resume=true``, checkpoints, CSV and W&B logs,
metrics.json with every epoch's held-out masked-gene loss and accuracy) plus ``hf/``: the best
epoch's ``BertForMaskedLM`` (``save_pretrained``, safetensors), the gene dictionaries it was
trained with in the file names Geneformer uses, and ``tokenizer_settings.json`` (model version,
input size, whether ids were mapped). ``model=pretrained model.encoder.pretrained=<run>/hf``
fine-tunes from it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from transformers.utils import logging as transformers_logging

from geneformer_colon.assembly.builders import build_masked_gene_model, read_checkpoint
from geneformer_colon.common.io import atomic_path
from geneformer_colon.common.names import FINISHED, VAL
from geneformer_colon.common.text_tables import print_table
from geneformer_colon.data.datamodule import CellDataModule
from geneformer_colon.data.dictionaries import save_settings
from geneformer_colon.jobs.train import fit_run, unlogged
from geneformer_colon.model.masked_genes import MaskedGeneModel
from geneformer_colon.report.history import write_history
from geneformer_colon.report.wandb_run import finishing_wandb_run
from geneformer_colon.runs.layout import RunLayout
from geneformer_colon.runs.reading import Run
from geneformer_colon.runs.record import best_epoch, write_metrics

log = logging.getLogger(__name__)

MONITOR = f"{VAL}/masked_loss"


def masked_gene_model_for(cfg: DictConfig, datamodule: CellDataModule, fresh: bool) -> MaskedGeneModel:
    return build_masked_gene_model(cfg, datamodule)


def save_hf(module: MaskedGeneModel, datamodule: CellDataModule, layout: RunLayout) -> Path:
    """The pretrained model as a Hugging Face checkpoint with its dictionaries (written atomically)."""
    transformers_logging.disable_progress_bar()
    with atomic_path(layout.hf) as tmp:
        module.model.save_pretrained(tmp)
        datamodule.dictionaries.save(tmp)
        save_settings(tmp, datamodule.settings, datamodule.dictionaries)
    return layout.hf


def print_pretraining(record: dict[str, Any], layout: RunLayout) -> None:
    rows = [[epoch["epoch"], epoch[MONITOR], epoch[f"{VAL}/masked_accuracy"]] for epoch in record["epochs"]]
    print_table(f"{record['run_name']}: best epoch {record['best_epoch']}",
                ["epoch", f"masked loss ({', '.join(record['donors'][VAL])})", "masked accuracy"], rows,
                numeric=["masked accuracy"])
    print(f"Hugging Face checkpoint: {layout.hf}\nrun directory: {layout.root}")


@finishing_wandb_run
def pretrain(cfg: DictConfig) -> dict[str, Any]:
    """Pretrain, keep the best epoch (lowest held-out masked-gene loss), write hf/; return the metrics.json record."""
    run = fit_run(cfg, "pretrain", masked_gene_model_for)
    if run.best_path:
        run.module.load_state_dict(read_checkpoint(Path(run.best_path))["state_dict"])
    with unlogged(run.trainer):
        run.trainer.validate(run.module, datamodule=run.datamodule, verbose=False)
    final = {VAL: dict(run.module.results[VAL])}
    summary = run.record(FINISHED, run.epochs, final=final, best_epoch=best_epoch(run.epochs, MONITOR, "min"),
                         best_checkpoint=run.best_checkpoint)
    if run.trainer.is_global_zero:
        save_hf(run.module, run.datamodule, run.layout)
        summary = write_metrics(run.layout, summary)
        write_history(Run(run.layout.root, summary, OmegaConf.to_container(cfg, resolve=True), {}))
        print_pretraining(summary, run.layout)
    return summary
