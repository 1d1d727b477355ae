"""A run's Weights & Biases side: the logger, names and groups, the flat config, the epoch axis, the
end-of-run summary, a CV run's own W&B run, failed and refused jobs, finishing.

One W&B run a recipe: a training run (job type ``train``), a CV run (``cv``, its folds ``fold`` in a
group of their own), a pretraining (``pretrain``), a baseline (``baseline``); an Optuna study's runs in the
group ``optuna/<study>``. Its config is the flat recipe with the option chosen in each config group
(``choices.<group>``, also a tag). Curves run by epoch, counted from 1, and end with the last epoch;
whatever is computed after training goes to the summary, flat (plots as images, the test predictions as a
table). Every run is finished, failed with its error line when it fails, and a sweep job refused before it
started still gets a failed run. W&B is offline unless ``WANDB_MODE`` (or ``logger.wandb.mode``) says otherwise, so
no API key or network is needed: the run's files go to ``<run_dir>/wandb/offline-run-*`` for a later
``wandb sync``. The W&B run id is kept in ``<run_dir>/wandb/run_id`` so that ``resume=true``
continues the same W&B run.
"""

from __future__ import annotations

import functools
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from geneformer_colon.common.errors import Interrupted, input_error_in
from geneformer_colon.common.io import atomic_path
from geneformer_colon.common.names import EVAL_SPLITS, METRICS, TEST, TRAIN, VAL, logged, per_class
from geneformer_colon.report.cv_summary import seed_sd
from geneformer_colon.runs.config import CONF_DIR, flatten, is_location_key
from geneformer_colon.runs.layout import RunLayout
from geneformer_colon.runs.reading import read_run

# Config groups that are no choice of a recipe: Hydra's own, where things are, the loggers (a run in W&B has its
# logger) and debug (whose runs log to CSV only).
NOT_RECIPE_GROUPS = ("hydra", "paths", "logger", "debug")
# Names W&B gives files of its own in a run's files folder (its config dump, summary, metadata, console log, ...): a
# run's own file of such a name is kept as ``run_<name>`` (``config.yaml`` as ``run_config.yaml``), else W&B's would
# replace it as the run is uploaded.
WANDB_FILE_NAMES = ("config.yaml", "wandb-summary.json", "wandb-metadata.json", "output.log", "requirements.txt",
                    "diff.patch", "conda-environment.yaml")
# What a CV run's folds each set for themselves: its config names the folds instead (:func:`cv_config`).
FOLD_KEYS = ("data.val_donors", "data.test_donors", "seed")


def sweep_id(sweep_dir: Path) -> str:
    """A sweep's ``<date>/<time>`` (the last two parts of its directory)."""
    return "/".join(Path(sweep_dir).parts[-2:])


def sweep_group(experiment_name: str, sweep_dir: Path) -> str:
    """A sweep's W&B group: ``<experiment>/<sweep date-time>``."""
    return f"{experiment_name}/{sweep_id(sweep_dir)}"


def study_group(study: str) -> str:
    """An Optuna study's W&B group, ``optuna/<study>``: no run's name (a run name is a folder of outputs/)."""
    return f"optuna/{study}"


def default_group(experiment_name: str, study: str | None = None) -> str:
    """An Optuna ``study``'s group (:func:`study_group`); :func:`sweep_group` in another multirun; else the
    experiment's name."""
    if study:
        return study_group(study)
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return experiment_name
    return sweep_group(experiment_name, HydraConfig.get().sweep.dir)


def config_choices(cfg: DictConfig) -> dict[str, str | None]:
    """The option chosen in each config group the run used (``{"robust": "coral", "sweep": None, ...}``): Hydra's
    record of the job inside a Hydra app, else (a config composed with Hydra's compose API) the options whose
    settings the config holds (:func:`inferred_choices`)."""
    choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else inferred_choices(cfg)
    return {group: option for group, option in choices.items()
            if group.split("/")[0] not in NOT_RECIPE_GROUPS and used_group(cfg, group)}


def choice_tags(choices: Mapping[str, str | None]) -> list[str]:
    """``<group>=<option>`` for each group with an option chosen (``robust=coral``)."""
    return [f"{group}={option}" for group, option in choices.items() if option is not None]


@functools.cache
def group_options() -> dict[str, dict[str, dict[str, Any]]]:
    """Each config group of ``conf/`` (its folder) to its options (files) to the flat keys each sets to a value
    of its own (interpolations, ``???``, Hydra's settings and the defaults list left out)."""
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for folder in sorted(path for path in CONF_DIR.iterdir() if path.is_dir() and path.name not in NOT_RECIPE_GROUPS):
        for path in sorted(folder.glob("*.yaml")):
            text = path.read_text()
            content = OmegaConf.to_container(OmegaConf.create(text), resolve=False) or {}
            content.pop("defaults", None)
            tree = content if "@package _global_" in text else {folder.name: content}
            groups.setdefault(folder.name, {})[path.stem] = {
                key: value for key, value in flatten(tree).items()
                if not key.startswith("hydra.") and not (isinstance(value, str) and ("${" in value or value == "???"))}
    return groups


@functools.cache
def optional_groups() -> frozenset[str]:
    """The groups train.yaml chooses no option of by default (``experiment: null``, ``sweep: null``)."""
    defaults = OmegaConf.load(CONF_DIR / "train.yaml").defaults
    return frozenset(group for entry in defaults if isinstance(entry, DictConfig)
                     for group, option in entry.items() if option is None)


def inferred_choices(cfg: DictConfig) -> dict[str, str | None]:
    """The options a composed config holds, for a config composed without Hydra's record of its choices: in each
    group, the option that agrees with the config in the largest share of the values it sets (those of a node the
    config dropped aside: a baseline's; a group with no default, e.g. ``experiment``: in more than half); None
    where no option, or two alike, fits."""
    flat = _flat(cfg)
    chosen: dict[str, str | None] = {}
    for group, options in group_options().items():
        scores = {}
        for option, keys in options.items():
            kept = [key for key in keys if key.split(".")[0] in cfg]
            if kept:
                scores[option] = sum(key in flat and flat[key] == keys[key] for key in kept) / len(kept)
        best = max(scores.values(), default=0)
        winners = [option for option, score in scores.items() if score == best]
        fits = len(winners) == 1 and best > (0.5 if group in optional_groups() else 0)
        chosen[group] = winners[0] if fits else None
    return chosen


def used_group(cfg: DictConfig, group: str) -> bool:
    """Whether the run used ``group``: a group whose every option sets the config node of its name counts where
    the config holds that node (a baseline drops the network's: ``jobs.baseline.baseline_config``; of the model
    it keeps the tokenizer alone, so ``model`` counts with an encoder only)."""
    options = group_options().get(group, {})
    if not options or not all(any(key.split(".")[0] == group for key in keys) for keys in options.values()):
        return True
    node = cfg.get(group)
    return node is not None and (group != "model" or "encoder" in node)


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


def short_value(value: str) -> str:
    """A swept value as a name shows it: numbers to 3 significant digits (Optuna draws 17)."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if number.is_integer() and "e" not in value.lower() and "." not in value else f"{number:.3g}"


def short_overrides(overrides: Sequence[str], keys: set[str]) -> list[str]:
    """The overrides of ``keys`` as ``<last part of the key>=<short value>`` (the whole key where the
    last parts of two keys are the same)."""
    chosen = [o.split("=", 1) for o in overrides if o.split("=", 1)[0].lstrip("+~") in keys]
    last_parts = [key.lstrip("+~").rsplit(".", 1)[-1] for key, _ in chosen]
    return [f"{part if last_parts.count(part) == 1 else key.lstrip('+~')}={short_value(value)}"
            for part, (key, value) in zip(last_parts, chosen)]


def sweep_job_name(name: str, study: str | None = None) -> str:
    """In a multirun, ``<name> #<job>: <the values it sweeps>`` so the jobs of a sweep are told apart; in an
    Optuna ``study``, ``<name> trial <number>: <values>`` (the job's number is its trial's)."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return name
    hydra_cfg = HydraConfig.get()
    swept = short_overrides(hydra_cfg.overrides.task, swept_keys())
    number = f"trial {hydra_cfg.job.num}" if study else f"#{hydra_cfg.job.num}"
    return f"{name} {number}" + (f": {' '.join(swept)}" if swept else "")


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


class EpochWandbLogger(WandbLogger):
    """A WandbLogger whose ``epoch`` counts from 1, as every epoch a user reads does (Lightning's from 0); the
    prediction table's row cap rides along (``table_rows``)."""

    table_rows: int = 0

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if "epoch" in metrics:
            metrics = {**metrics, "epoch": int(metrics["epoch"]) + 1}
        super().log_metrics(metrics, step)


def wandb_logger(
    save_dir: str,
    name: str,
    experiment_name: str,
    job_type: str | None = None,
    resume: bool = False,
    group: str | None = None,
    study: str | None = None,
    tags: Sequence[str] = (),
    log_model: str | bool | None = None,
    table_rows: int = 1000,
    **init_kwargs: Any,
) -> EpochWandbLogger:
    """A WandbLogger writing under ``save_dir``; ``init_kwargs`` go to ``wandb.init`` (mode, project, ...).

    ``job_type``: train, fold, cv, pretrain, eval, baseline or sweep (null: the kind of run, set as it
    starts: :func:`describe_logger_runs`). A fold's ``name`` and ``group`` are its CV run's choice
    (``donor_cv.fold_config``) and a sweep run's its sweep's (:func:`report_sweep_run`), and are kept;
    any other run's ``name`` gets the job's (trial's) number and swept values in a sweep, and ``group``
    defaults to :func:`default_group` (``study``: the Optuna study of a trial).
    The tags are the experiment and ``tags`` (the options chosen join them as the run starts:
    :func:`describe_run`). ``resume``: the run directory's W&B run goes on under its id (Lightning starts every
    run with ``resume="allow"``, recorded in each offline part: ``wandb sync`` of the parts joins them, oldest
    first). ``log_model``: ``best``
    uploads the best checkpoint as a model artifact at the end of training, ``false`` does not,
    null: ``best`` when online. ``table_rows``: the most rows of the test predictions' table. W&B's console
    output is kept to errors.
    """
    import wandb

    if job_type not in ("fold", "sweep"):
        name, group = sweep_job_name(name, study), group or default_group(experiment_name, study)
    if log_model is None:
        log_model = "best" if init_kwargs.get("mode") == "online" else False
    if job_type:
        init_kwargs["job_type"] = job_type
    logger = EpochWandbLogger(
        save_dir=save_dir,
        name=name,
        id=run_id(Path(save_dir), resume),
        group=group,
        tags=list(dict.fromkeys([experiment_name, *tags])),
        log_model=log_model == "best",
        settings=wandb.Settings(quiet=True, silent=True),
        **init_kwargs,
    )
    logger._wandb_init.pop("anonymous", None)  # Lightning passes a setting W&B warns is ignored
    logger.table_rows = table_rows
    return logger


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as ``{"loss.focal_gamma": 1.5, ...}``, so W&B's run table filters by each key.

    ``_target_`` stays (``robust._target_``: the class that implements the option); Hydra's other instructions
    (``_convert_``, ...) and where things are (``paths``, ``logger``, any directory, ``resume``:
    :func:`config.is_location_key`) are left out: those go to the run's notes.
    """
    return {key: value for key, value in _flat(cfg).items()
            if not is_location_key(key) and (key.endswith("_target_") or not _is_hydra_key(key.rsplit(".", 1)[-1]))}


def wandb_config(cfg: DictConfig) -> dict[str, Any]:
    """What a run's W&B config holds: :func:`flat_config` and the option chosen in each group it used
    (``choices.robust: coral``, ``choices.sweep: None``)."""
    return {**flat_config(cfg), **{f"choices.{group}": option for group, option in config_choices(cfg).items()}}


def location_notes(cfg: DictConfig) -> str:
    """Where the run is (its directories, data, cache, ...), one ``key: value`` a line: the run's notes."""
    return "\n".join(f"{key}: {value}" for key, value in _flat(cfg).items()
                     if is_location_key(key) and not key.startswith("logger.") and value not in (None, "", []))


def _flat(cfg: DictConfig) -> dict[str, Any]:
    return flatten(OmegaConf.to_container(cfg, resolve=True))


def _is_hydra_key(name: str) -> bool:
    """_target_, _convert_, ...: Hydra's instructions, not settings."""
    return name.startswith("_") and name.endswith("_")


def splits_of(summary: Mapping[str, Any]) -> list[str]:
    """The evaluated splits a metrics.json record holds (an evaluation's: test only)."""
    return [split for split in EVAL_SPLITS if split in summary]


def summary_values(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The final metrics as flat W&B summary entries, ``/`` between the parts of every key: ``val/macro_f1``,
    ``test/by_cell_type/B cells/macro_f1``, ``best_epoch``, ``success``..."""
    values: dict[str, Any] = {"best_epoch": summary["best_epoch"]}
    for split in splits_of(summary):
        metrics = summary[split]
        values.update({logged(split, name): value for name, value in flatten(metrics, separator="/").items()
                       if not name.startswith("confusion_matrix")})
    verdicts = summary["success"]
    values.update({f"success/{key}": "PASS" if verdict["passed"] else "FAIL" for key, verdict in verdicts.items()})
    if verdicts:
        values["success"] = "PASS" if all(verdict["passed"] for verdict in verdicts.values()) else "FAIL"
    return values


def per_class_rows(summary: Mapping[str, Any], class_names: Sequence[str]) -> list[list[Any]]:
    """One row per split and class: precision, recall, F1 and the number of cells of that class."""
    rows = []
    for split in splits_of(summary):
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


def wandb_loggers(loggers: Sequence[Logger]) -> list[WandbLogger]:
    return [logger for logger in loggers if isinstance(logger, WandbLogger)]


def epoch_metrics(job_type: str, class_names: Sequence[str]) -> list[str]:
    """The figures a run logs once an epoch (a classifier's, or pretraining's masked-gene ones)."""
    if job_type == "pretrain":
        return [logged(VAL, "masked_loss"), logged(VAL, "masked_accuracy"), logged(TRAIN, "masked_loss_epoch")]
    classes = [per_class(name, label) for name in ("precision", "recall", "f1") for label in class_names]
    return [logged(VAL, name) for name in (*METRICS, "loss", *classes)] + [logged(TRAIN, "loss_epoch")]


def define_epoch_metrics(run: Any, names: Sequence[str]) -> None:
    """Each epoch-level figure plotted against ``epoch``. Its summary is W&B's default, the last value, flat (a
    declared ``min``/``max`` would nest it as ``{"max": ...}``); the best epoch's replaces it as the run ends.

    By name: Lightning declares every key (``*``) to step with its global step, and of two globs that
    match a key W&B may apply either; a definition by name comes first.
    """
    run.define_metric("epoch")
    for name in names:
        run.define_metric(name, step_metric="epoch")


def keep_files(run: Any, paths: Iterable[Path], root: Path) -> None:
    """Each of ``paths`` that exists as a file of the W&B run, at its place under ``root``: a copy in the run's
    files folder, which W&B uploads as the run ends (``wandb sync`` for an offline run). A copy, not
    ``run.save``: that links the file and prints a warning to the console for each file. A name W&B gives a file
    of its own (:data:`WANDB_FILE_NAMES`) is kept as ``run_<name>``: ``config.yaml`` as ``run_config.yaml``."""
    if run.disabled:  # WANDB_MODE=disabled: its folder is a temporary one nobody syncs
        return
    for path in paths:
        if path.is_file():
            relative = path.relative_to(root)
            target = Path(run.dir) / (f"run_{relative}" if str(relative) in WANDB_FILE_NAMES else relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def describe_run(run: Any, cfg: DictConfig, layout: RunLayout, config: Mapping[str, Any] | None = None) -> None:
    """A W&B run's config (``config``, else :func:`wandb_config`), the options chosen as tags, its locations as
    notes and its ``config.yaml`` as the file ``run_config.yaml``."""
    run.config.update(dict(wandb_config(cfg) if config is None else config), allow_val_change=True)
    run.tags = tuple(dict.fromkeys([*(run.tags or ()), *choice_tags(config_choices(cfg))]))
    run.notes = location_notes(cfg)
    keep_files(run, [layout.config], layout.root)


@rank_zero_only
def describe_logger_runs(loggers: Sequence[Logger], cfg: DictConfig, layout: RunLayout, job_type: str) -> None:
    """Each W&B logger's run as it starts: ``job_type`` (unless the config sets one: a fold), the
    description, and its epoch-level figures declared."""
    for logger in wandb_loggers(loggers):
        if not logger._wandb_init.get("job_type"):  # read when the run starts, just below
            logger._wandb_init["job_type"] = job_type
        describe_run(logger.experiment, cfg, layout)
        define_epoch_metrics(logger.experiment, epoch_metrics(job_type, cfg.data.get("labels") or []))


def open_wandb_run(cfg: DictConfig, layout: RunLayout, job_type: str, config: Mapping[str, Any] | None = None,
                   **overrides: Any) -> EpochWandbLogger | None:
    """The logger of a W&B run of ``cfg.logger.wandb`` started outside training (a CV run, a baseline, a refused
    job), its run described (``config``: :func:`describe_run`); ``job_type`` unless the config sets one (a
    fold's); None where the config logs no W&B."""
    wandb_cfg = cfg.get("logger", {}).get("wandb")
    if wandb_cfg is None:
        return None
    logger = instantiate(wandb_cfg, job_type=wandb_cfg.get("job_type") or job_type, **overrides)
    describe_run(logger.experiment, cfg, layout, config)
    return logger


def put_chart(run: Any, key: str, chart: Any) -> None:
    """A W&B custom chart into the summary: its table, and its spec in the config (as ``run.log`` does
    with a chart, without adding a history step)."""
    chart.set_key(key)
    run._config_callback(key=chart.spec.config_key, val=chart.spec.config_value)
    run.summary[chart.spec.table_key] = chart.table


@rank_zero_only
def report_run(loggers: Sequence[Logger], summary: Mapping[str, Any], class_names: Sequence[str],
               layout: RunLayout) -> None:
    """Into each W&B logger's run's summary, not its history (the curves end with the last epoch):
    :func:`report_final`."""
    for logger in wandb_loggers(loggers):
        report_final(logger.experiment, summary, class_names, layout, getattr(logger, "table_rows", 0))


def report_final(run: Any, summary: Mapping[str, Any], class_names: Sequence[str], layout: RunLayout,
                 table_rows: int) -> None:
    """The final metrics, the per-class table, the confusion charts, the plots and the first ``table_rows``
    rows of the test predictions into ``run``'s summary."""
    import wandb

    run.summary["per_class"] = wandb.Table(columns=["split", "class", "precision", "recall", "f1", "cells"],
                                           data=per_class_rows(summary, class_names))
    for split in splits_of(summary):
        title = f"{summary['run_name']} {split}"
        put_chart(run, f"confusion/{split}", confusion_chart(summary[split]["confusion_matrix"], class_names, title))
    put_plots(run, layout)
    predictions = layout.prediction_file(TEST)
    if table_rows and predictions.is_file():
        run.summary[f"predictions/{TEST}"] = prediction_table(predictions, table_rows)
    run.summary.update(summary_values(summary))


def put_plots(run: Any, layout: RunLayout) -> None:
    """Every ``plots/*.png`` of the run (loss, ROC, PR, confusion; a CV run's per donor) into its summary as
    the image ``plots/<name>``."""
    import wandb

    for path in sorted(layout.plots.glob("*.png")):
        run.summary[f"plots/{path.stem}"] = wandb.Image(str(path))


def prediction_table(path: Path, rows: int) -> Any:
    """The first ``rows`` rows of a predictions CSV as a W&B table (its columns as they are)."""
    import wandb

    table = pd.read_csv(path, nrows=rows, keep_default_na=False)
    return wandb.Table(dataframe=table.astype(object))


def log_finished_run(cfg: DictConfig, layout: RunLayout, job_type: str, record: Mapping[str, Any],
                     class_names: Sequence[str], **overrides: Any) -> None:
    """A run made without a Lightning logger (a baseline, an evaluation) as a W&B run of its own, once
    it is written: its config, and its metrics.json ``record`` as summary, as a training run's."""
    logger = open_wandb_run(cfg, layout, job_type, **overrides)
    if logger is not None:
        report_final(logger.experiment, record, class_names, layout, logger.table_rows)
        finish(logger.experiment)


def cv_summary_values(cv: Mapping[str, Any]) -> dict[str, Any]:
    """A CV run's summary from its cv.json: for each figure its mean (``val/macro_f1``), ``/sd``,
    ``/ci95_low``, ``/ci95_high``, ``/worst`` and ``/worst_donor``; the test macro F1 of each donor
    (``test/macro_f1/<donor>``, a mean over its folds where it has several) and, with ``cv.seeds``, the
    standard deviation of its seeds (``test/macro_f1/<donor>/seed_sd``)."""
    folds = cv["folds"]
    values: dict[str, Any] = {"folds": len(folds), "cv_status": cv["status"], "seeds": len(cv.get("seeds") or []) or 1}
    for split, figures in cv["aggregate"].items():
        for key, spread in figures.items():
            name = logged(split, key)
            values[name] = spread["mean"]
            values[f"{name}/sd"] = spread["sd"]
            if spread["ci95"] is not None:
                values[f"{name}/ci95_low"], values[f"{name}/ci95_high"] = spread["ci95"]
            scored = [fold for fold in folds if fold[split].get(key) is not None]
            if scored:
                worst = min(scored, key=lambda fold: fold[split][key])
                values[f"{name}/worst"], values[f"{name}/worst_donor"] = worst[split][key], worst["test_donor"]
    for donor in dict.fromkeys(fold["test_donor"] for fold in folds):
        scores = [fold[TEST]["macro_f1"] for fold in folds if fold["test_donor"] == donor]
        values[f"{logged(TEST, 'macro_f1')}/{donor}"] = float(np.mean(scores))
    for fold in folds:
        if (sd := seed_sd(fold)) is not None:
            values[f"{logged(TEST, 'macro_f1')}/{fold['test_donor']}/seed_sd"] = sd
    return values


def fold_runs(cv: Mapping[str, Any], seed: int) -> list[tuple[Mapping[str, Any], int, Mapping[str, Any]]]:
    """Each fold and seed of a CV run's cv.json: the fold's row, the seed (``seed``, the run's, where its folds
    ran once) and the row of that seed's own run (``run_dir`` relative to ``folds/``, final figures)."""
    return [(fold, run.get("seed", seed), run) for fold in cv["folds"] for run in (fold.get("seeds") or [fold])]


def cv_seeds(cfg: DictConfig, cv: Mapping[str, Any]) -> list[int]:
    """The seeds a CV run's folds ran with: ``cv.seeds`` (one seed: that one), else the config's ``seed``."""
    return list(cv.get("seeds") or cfg.cv.get("seeds") or [cfg.seed])


def cv_config(cfg: DictConfig, cv: Mapping[str, Any]) -> dict[str, Any]:
    """A CV run's W&B config: what it ran instead of what each fold set for itself (:data:`FOLD_KEYS`): its
    test donors ``cv.folds``, each fold's donors (``cv.fold.<test donor>.val_donors``, ``...test_donors``) and
    the seeds ``cv.seeds``."""
    folds = cv.get("folds") or []
    config = {key: value for key, value in wandb_config(cfg).items() if key not in FOLD_KEYS}
    config.update({"cv.folds": [fold["test_donor"] for fold in folds],
                   "cv.seeds": cv_seeds(cfg, cv)})
    for fold in folds:
        config[f"cv.fold.{fold['test_donor']}.val_donors"] = fold["val_donor"].split(", ")
        config[f"cv.fold.{fold['test_donor']}.test_donors"] = fold["test_donor"].split(", ")
    return config


def fold_table(cv: Mapping[str, Any], seed: int) -> Any:
    """A row a fold and seed: its donors, seed, run directory, best epoch and final figures."""
    import wandb

    columns = ["test_donor", "val_donor", "seed", "run_dir", "best_epoch",
               *(logged(split, metric) for split in EVAL_SPLITS for metric in METRICS)]
    rows = [[fold["test_donor"], fold["val_donor"], seed, run["run_dir"], run["best_epoch"],
             *(run[split].get(metric) for split in EVAL_SPLITS for metric in METRICS)]
            for fold, seed, run in fold_runs(cv, seed)]
    return wandb.Table(columns=columns, data=rows)


def pooled_confusion(parent: RunLayout, cv: Mapping[str, Any], seed: int) -> np.ndarray:
    """The sum of the test confusion matrices of every fold and seed (their metrics.json)."""
    matrices = [read_run(parent.folds / run["run_dir"]).metrics[TEST]["confusion_matrix"]
                for _, _, run in fold_runs(cv, seed)]
    return np.sum(np.asarray(matrices, dtype=int), axis=0)


def pooled_values(matrix: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """The test figures of a pooled confusion matrix (rows true, columns predicted): ``test/pooled/accuracy``,
    ``.../macro_f1`` and each class's ``precision``, ``recall`` and ``f1``."""
    hits = np.diag(matrix).astype(float)
    precision = hits / np.maximum(matrix.sum(axis=0), 1)
    recall = hits / np.maximum(matrix.sum(axis=1), 1)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    values = {"accuracy": float(hits.sum() / max(matrix.sum(), 1)), "macro_f1": float(f1.mean())}
    for name, figures in (("precision", precision), ("recall", recall), ("f1", f1)):
        values.update({per_class(name, label): float(value) for label, value in zip(class_names, figures)})
    return {logged(TEST, f"pooled/{key}"): value for key, value in values.items()}


def report_cv_run(cfg: DictConfig, parent: RunLayout, cv: Mapping[str, Any], error: BaseException | None) -> None:
    """The CV run's own W&B run (job type ``cv``), made as its folds end (they are runs of their own:
    one W&B run is open at a time): its config (what it ran: :func:`cv_config`), a table of its folds and
    seeds, the aggregate of ``cv`` (cv.json) and the test figures pooled over its folds and seeds (their
    confusion matrices summed; the matrix as a chart) as summary, its plots, cv.json and cv.md as files; failed
    with the error line when ``error``."""
    logger = open_wandb_run(cfg, parent, "cv", cv_config(cfg, cv), resume=bool(cfg.resume))
    if logger is None:
        return
    run = logger.experiment
    if cv.get("folds"):
        seed = cv_seeds(cfg, cv)[0]
        class_names = read_run(parent.folds / fold_runs(cv, seed)[0][2]["run_dir"]).class_names
        matrix = pooled_confusion(parent, cv, seed)
        run.summary["fold_table"] = fold_table(cv, seed)
        put_chart(run, "confusion/test_pooled",
                  confusion_chart(matrix.tolist(), class_names, f"{cfg.run_name} test, pooled over folds"))
        run.summary["confusion_matrix/test_pooled"] = matrix.tolist()
        run.summary.update({**cv_summary_values(cv), **pooled_values(matrix, class_names)})
    put_plots(run, parent)
    keep_files(run, [parent.cv_json, parent.cv_markdown], parent.root)
    finish(run, error)


@rank_zero_only
def report_sweep_run(cfg: DictConfig, sweep_dir: Path, table: pd.DataFrame, figures: Mapping[str, Any],
                     files: Sequence[Path], study: str | None = None) -> None:
    """A sweep's own W&B run (job type ``sweep``), made as the sweep ends, in the group of its jobs (an Optuna
    ``study``'s name, as its trials': the sweep's config does not hold a trial's ``sweep.study``): the
    command line as config, its summary ``table`` as a W&B table, ``figures`` as summary, ``files``
    (summary.csv, summary.md; an Optuna study's study.json) as files of the run. Each invocation of an
    Optuna study has a sweep directory, so a run, of its own."""
    import wandb

    wandb_cfg = cfg.get("logger", {}).get("wandb")
    if wandb_cfg is None:
        return
    group = wandb_cfg.get("group") or (study_group(study) if study else sweep_group(cfg.experiment_name, sweep_dir))
    name = f"{group} sweep" + (f" {sweep_id(sweep_dir)}" if study else "")  # a grid's group names its date-time
    run = instantiate(wandb_cfg, save_dir=str(sweep_dir), name=name, group=group, job_type="sweep", resume=False,
                      log_model=False).experiment
    run.config.update({"sweep.overrides": list(cfg.hydra.overrides.task)})
    run.notes = f"sweep dir: {sweep_dir}"
    run.summary["jobs_table"] = wandb.Table(dataframe=jobs_table(table, sweep_dir))
    run.summary.update(dict(figures))
    keep_files(run, files, sweep_dir)
    finish(run)


def jobs_table(table: pd.DataFrame, sweep_dir: Path) -> pd.DataFrame:
    """A sweep's summary as its W&B run shows it: each job's W&B run id (``wandb_run_id``, null where it made
    none) and its run directory relative to the sweep's (where it lies under it)."""
    run_dirs = [Path(path) for path in table["run_dir"]]
    ids = [RunLayout(path).wandb_run_id for path in run_dirs]
    shown = table.assign(
        run_dir=[str(path.relative_to(sweep_dir) if path.is_relative_to(sweep_dir) else path) for path in run_dirs],
        wandb_run_id=[path.read_text().strip() if path.is_file() else None for path in ids])
    return shown.astype(object).where(shown.notna(), None)


def fold_group(cfg: DictConfig) -> str:
    """The W&B group of a CV run's folds, named after its job: ``<the CV run's group> #<job>`` in a
    sweep, else ``<run name> folds``."""
    wandb_cfg = cfg.get("logger", {}).get("wandb") or {}
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        group = wandb_cfg.get("group") or default_group(cfg.experiment_name, wandb_cfg.get("study"))
        return f"{group} #{HydraConfig.get().job.num}"
    return f"{cfg.run_name} folds"


def record_refused_job(cfg: DictConfig, error: BaseException) -> None:
    """A sweep job that failed before starting its W&B run (a value refused, a bad donor) still gets
    one, in its group: its config and the error line, state failed. Every job of a sweep shows."""
    layout = RunLayout(cfg.paths.run_dir)
    if layout.wandb_run_id.is_file():  # a W&B run was started, and finished, for this job
        return
    cv = cfg.get("cv", {}).get("strategy", "none") != "none"
    logger = open_wandb_run(cfg, layout, "cv" if cv else "baseline" if "baseline" in cfg else "train")
    if logger is not None:
        finish(logger.experiment, error)


def error_line(error: BaseException) -> str:
    """The line a failed run's summary shows as ``error``: an input error's own line, else type and message."""
    bad_input = input_error_in(error)
    return str(bad_input) if bad_input is not None else f"{type(error).__name__}: {error}".splitlines()[0]


def finish(run: Any, error: BaseException | None = None) -> None:
    """Finish a W&B run: exit code 0, or 1 with ``error``'s line as the summary's ``error``. A pause
    (SIGTERM, Ctrl-C) finishes with 0: resume=true goes on in the same run."""
    if error is None or isinstance(error, (Interrupted, KeyboardInterrupt)):
        run.finish(exit_code=0)
        return
    run.summary["error"] = error_line(error)
    run.finish(exit_code=1)


def _active_run() -> Any:
    # No W&B run can exist where wandb was never imported (e.g. logger=csv): don't import it.
    wandb = sys.modules.get("wandb")
    return None if wandb is None else wandb.run


Task = TypeVar("Task", bound=Callable[..., Any])


def finishing_wandb_run(task: Task) -> Task:
    """``task(cfg, ...)``, then finish the W&B run it started (:func:`finish`: failed with the error
    line when the task raises, finished otherwise and on a pause).

    A run left open would swallow the next run of this process (the next sweep job):
    WandbLogger logs into any active W&B run instead of starting its own.
    """

    @functools.wraps(task)
    def run_task(*args: Any, **kwargs: Any) -> Any:
        outer = _active_run()
        error = None
        try:
            return task(*args, **kwargs)
        except BaseException as raised:
            error = raised
            raise
        finally:
            run = _active_run()
            if run is not None and run is not outer:
                finish(run, error)

    return run_task  # type: ignore[return-value]
