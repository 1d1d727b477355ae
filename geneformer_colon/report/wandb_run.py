"""A run's Weights & Biases side: the logger, the flat config, the end-of-run report, finishing.

W&B is offline unless ``WANDB_MODE`` (or ``logger.wandb.mode``) says otherwise, so no API key
or network is needed: the run's files go to ``<run_dir>/wandb/offline-run-*`` for a later
``wandb sync``. The W&B run id is kept in ``<run_dir>/wandb/run_id`` so that ``resume=true``
continues the same W&B run.
"""

from __future__ import annotations

import contextlib
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from geneformer_colon.config import flatten
from geneformer_colon.io import atomic_path
from geneformer_colon.names import EVAL_SPLITS, logged, per_class
from geneformer_colon.rundir import RunLayout

# Config groups left out of the logged config: where things are, not how the run was made.
UNLOGGED_GROUPS = ("paths", "logger")


def sweep_id() -> str | None:
    """In a Hydra multirun, the sweep's ``<date>/<time>`` (the last two parts of its directory)."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return "/".join(Path(HydraConfig.get().sweep.dir).parts[-2:])


def option_tags() -> list[str]:
    """The data and model options chosen on the command line (known only inside a Hydra app)."""
    if not HydraConfig.initialized():
        return []
    choices = HydraConfig.get().runtime.choices
    return [choices[group] for group in ("data", "model") if choices.get(group)]


def swept_keys() -> set[str]:
    """The keys a sweep varies: ``key=a,b`` on its command line (``sys.orig_argv``, as typed) and
    ``hydra.sweeper.params`` (a sweep preset, Optuna)."""
    parser = OverridesParser.create()
    typed = [argument for argument in sys.orig_argv if "=" in argument and not argument.startswith("-")]
    keys = set()
    for argument in typed:
        try:
            override = parser.parse_override(argument)
        except HydraException:
            continue
        if override.is_sweep_override():
            keys.add(override.key_or_group)
    return keys | {key.lstrip("+~") for key in (HydraConfig.get().sweeper.get("params") or {})}


def sweep_job_name(name: str) -> str:
    """In a multirun, ``<name> #<job>: <the values it sweeps>`` so the jobs of a sweep are told apart."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return name
    hydra_cfg = HydraConfig.get()
    keys = swept_keys()
    swept = [override for override in hydra_cfg.overrides.task if override.split("=", 1)[0].lstrip("+~") in keys]
    return f"{name} #{hydra_cfg.job.num}" + (f": {' '.join(swept)}" if swept else "")


def run_id(run_dir: Path, resume: bool) -> str:
    """The W&B run id of this run directory: the kept one on ``resume=true``, else a new one (kept)."""
    path = RunLayout(run_dir).wandb_run_id
    if resume and path.is_file():
        return path.read_text().strip()
    new_id = uuid.uuid4().hex[:12]
    if rank_zero_only.rank == 0:
        with atomic_path(path) as tmp:
            tmp.write_text(new_id)
    return new_id


def wandb_logger(
    save_dir: str,
    name: str,
    experiment_name: str,
    resume: bool = False,
    group: str | None = None,
    tags: Sequence[str] = (),
    **init_kwargs: Any,
) -> WandbLogger:
    """A WandbLogger writing under ``save_dir``; ``init_kwargs`` go to ``wandb.init`` (mode, project, ...).

    ``name`` gets the job's number and overrides in a sweep; ``group`` defaults to the sweep's id
    in a multirun, else the experiment; the tags are the experiment, the data and model options,
    then ``tags``. W&B's console output is kept to errors (the run's own summary says where it is).
    """
    import wandb

    all_tags = dict.fromkeys([experiment_name, *option_tags(), *tags])
    logger = WandbLogger(
        save_dir=save_dir,
        name=sweep_job_name(name),
        id=run_id(Path(save_dir), resume),
        group=group or sweep_id() or experiment_name,
        tags=list(all_tags),
        settings=wandb.Settings(quiet=True, silent=True),
        **init_kwargs,
    )
    logger._wandb_init.pop("anonymous", None)  # Lightning passes a setting W&B warns is ignored
    return logger


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as ``{"loss.focal_gamma": 1.5, ...}``, so W&B's run table filters by each key.

    Hydra's own keys (``_target_``, ``_convert_``) and the ``paths`` and ``logger`` groups are left out.
    """
    container = OmegaConf.to_container(cfg, resolve=True)
    settings = flatten({key: value for key, value in container.items() if key not in UNLOGGED_GROUPS})
    return {key: value for key, value in settings.items() if not _is_hydra_key(key.rsplit(".", 1)[-1])}


def _is_hydra_key(name: str) -> bool:
    """_target_, _convert_, ...: Hydra's instructions, not settings."""
    return name.startswith("_") and name.endswith("_")


def summary_values(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The final metrics as flat W&B summary entries: ``val/macro_f1``, ``best_epoch``, ``success``..."""
    values: dict[str, Any] = {"best_epoch": summary["best_epoch"]}
    for split in EVAL_SPLITS:
        metrics = summary[split]
        values.update({logged(split, name): value for name, value in flatten(metrics).items()
                       if not name.startswith("confusion_matrix")})
    verdicts = summary["success"]
    values.update({f"success/{key}": "PASS" if verdict["passed"] else "FAIL" for key, verdict in verdicts.items()})
    if verdicts:
        values["success"] = "PASS" if all(verdict["passed"] for verdict in verdicts.values()) else "FAIL"
    return values


def per_class_rows(summary: Mapping[str, Any], class_names: Sequence[str]) -> list[list[Any]]:
    """One row per split and class: precision, recall, F1 and the number of cells of that class."""
    rows = []
    for split in EVAL_SPLITS:
        metrics = summary[split]
        cells = np.asarray(metrics["confusion_matrix"]).sum(axis=1)
        for index, name in enumerate(class_names):
            rows.append([split, name, metrics[per_class("precision", name)], metrics[per_class("recall", name)],
                         metrics[f"f1/{name}"], int(cells[index])])
    return rows


def confusion_chart(matrix: Sequence[Sequence[int]], class_names: Sequence[str], title: str) -> Any:
    """W&B's interactive confusion matrix, from counts (rows true, columns predicted)."""
    import wandb

    counts = np.asarray(matrix, dtype=int)
    true, predicted = np.indices(counts.shape).reshape(2, -1)
    return wandb.plot.confusion_matrix(
        y_true=np.repeat(true, counts.ravel()).tolist(),
        preds=np.repeat(predicted, counts.ravel()).tolist(),
        class_names=list(class_names),
        title=title,
    )


@rank_zero_only
def report_run(loggers: Sequence[Logger], summary: Mapping[str, Any], class_names: Sequence[str],
               layout: RunLayout) -> None:
    """Into each W&B logger's run: confusion matrices, the per-class table, the final metrics as summary."""
    import wandb

    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        media: dict[str, Any] = {
            "per_class": wandb.Table(columns=["split", "class", "precision", "recall", "f1", "cells"],
                                     data=per_class_rows(summary, class_names)),
        }
        for split in EVAL_SPLITS:
            title = f"{summary['run_name']} {split}"
            media[f"confusion/{split}"] = confusion_chart(summary[split]["confusion_matrix"], class_names, title)
            media[f"confusion_plot/{split}"] = wandb.Image(str(layout.confusion_plot(split)))
        logger.experiment.log(media)
        logger.experiment.summary.update(summary_values(summary))


def _active_run() -> Any:
    # No W&B run can exist where wandb was never imported (e.g. logger=csv): don't import it.
    wandb = sys.modules.get("wandb")
    return None if wandb is None else wandb.run


def _finish_new_run(outer: Any, exit_code: int) -> None:
    run = _active_run()
    if run is not None and run is not outer:
        run.finish(exit_code=exit_code)


@contextlib.contextmanager
def finishing_wandb_run() -> Iterator[None]:
    """Finish the W&B run started in the block: exit code 0, or non-zero when the block raises.

    A run left open would swallow the next run of this process (the next sweep job):
    WandbLogger logs into any active W&B run instead of starting its own.
    """
    outer = _active_run()
    try:
        yield
    except BaseException as error:
        code = error.code if isinstance(error, SystemExit) and isinstance(error.code, int) else 1
        _finish_new_run(outer, code)
        raise
    _finish_new_run(outer, 0)
