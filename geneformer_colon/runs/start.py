"""Starting and resuming a run: nothing is written into its directory until its start is accepted
(:func:`accept_start`), so a refused start leaves every byte of an earlier run as it was; a resume goes on
from ``last.ckpt`` with the run's own recipe unless changes are allowed."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from pytorch_lightning.utilities import rank_zero_only

from geneformer_colon.common.console import open_run_log
from geneformer_colon.common.errors import InputError
from geneformer_colon.common.io import atomic_path, read_json, remove
from geneformer_colon.common.names import FINISHED
from geneformer_colon.runs.checkpoints import read_checkpoint
from geneformer_colon.runs.config import plain, recipe_changes
from geneformer_colon.runs.layout import RunLayout
from geneformer_colon.runs.reading import read_config

log = logging.getLogger(__name__)

# Keys a resumed run cannot change, even with allow_resume_changes=true: the restored state belongs to them.
FIXED_ON_RESUME = ("optimizer._target_", "scheduler._target_")


def save_config(layout: RunLayout, cfg: DictConfig) -> None:
    with atomic_path(layout.config) as tmp:
        tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))


# What must be written just before the next start is accepted (:func:`accepting_first`).
_BEFORE_ACCEPT: list[Callable[[], None]] = []


@contextlib.contextmanager
def accepting_first(accept: Callable[[], None]) -> Iterator[list[bool]]:
    """In the block, ``accept`` runs once, just before the first start accepted inside it (a CV run's parent is
    accepted with its first fold: a fold refused by its own checks leaves the parent as it was). Yields a list
    that holds True once ``accept`` ran."""
    accepted: list[bool] = []

    def once() -> None:
        accept()
        accepted.append(True)

    _BEFORE_ACCEPT.append(once)
    try:
        yield accepted
    finally:
        if once in _BEFORE_ACCEPT:
            _BEFORE_ACCEPT.remove(once)


def accept_start(layout: RunLayout, cfg: DictConfig) -> None:
    """The start is accepted (every check passed): the run's config.yaml and, in the directory Hydra
    runs the job in, Hydra's record of the job (``.hydra/``, which Hydra itself is told not to write
    before the checks) and its log file."""
    while _BEFORE_ACCEPT:  # taken off before it runs: its own accept_start finds it gone
        _BEFORE_ACCEPT.pop()()
    save_config(layout, cfg)
    if not HydraConfig.initialized() or Path(HydraConfig.get().runtime.output_dir).resolve() != layout.root.resolve():
        return
    hydra_cfg = HydraConfig.get()
    record = {"config.yaml": cfg, "hydra.yaml": OmegaConf.create({"hydra": hydra_cfg}),
              "overrides.yaml": hydra_cfg.overrides.task}
    for name, content in record.items():
        with atomic_path(layout.hydra / name) as tmp:
            tmp.write_text(OmegaConf.to_yaml(content))
    open_run_log()


def recipe() -> dict[str, Any]:
    """The command line as typed (overrides and config groups chosen), when running as a Hydra app."""
    if not HydraConfig.initialized():
        return {}
    hydra_cfg = HydraConfig.get()
    return {"overrides": list(hydra_cfg.overrides.task), "choices": {
        group: choice for group, choice in hydra_cfg.runtime.choices.items()
        if not group.startswith("hydra") and choice is not None}}


def prepare_run_dir(layout: RunLayout, overwrite: bool) -> None:
    """Refuse to mix two runs in one directory; clear what a start that failed before training left."""
    if rank_zero_only.rank != 0:  # a DDP rank: its rank 0 has checked (and maybe cleared) the directory
        return
    written = layout.written()
    if written and layout.holds_a_run() and not overwrite:
        raise InputError(
            f"{layout.root}: already holds a run ({', '.join(path.name for path in written)}); continue it with "
            "resume=true, replace it with overwrite=true, or pick another run_name=..."
        )
    if written and not layout.holds_a_run():
        log.info("%s: clearing what a start that failed before training left", layout.root)
    for path in written:
        remove(path)


def default_recipe() -> dict[str, Any]:
    """The config the running Hydra app composes with no override, each key at its default; empty outside a
    Hydra app."""
    if not (HydraConfig.initialized() and GlobalHydra.instance().is_initialized()):
        return {}
    try:
        return plain(compose(config_name=HydraConfig.get().job.config_name))
    except (HydraException, OmegaConfBaseException) as error:
        log.warning("the default config could not be composed (%s); a key a resumed run lacks counts as a change",
                    error)
        return {}


def allowed_changes(layout: RunLayout, cfg: DictConfig, ignore: tuple[str, ...] = ()) -> dict[str, tuple[str, str]]:
    """How ``cfg``'s recipe differs from the one the run directory's config.yaml records; refused unless
    ``allow_resume_changes=true``. A key added since the run started counts only where ``cfg`` sets it to
    another value than its default."""
    changes = recipe_changes(read_config(layout.config), plain(cfg), ignore, default_recipe())
    fixed = [key for key in changes if key in FIXED_ON_RESUME]
    if fixed:
        was, now = changes[fixed[0]]
        raise InputError(f"{layout.config}: {fixed[0]} cannot change on resume ({was} -> {now}): the checkpoint's "
                         f"state is {was}'s; go on with {fixed[0]}={was}, or start a new run (another run_name=..., "
                         "init_from=<this run> for its weights)")
    if changes and not cfg.allow_resume_changes:
        listed = "; ".join(f"{key}: {was} -> {now}" for key, (was, now) in changes.items())
        raise InputError(
            f"{layout.config}: another recipe than the run's ({listed}); go on with the run's own settings, or "
            "add allow_resume_changes=true to go on with the new ones (config.yaml then records both)"
        )
    return changes


def resume_point(layout: RunLayout, cfg: DictConfig) -> tuple[Path, dict[str, tuple[str, str]]]:
    """The checkpoint ``resume=true`` goes on from, and the recipe changes it was allowed to make. A finished run
    is only taken up with changes (more epochs, say) or ``overwrite=true``: with its own recipe there is nothing
    to do, and nothing is rewritten."""
    changes = allowed_changes(layout, cfg)
    if finished(layout) and not changes and not cfg.overwrite:
        raise InputError(f"{layout.root}: finished (metrics.json), and resume=true with its own recipe changes "
                         "nothing: train it longer with allow_resume_changes=true trainer.max_epochs=<more>, go on "
                         "anyway with overwrite=true, or pick another run_name=...")
    last = layout.checkpoint("last")
    if not last.is_file():
        raise InputError(f"{layout.root}: resume=true but there is no checkpoints/last.ckpt to continue from; "
                         "start it without resume=true")
    read_checkpoint(last, fix="it cannot be resumed from: restore the file from a copy, or train the run again "
                              "with overwrite=true")
    return last, changes


def finished(layout: RunLayout) -> bool:
    """Whether the run directory holds a finished run (its metrics.json says so)."""
    return read_json(layout.metrics).get("status") == FINISHED


def record_changes(cfg: DictConfig, layout: RunLayout, changes: dict[str, tuple[str, str]]) -> None:
    """On a resume allowed to change the recipe: config.yaml keeps each resume's changes (before, after)."""
    earlier = read_config(layout.config).get("resume_changes") or []
    with open_dict(cfg):
        cfg.resume_changes = [*earlier, {key: list(values) for key, values in changes.items()}] if changes else earlier

