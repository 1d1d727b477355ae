"""Shared fixtures: the real Geneformer dictionaries (when ../shared is there) and offline W&B."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from geneformer_colon.runs.config import CONF_DIR

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread a process: the tests' models are tiny, and two threads on two cores shared with wandb-core
# and the tests' own subprocesses spend most of their time waiting for each other (a run is 10x slower).
# Numba too: its parallel synthetic generator would set OpenMP, and so torch, back to a thread a core.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
GENEFORMER_DICTS = REPO_ROOT.parent / "shared" / "geneformer"


@pytest.fixture(scope="session")
def geneformer_dicts() -> Path:
    """The folder of the real Geneformer gene dictionaries; tests using it skip where it is absent."""
    if not (GENEFORMER_DICTS / "token_dictionary_gc30M.pkl").is_file():
        pytest.skip(f"real Geneformer dictionaries not found in {GENEFORMER_DICTS}")
    return GENEFORMER_DICTS


@pytest.fixture(scope="session")
def shared_dirs(tmp_path_factory) -> dict[str, Path]:
    """Synthetic GEO files and caches shared by the tests (each is keyed by its inputs)."""
    root = tmp_path_factory.mktemp("shared")
    return {"data": root / "data", "cache": root / "cache"}


def tiny_overrides(output_dir: Path, shared: dict[str, Path]) -> list[str]:
    """Settings that make a whole run take seconds on two CPU cores."""
    return [
        f"paths.output_dir={output_dir}",
        f"paths.data_dir={shared['data']}",
        f"paths.cache_dir={shared['cache']}",
        "data.source.n_cells=480",
        "data.source.n_genes=300",
        "data.batch_size=32",
        "model.tokenizer.input_size=128",
        "model.encoder.hidden_size=32",
        "model.encoder.intermediate_size=64",
        "model.encoder.num_attention_heads=2",
        "trainer.max_epochs=1",
        "callbacks.progress_bar=null",
    ]


def train_tiny(tmp_path: Path, shared: dict[str, Path], *overrides: str) -> dict:
    """A tiny training run under ``tmp_path/outputs`` (fine_tune.train); its metrics.json record."""
    from geneformer_colon.jobs.train import train

    return train(compose_train(tiny_overrides(tmp_path / "outputs", shared) + list(overrides)))


def run_metrics(tmp_path: Path, run_name: str) -> dict:
    """metrics.json of the run ``run_name`` under ``tmp_path/outputs``."""
    return json.loads((tmp_path / "outputs" / run_name / "metrics.json").read_text())


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
    """Every file under ``folder`` (relative path) to the sha256 of its bytes."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def run_script(script: str, *arguments: str, wait: bool = True, timeout: int = 600, **kwargs):
    """``python <script> <arguments>`` in the repository, with tests/helpers importable (for test callbacks).

    ``wait``: the finished process (output captured), else the running Popen (output to a log file).
    """
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "tests" / "helpers")}
    command = [sys.executable, script, *arguments]
    if wait:
        return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env,
                              check=False, **kwargs)
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, text=True, **kwargs)


def compose_train(overrides: list[str], config_name: str = "train"):
    """The train config as Hydra composes it for the command line."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides=overrides)


# Hydra-style job folders of a sweep over these overrides (on top of experiment=colon6).
JOBS = {
    "0_loss.focal_gamma=0": ["loss.focal_gamma=0"],
    "1_augment.mixup_prob=0.3,loss.focal_gamma=1.5": ["augment.mixup_prob=0.3", "loss.focal_gamma=1.5"],
}
SWEEP = Path("multirun") / "2026-11-24" / "10-00-00"


@pytest.fixture(scope="session", name="trained_runs")
def trained_runs_fixture(tmp_path_factory, shared_dirs) -> list[Path]:
    """Two finished 2-epoch tiny runs in a sweep-like folder <base>/multirun/<date>/<time>/<job>/."""
    sweep = tmp_path_factory.getbasetemp() / "trained_runs" / SWEEP
    from geneformer_colon.jobs.train import train

    runs = [sweep / job for job in JOBS]
    for run_dir, overrides in zip(runs, JOBS.values()):
        train(compose_train(tiny_overrides(sweep / "outputs", shared_dirs) + [
            "experiment=colon6", "logger=csv", "trainer.max_epochs=2", f"paths.run_dir='{run_dir}'", *overrides]))
    return runs
