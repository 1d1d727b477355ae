"""A run's classifier as a Hugging Face directory: ``geneformer-colon export RUN_DIR OUT_DIR``.

OUT_DIR holds:

- ``config.json`` + ``model.safetensors``: the encoder, a ``BertModel`` (``save_pretrained``), loadable
  with transformers alone (``BertModel.from_pretrained(OUT_DIR, add_pooling_layer=False)``: the
  classifier pools the cells itself, so there is no pooler), with ``id2label``/``label2id``;
- ``cell_classifier.safetensors``: the classifier head (a linear layer on the pooled embedding);
- ``cell_classifier.json``: the pooling, the classes and where it came from;
- ``token_dictionary.pkl``, ``gene_median_dictionary.pkl`` (and ``ensembl_mapping_dict.pkl``): the
  gene dictionaries the run tokenized with, and ``tokenizer_settings.json`` (model version, input size);
- ``README.md``: a model card (data, donors, recipe, the run's metrics);
- ``calibration.json`` and ``calibration_cells.npz``: the run's calibration and what ``predict --abstain`` and
  ``--conformal`` need of its validation cells (a run from before them has none).

A cross-validated run exports every finished fold so, in ``folds/<test donor>/``, with ``ensemble.json`` (the
folds) and a model card listing them: ``predict OUT_DIR`` applies the ensemble (``--fold`` one of them).

``geneformer-colon predict OUT_DIR ...`` gives the same probabilities as from the run directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from transformers.utils import logging as transformers_logging

from geneformer_colon.assembly.trained_classifier import (
    ENSEMBLE_SETTINGS,
    EXPORT_HEAD,
    EXPORT_SETTINGS,
    FoldEnsemble,
    TrainedClassifier,
)
from geneformer_colon.common.errors import InputError
from geneformer_colon.common.names import EVAL_SPLITS, METRICS
from geneformer_colon.common.output_folder import output_folder
from geneformer_colon.common.text_tables import markdown_table
from geneformer_colon.data.dictionaries import MAPPING_FILE, MEDIAN_FILE, SETTINGS_FILE, TOKEN_FILE, save_settings
from geneformer_colon.report.history import data_source, recipe_rows
from geneformer_colon.runs.layout import CELLS_FILE, TRUST_FILE, RunLayout
from geneformer_colon.runs.reading import read_run


def model_card(model: TrainedClassifier, run_dir: Path) -> str:
    """The README.md of an export: what the model is, what it was trained on, its recipe, how it scored."""
    run = read_run(run_dir)
    scores = [[f"{split} ({', '.join(run.donors(split))})", *(run.metrics.get(split, {}).get(m) for m in METRICS)]
              for split in EVAL_SPLITS]
    return "\n".join([
        "---\nlibrary_name: transformers\ntags: [geneformer, single-cell, cell-classification]\n---\n",
        f"# {run.name}: a Geneformer cell classifier ({', '.join(model.class_names)})\n",
        "Fine-tuned with geneformer-colon. The encoder is a BERT without a pooler "
        "(`BertModel.from_pretrained(<this folder>, add_pooling_layer=False)`); "
        f"cells are pooled by `{model.module.encoder.pooling}` pooling and classified by the linear head in "
        f"`{EXPORT_HEAD}`. Cells are tokenized with Geneformer's rank-value encoding "
        f"({model.settings.model_version}, input size {model.settings.resolved_input_size}) using the gene "
        "dictionaries of this folder.\n",
        "Apply it to an h5ad of raw counts:\n",
        "    geneformer-colon predict <this folder> cells.h5ad --out cells_predicted.h5ad\n",
        f"- **Data:** {data_source(run)}",
        f"- **Training donors:** {', '.join(run.donors('train')) or '-'}",
        f"- **Best epoch:** {run.metrics.get('best_epoch')} of {len(run.epochs)}",
        f"- **Checkpoint:** `{model.origin['checkpoint']}`\n",
        "## Recipe\n", markdown_table(["setting", "value"], recipe_rows(run)),
        "## Metrics of the run (best checkpoint)\n", markdown_table(["split", *METRICS.values()], scores),
    ])


# Every file an export may write (the mapping only for a run that mapped gene ids).
EXPORT_FILES = frozenset({"config.json", "model.safetensors", EXPORT_HEAD, EXPORT_SETTINGS, TOKEN_FILE, MEDIAN_FILE,
                          MAPPING_FILE, SETTINGS_FILE, "README.md", ENSEMBLE_SETTINGS, "folds", TRUST_FILE,
                          CELLS_FILE})


def check_out_dir(run_dir: Path, out_dir: Path) -> None:
    """An export never goes into (or around) the run it comes from."""
    run, out = run_dir.resolve(), out_dir.resolve()
    if out == run or out in run.parents or run in out.parents:
        raise InputError(f"{out_dir}: the export would overlap the run directory {run_dir}; export elsewhere")


def write_export(model: TrainedClassifier, run_dir: Path, directory: Path) -> None:
    """One classifier's export files in ``directory`` (see the module docstring); LoRA adapters merged."""
    bert = model.module.encoder.plain_bert()
    bert.config.id2label = dict(enumerate(model.class_names))
    bert.config.label2id = {name: index for index, name in enumerate(model.class_names)}
    described: dict[str, Any] = {
        "format": 1,
        "classes": model.class_names,
        "pooling": model.module.encoder.pooling,
        "run": {"run_name": read_run(run_dir).name, "run_dir": str(run_dir), "checkpoint": model.origin["checkpoint"],
                "trained_on": model.origin["trained_on"], "validated_on": model.origin.get("validated_on", [])},
    }
    bert.save_pretrained(directory)
    save_file({name: tensor.contiguous() for name, tensor in model.module.head.state_dict().items()},
              directory / EXPORT_HEAD)
    (directory / EXPORT_SETTINGS).write_text(json.dumps(described, indent=2) + "\n")
    model.dictionaries.save(directory)
    save_settings(directory, model.settings, model.dictionaries)
    (directory / "README.md").write_text(model_card(model, run_dir))
    if model.trust is not None:
        model.trust.save(directory)


def ensemble_card(model: FoldEnsemble, run_dir: Path) -> str:
    """The README.md of a CV run's export: the ensemble, its folds and how each scored on its left-out donor."""
    run = read_run(run_dir)
    rows = []
    for fold in model.origin["folds"]:
        fold_run = read_run(RunLayout(run_dir).fold(fold).root)
        rows.append([fold, ", ".join(fold_run.donors("train")), ", ".join(fold_run.donors("val")),
                     *(fold_run.metrics.get("test", {}).get(m) for m in METRICS)])
    return "\n".join([
        "---\nlibrary_name: transformers\ntags: [geneformer, single-cell, cell-classification]\n---\n",
        f"# {run.name}: an ensemble of {len(rows)} Geneformer cell classifiers ({', '.join(model.class_names)})\n",
        "A leave-one-donor-out run of geneformer-colon used as one model: `geneformer-colon predict <this folder> "
        "cells.h5ad --out cells_predicted.h5ad` averages the class probabilities of the folds' best checkpoints "
        "and writes their embeddings side by side (fold after fold, in the order below); `--fold DONOR` uses one "
        f"fold. Each fold is a complete export in `folds/<test donor>/` (listed in `{ENSEMBLE_SETTINGS}`).\n",
        f"- **Data:** {data_source(run)}\n",
        "## Folds\n",
        markdown_table(["fold (test donor)", "training donors", "validation donor",
                        *(f"test {title}" for title in METRICS.values())], rows),
        "## Recipe\n", markdown_table(["setting", "value"], recipe_rows(run)),
    ])


def export_run(run_dir: str | Path, out_dir: str | Path, fold: str | None = None, overwrite: bool = False) -> Path:
    """Write the export of a run directory's best checkpoint to ``out_dir`` (whole; replacing only an earlier
    export's own unchanged files unless ``overwrite``: :mod:`~geneformer_colon.common.output_folder`); return it.
    A CV run: its ``fold``, or every finished fold (``folds/<test donor>/``) with ``ensemble.json`` and a model
    card."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    check_out_dir(run_dir, out_dir)
    model = TrainedClassifier.load(run_dir, fold)
    transformers_logging.disable_progress_bar()
    with output_folder(out_dir, "export", EXPORT_FILES, overwrite) as tmp:
        if isinstance(model, FoldEnsemble):
            for name, member in zip(model.origin["folds"], model.members):
                write_export(member, RunLayout(run_dir).fold(name).root, tmp / "folds" / name)
            (tmp / ENSEMBLE_SETTINGS).write_text(json.dumps({"format": 1, "folds": model.origin["folds"],
                                                             "classes": model.class_names}, indent=2) + "\n")
            (tmp / "README.md").write_text(ensemble_card(model, run_dir))
        elif "run_dir" in model.origin:
            write_export(model, Path(model.origin["run_dir"]), tmp)
        else:
            raise InputError(f"{run_dir}: an export already; export a run directory (outputs/<run_name>)")
    return out_dir
