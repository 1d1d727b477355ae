"""Where the repository and the real Geneformer dictionaries are."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
HELPERS = REPO_ROOT / "tests" / "helpers"
# The real Geneformer gene dictionaries, beside the repository (../shared) where there is a checkout.
GENEFORMER_DICTS = REPO_ROOT.parent / "shared" / "geneformer"
