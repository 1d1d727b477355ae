"""Run directories the tests read: their records, their files, their cohort; the sweep the session trains."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

# Hydra-style job folders of a sweep over these overrides (on top of experiment=colon6): conftest's trained_runs.
JOBS = {
    "0_loss.focal_gamma=0": ["loss.focal_gamma=0"],
    "1_augment.mixup_prob=0.3,loss.focal_gamma=1.5": ["augment.mixup_prob=0.3", "loss.focal_gamma=1.5"],
}
SWEEP = Path("multirun") / "2026-11-24" / "10-00-00"

# A cohort whose donors share the tumour programme (donor_shift=0), large enough for a tiny model to learn it.
PROGRAMME_COHORT = {"n_cells": 960, "n_genes": 600, "donor_shift": 0.0}


def metrics_of(run_dir: Path) -> dict:
    """The run's metrics.json."""
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def canonical_h5ad(source) -> Path:
    """The canonical .h5ad of the cells a run read: ``source`` is its run directory (its config.yaml) or a
    composed config. The file the data source itself names (``<cache_dir>/ingest/<source key>.h5ad``, the
    key a hash of the cohort's settings), so it is the cohort of that config whatever else the cache holds."""
    from omegaconf import DictConfig, OmegaConf

    from geneformer_colon.runs.config import instantiate_trusted
    from geneformer_colon.runs.reading import read_config

    config = OmegaConf.create(read_config(Path(source) / "config.yaml")) if not isinstance(source, DictConfig) \
        else source
    path = instantiate_trusted(config.data.source, "data.source").canonical(config.paths.cache_dir)
    assert path.is_file(), path
    return path


def programme_auroc(table, score: str, sign: float) -> float:
    """How well a gene ranking (``sign`` x the column ``score`` of a genes.csv) finds the planted Tumor programme
    of :data:`PROGRAMME_COHORT` (1: its genes all first)."""
    from sklearn.metrics import roc_auc_score

    from geneformer_colon.data.synthetic import programme_genes

    programme = programme_genes(PROGRAMME_COHORT["n_genes"], 0, donor_shift=PROGRAMME_COHORT["donor_shift"])["Tumor"]
    return roc_auc_score(table["ensembl_id"].isin(set(programme)), sign * table[score])


def bad_checkpoints(folder: Path) -> dict[str, Path]:
    """A text file named .ckpt, and a checkpoint holding code that must never run."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "notes.ckpt"
    text.write_text("not a checkpoint at all")

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    with_code = folder / "code.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, with_code)
    return {"text": text, "code": with_code}


def fingerprints(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path) to the sha256 of its bytes; a symbolic link to where it points
    (W&B links each run's ``logs/debug-core.log`` to its service's one log of the whole process, which grows on its
    own schedule)."""
    return {str(path.relative_to(folder)): f"link to {os.readlink(path)}" if path.is_symlink()
            else hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_symlink() or path.is_file()}
