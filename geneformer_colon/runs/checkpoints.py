"""A run's checkpoints found and read safely: tensors and plain data only, or one clear error."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from geneformer_colon.common.errors import InputError
from geneformer_colon.runs.layout import RunLayout


def resolve_checkpoint(path: str | Path, which: str = "best") -> Path:
    """A ``.ckpt`` file, or a run directory's ``checkpoints/<which>.ckpt``."""
    path = Path(path)
    checkpoint = RunLayout(path).checkpoint(which) if path.is_dir() else path
    if not checkpoint.is_file():
        raise InputError(f"{checkpoint}: no checkpoint there; give a run directory holding "
                         f"checkpoints/{which}.ckpt or a .ckpt file")
    return checkpoint


# What to do about a file that is no readable checkpoint, where it was handed in as one.
USE_A_CHECKPOINT = "use checkpoints/best.ckpt or last.ckpt of a run directory"


def read_checkpoint(path: Path, fix: str = USE_A_CHECKPOINT, mapped: bool = False) -> dict[str, Any]:
    """A checkpoint file loaded safely (tensors and plain data only), or one clear error.

    A file holding code or arbitrary objects is refused, never loaded with ``weights_only=False``. ``fix``: what
    the error tells to do about a file that cannot be read (a run's own damaged last.ckpt is no fix for itself).
    ``mapped``: tensors memory-mapped, read from disk only where touched, so a caller that copies the weights
    out and drops the rest never reads an optimizer state (a checkpoint written before best.ckpt held weights
    only); such a caller must not keep the tensors (the file may be rewritten in place).
    """
    if not zipfile.is_zipfile(path):  # what torch.save and Lightning write
        raise InputError(f"{path}: not a PyTorch Lightning checkpoint, or a damaged one (not a complete PyTorch zip "
                         f"archive); {fix}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError:
        raise InputError(f"{path}: holds objects a checkpoint written by train.py does not hold (code, classes); "
                         "it is not loaded: use a checkpoint from a run directory") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, zipfile.BadZipFile, AttributeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{path}: not a PyTorch Lightning checkpoint, or a damaged one ({reason[:200]}); {fix}"
                         ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise InputError(f"{path}: not a PyTorch Lightning checkpoint (no state_dict); {fix}")
    return checkpoint

