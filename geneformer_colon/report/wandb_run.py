"""A run's Weights & Biases side: the logger, names and groups, the flat config, the epoch axis, the
end-of-run summary, a CV run's own W&B run, failed and refused jobs, finishing.

One W&B run a recipe: a training run (job type ``train``), a CV run (``cv``, its folds ``fold`` in a
group of their own), a pretraining (``pretrain``), a baseline (``baseline``). Curves run by epoch and
end with the last epoch; whatever is computed after training goes to the summary. Every run is
finished, failed with its error line when it fails, and a sweep job refused before it started still
gets a failed run. W&B is offline unless ``WANDB_MODE`` (or ``logger.wandb.mode``) says otherwise, so
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
from geneformer_colon.runs.config import flatten, is_location_key
from geneformer_colon.runs.layout import RunLayout


def sweep_id(sweep_dir: Path) -> str:
    """A sweep's ``<date>/<time>`` (the last two parts of its directory)."""
    return "/".join(Path(sweep_dir).parts[-2:])


def sweep_group(experiment_name: str, sweep_dir: Path) -> str:
    """A sweep's W&B group: ``<experiment>/<sweep date-time>``."""
    return f"{experiment_name}/{sweep_id(sweep_dir)}"


def default_group(experiment_name: str) -> str:
    """:func:`sweep_group` in a multirun, else the experiment's name."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return experiment_name
    return sweep_group(experiment_name, HydraConfig.get().sweep.dir)


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


def sweep_job_name(name: str) -> str:
    """In a multirun, ``<name> #<job>: <the values it sweeps>`` so the jobs of a sweep are told apart
    (in an Optuna study the job's number is its trial's)."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return name
    hydra_cfg = HydraConfig.get()
    swept = short_overrides(hydra_cfg.overrides.task, swept_keys())
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
    job_type: str | None = None,
    resume: bool = False,
    group: str | None = None,
    tags: Sequence[str] = (),
    log_model: str | bool | None = None,
    **init_kwargs: Any,
) -> WandbLogger:
    """A WandbLogger writing under ``save_dir``; ``init_kwargs`` go to ``wandb.init`` (mode, project, ...).

    ``job_type``: train, fold, cv, pretrain, eval, baseline or sweep (null: the kind of run, set as it
    starts: :func:`describe_logger_runs`). A fold's ``name`` and ``group`` are its CV run's choice
    (``donor_cv.fold_config``) and a sweep run's its sweep's (:func:`report_sweep_run`), and are kept;
    any other run's ``name`` gets the job's number and swept values in a sweep, and ``group`` defaults to
    :func:`default_group`.
    The tags are the experiment, the data and model options, then ``tags``. ``log_model``: ``best``
    uploads the best checkpoint as a model artifact at the end of training, ``false`` does not,
    null: ``best`` when online. W&B's console output is kept to errors.
    """
    import wandb

    if job_type not in ("fold", "sweep"):
        name, group = sweep_job_name(name), group or default_group(experiment_name)
    if log_model is None:
        log_model = "best" if init_kwargs.get("mode") == "online" else False
    if job_type:
        init_kwargs["job_type"] = job_type
    all_tags = dict.fromkeys([experiment_name, *option_tags(), *tags])
    logger = WandbLogger(
        save_dir=save_dir,
        name=name,
        id=run_id(Path(save_dir), resume),
        group=group,
        tags=list(all_tags),
        log_model=log_model == "best",
        settings=wandb.Settings(quiet=True, silent=True),
        **init_kwargs,
    )
    logger._wandb_init.pop("anonymous", None)  # Lightning passes a setting W&B warns is ignored
    return logger


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as ``{"loss.focal_gamma": 1.5, ...}``, so W&B's run table filters by each key.

    Hydra's own keys (``_target_``, ``_convert_``) and where things are (``paths``, ``logger``, any
    directory, ``resume``: :func:`config.is_location_key`) are left out: they go to the run's notes.
    """
    return {key: value for key, value in _flat(cfg).items()
            if not is_location_key(key) and not _is_hydra_key(key.rsplit(".", 1)[-1])}


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
    """The final metrics as flat W&B summary entries: ``val/macro_f1``, ``best_epoch``, ``success``..."""
    values: dict[str, Any] = {"best_epoch": summary["best_epoch"]}
    for split in splits_of(summary):
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
    """Each epoch-level figure plotted against ``epoch``, its summary the best so far (losses: the lowest).

    By name: Lightning declares every key (``*``) to step with its global step, and of two globs that
    match a key W&B may apply either; a definition by name comes first.
    """
    run.define_metric("epoch")
    for name in names:
        run.define_metric(name, step_metric="epoch", summary="min" if "loss" in name else "max")


def keep_files(run: Any, paths: Iterable[Path], root: Path) -> None:
    """Each of ``paths`` that exists as a file of the W&B run, at its place under ``root``: a copy in the run's
    files folder, which W&B uploads as the run ends (``wandb sync`` for an offline run). A copy, not
    ``run.save``: that links the file and prints a warning to the console for each file."""
    if run.disabled:  # WANDB_MODE=disabled: its folder is a temporary one nobody syncs
        return
    for path in paths:
        if path.is_file():
            target = Path(run.dir) / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


def describe_run(run: Any, cfg: DictConfig, layout: RunLayout) -> None:
    """A W&B run's flat config, its locations as notes and ``config.yaml`` as a file."""
    run.config.update(flat_config(cfg), allow_val_change=True)
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


def open_wandb_run(cfg: DictConfig, layout: RunLayout, job_type: str, **overrides: Any) -> Any:
    """A W&B run of ``cfg.logger.wandb`` started outside training (a CV run, a baseline, a refused job),
    described; ``job_type`` unless the config sets one (a fold's); None where the config logs no W&B."""
    wandb_cfg = cfg.get("logger", {}).get("wandb")
    if wandb_cfg is None:
        return None
    logger = instantiate(wandb_cfg, job_type=wandb_cfg.get("job_type") or job_type, **overrides)
    describe_run(logger.experiment, cfg, layout)
    return logger.experiment


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
    the final metrics, the per-class table, the confusion matrices (charts and images)."""
    for logger in wandb_loggers(loggers):
        report_final(logger.experiment, summary, class_names, layout)


def report_final(run: Any, summary: Mapping[str, Any], class_names: Sequence[str], layout: RunLayout) -> None:
    import wandb

    run.summary["per_class"] = wandb.Table(columns=["split", "class", "precision", "recall", "f1", "cells"],
                                           data=per_class_rows(summary, class_names))
    for split in splits_of(summary):
        title = f"{summary['run_name']} {split}"
        put_chart(run, f"confusion/{split}", confusion_chart(summary[split]["confusion_matrix"], class_names, title))
        run.summary[f"confusion_plot/{split}"] = wandb.Image(str(layout.confusion_plot(split)))
    run.summary.update(summary_values(summary))


def log_finished_run(cfg: DictConfig, layout: RunLayout, job_type: str, record: Mapping[str, Any],
                     class_names: Sequence[str], **overrides: Any) -> None:
    """A run made without a Lightning logger (a baseline, an evaluation) as a W&B run of its own, once
    it is written: its config, and its metrics.json ``record`` as summary, as a training run's."""
    run = open_wandb_run(cfg, layout, job_type, **overrides)
    if run is not None:
        report_final(run, record, class_names, layout)
        finish(run)


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


def fold_table(cv: Mapping[str, Any]) -> Any:
    """A row a fold: its donors, best epoch and final figures."""
    import wandb

    columns = ["test_donor", "val_donor", "run_dir", "best_epoch",
               *(logged(split, metric) for split in EVAL_SPLITS for metric in METRICS)]
    rows = [[fold["test_donor"], fold["val_donor"], fold["run_dir"], fold["best_epoch"],
             *(fold[split].get(metric) for split in EVAL_SPLITS for metric in METRICS)] for fold in cv["folds"]]
    return wandb.Table(columns=columns, data=rows)


def report_cv_run(cfg: DictConfig, parent: RunLayout, cv: Mapping[str, Any], error: BaseException | None) -> None:
    """The CV run's own W&B run (job type ``cv``), made as its folds end (they are runs of their own:
    one W&B run is open at a time): its config (``cv.*`` included), a table of its folds, the aggregate
    of ``cv`` (cv.json) as summary, cv.json and cv.md as files; failed with the error line when ``error``."""
    run = open_wandb_run(cfg, parent, "cv", resume=bool(cfg.resume))
    if run is None:
        return
    if cv.get("folds"):
        run.summary["fold_table"] = fold_table(cv)
        run.summary.update(cv_summary_values(cv))
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
    group = wandb_cfg.get("group") or study or sweep_group(cfg.experiment_name, sweep_dir)
    name = f"{group} sweep" + (f" {sweep_id(sweep_dir)}" if study else "")  # a grid's group names its date-time
    run = instantiate(wandb_cfg, save_dir=str(sweep_dir), name=name, group=group, job_type="sweep", resume=False,
                      log_model=False).experiment
    run.config.update({"sweep.overrides": list(cfg.hydra.overrides.task)})
    run.notes = f"sweep dir: {sweep_dir}"
    run.summary["jobs_table"] = wandb.Table(dataframe=table.astype(object).where(table.notna(), None))
    run.summary.update(dict(figures))
    keep_files(run, files, sweep_dir)
    finish(run)


def fold_group(cfg: DictConfig) -> str:
    """The W&B group of a CV run's folds, named after its job: ``<the CV run's group> #<job>`` in a
    sweep, else ``<run name> folds``."""
    wandb_cfg = cfg.get("logger", {}).get("wandb") or {}
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"{wandb_cfg.get('group') or default_group(cfg.experiment_name)} #{HydraConfig.get().job.num}"
    return f"{cfg.run_name} folds"


def record_refused_job(cfg: DictConfig, error: BaseException) -> None:
    """A sweep job that failed before starting its W&B run (a value refused, a bad donor) still gets
    one, in its group: its config and the error line, state failed. Every job of a sweep shows."""
    layout = RunLayout(cfg.paths.run_dir)
    if layout.wandb_run_id.is_file():  # a W&B run was started, and finished, for this job
        return
    cv = cfg.get("cv", {}).get("strategy", "none") != "none"
    run = open_wandb_run(cfg, layout, "cv" if cv else "baseline" if "baseline" in cfg else "train")
    if run is not None:
        finish(run, error)


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
