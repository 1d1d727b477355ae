"""Shared fixtures: the real Geneformer dictionaries (when ../shared is there) and offline W&B."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
GENEFORMER_DICTS = REPO_ROOT.parent / "shared" / "geneformer"


@pytest.fixture(scope="session")
def geneformer_dicts() -> Path:
    """The folder of the real Geneformer gene dictionaries; tests using it skip where it is absent."""
    if not (GENEFORMER_DICTS / "token_dictionary_gc30M.pkl").is_file():
        pytest.skip(f"real Geneformer dictionaries not found in {GENEFORMER_DICTS}")
    return GENEFORMER_DICTS
