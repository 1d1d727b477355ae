"""Configs beyond composing them: checked values, trusted targets, a finished run's config under new
overrides, and what a resumed run changed.

A run directory's ``config.yaml`` and a checkpoint's hyper-parameters are input a user may have
been handed: nothing from them is instantiated unless each ``_target_`` is one this package
ships (:func:`instantiate_trusted`).
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import importlib
import inspect
import math
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from geneformer_colon.common.errors import InputError

# The package's Hydra configs (the config groups), shipped inside the package so installed commands find them.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# ---- trusted targets ----

# Modules whose configurable classes moved when the package was laid out by layer: a run directory written
# before names them by their old module, and still loads, resumes and evaluates (one rename table, no shims).
MOVED_MODULES = {
    "geneformer_colon.callbacks": "geneformer_colon.model.callbacks",
    "geneformer_colon.sweep": "geneformer_colon.jobs.sweep",
    "geneformer_colon.study": "geneformer_colon.jobs.study",
}

# Modules whose classes configs may name: the pluggable parts (a new loss class there needs nothing else).
CONFIGURABLE_MODULES = (
    "geneformer_colon.data.sources",
    "geneformer_colon.data.datamodule",
    "geneformer_colon.model.losses",
    "geneformer_colon.model.augment",
    "geneformer_colon.model.robust",
    "geneformer_colon.model.adaptation",
    "geneformer_colon.model.callbacks",
    "geneformer_colon.jobs.sweep",
    "geneformer_colon.jobs.study",
)
# Functions (and the scANVI baseline's class) configs may name.
CONFIG_FUNCTIONS = frozenset({
    "geneformer_colon.model.backbone.new_bert",
    "geneformer_colon.model.backbone.pretrained_bert",
    "geneformer_colon.model.baselines.naive_bayes",
    "geneformer_colon.model.baselines.logreg",
    "geneformer_colon.model.baselines.pca_knn",
    "geneformer_colon.model.baselines.Scanvi",
    "geneformer_colon.model.baselines.frozen_probe",
    "geneformer_colon.model.schedules.warmup_schedule",
    "geneformer_colon.report.wandb_run.wandb_logger",
})
# Library classes the shipped configs use.
LIBRARY_TARGETS = frozenset({
    "torch.optim.AdamW",
    "torch.optim.Adam",
    "torch.optim.SGD",
    "pytorch_lightning.callbacks.EarlyStopping",
    "pytorch_lightning.callbacks.LearningRateMonitor",
    "pytorch_lightning.callbacks.ModelCheckpoint",
    "pytorch_lightning.callbacks.RichProgressBar",
    "pytorch_lightning.callbacks.TQDMProgressBar",
    "pytorch_lightning.loggers.CSVLogger",
})


def is_trusted_target(target: str) -> bool:
    if target in LIBRARY_TARGETS or target in CONFIG_FUNCTIONS:
        return True
    module_name, _, name = target.rpartition(".")
    if module_name not in CONFIGURABLE_MODULES or name.startswith("_"):
        return False
    value = getattr(importlib.import_module(module_name), name, None)
    return inspect.isclass(value) and value.__module__ == module_name


def renamed_targets(node: Any) -> Any:
    """Plain containers with every ``_target_`` of a moved module (:data:`MOVED_MODULES`) named by its module now."""
    if isinstance(node, Mapping):
        return {key: current_target(value) if key == "_target_" else renamed_targets(value)
                for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return [renamed_targets(value) for value in node]
    return node


def current_target(target: Any) -> Any:
    if not isinstance(target, str):
        return target
    module_name, _, name = target.rpartition(".")
    return f"{MOVED_MODULES[module_name]}.{name}" if module_name in MOVED_MODULES else target


def targets_in(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(key path, target) of every ``_target_`` in a config tree."""
    if isinstance(node, (Mapping, DictConfig)):
        for key, value in node.items():
            if key == "_target_":
                yield path or "<root>", value
            else:
                yield from targets_in(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, (list, tuple, ListConfig)):
        for number, value in enumerate(node):
            yield from targets_in(value, f"{path}[{number}]")


def check_targets(node: Any, where: str) -> None:
    """Refuse a config whose ``_target_`` anywhere is not one this package ships."""
    for path, target in targets_in(node):
        if not isinstance(target, str) or not is_trusted_target(target):
            raise InputError(
                f"{where}: {path}._target_ is {target!r}, which is not a target of this package's configs; a run "
                "directory may only name geneformer_colon's own classes and the library classes of its conf/: "
                "was the file edited? Use a run directory written by train.py"
            )


def strings_in(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(key path, value) of every string in plain containers."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from strings_in(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, (list, tuple)):
        for number, value in enumerate(node):
            yield from strings_in(value, f"{path}[{number}]")
    elif isinstance(node, str):
        yield path or "<root>", node


def trusted_content(node: Any, where: str) -> Any:
    """A config from a file a user handed in (a run's config.yaml, a checkpoint's settings), made safe to
    instantiate: as plain containers, its interpolations resolved (a resolver such as ``oc.create`` makes
    new nodes, targets included), nothing left that another resolution would turn into something else,
    and every ``_target_`` one this package ships."""
    if node is None:
        return None
    try:
        created = node if isinstance(node, (DictConfig, ListConfig)) else OmegaConf.create(node)
        content = renamed_targets(OmegaConf.to_container(created, resolve=True))
    except (OmegaConfBaseException, ValueError, TypeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{where}: not a readable config ({reason}); use a run directory train.py wrote") from None
    for path, value in strings_in(content):
        if "${" in value:
            raise InputError(f"{where}: {path} is {value!r}, an interpolation left after resolving; was the file "
                             "edited? Use a run directory written by train.py")
    check_targets(content, where)
    return content


def instantiate_trusted(node: Any, where: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` of :func:`trusted_content`."""
    return instantiate(trusted_content(node, where), **kwargs)


# ---- flat keys ----

# Keys that say where a run is, what it is called or how it shows and uses this machine, not how it was made.
LOCATION_KEYS = (
    "paths.*", "hydra.*", "sweep.storage", "run_name", "resume", "overwrite", "resume_changes", "allow_resume_changes",
    "*run_dir", "*save_dir", "*cache_dir", "*data_dir", "*dirpath", "*default_root_dir",
    "data.source.gene_map", "logger.*", "callbacks.progress_bar*", "callbacks.epoch_log*", "data.num_workers",
    "threads",
)


def flatten(tree: Mapping[str, Any], prefix: str = "", separator: str = ".") -> dict[str, Any]:
    """``{"loss": {"focal_gamma": 1.5}}`` -> ``{"loss.focal_gamma": 1.5}`` (``separator`` between the parts); lists
    stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}{separator}", separator))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def is_location_key(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in LOCATION_KEYS)


def display(value: Any) -> str:
    """A config value as one short string (also what values are compared by)."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(display(item) for item in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def differing_keys(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Flat keys whose value is not the same in every config (absent counts as a value; locations do not count)."""
    flats = [flatten(config) for config in configs]
    keys = list(dict.fromkeys(key for flat in flats for key in flat))
    return [key for key in keys
            if not is_location_key(key) and len({display(flat[key]) if key in flat else None for flat in flats}) > 1]


def recipe_changes(before: Mapping[str, Any], after: Mapping[str, Any], ignore: Sequence[str] = (),
                   defaults: Mapping[str, Any] | None = None) -> dict[str, tuple[str, str]]:
    """Flat keys whose value differs between two configs (where a run is does not count, nor ``ignore``):
    key -> (before, after). A key ``before`` lacks whose value ``after`` is its value in ``defaults`` (the
    config composed with no override) is no change: a run started before the key existed ran as its
    default does."""
    old, new, default = flatten(before), flatten(after), flatten(defaults or {})
    changes = {}
    for key in dict.fromkeys([*old, *new]):
        if is_location_key(key) or key in ignore:
            continue
        was, now = (display(old[key]) if key in old else "absent"), (display(new[key]) if key in new else "absent")
        if key not in old and key in default and display(default[key]) == now:
            continue
        if was != now:
            changes[key] = (was, now)
    return changes


# ---- values ----


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_VALUE_CHECKS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("seed", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("optimizer.lr", lambda v: _number(v) and v > 0, "a number > 0"),
    ("logger.wandb.log_model", lambda v: v in (None, False, "best"), "best or false (null: best when online)"),
    ("logger.wandb.table_rows", lambda v: _integer(v) and v >= 0,
     "the most rows of the test predictions' W&B table, an integer >= 0 (0: no table)"),
    ("optimizer.weight_decay", lambda v: _number(v) and v >= 0, "a number >= 0"),
    ("scheduler.warmup_ratio", lambda v: _number(v) and 0 <= v < 1, "a fraction in [0, 1)"),
    ("data.batch_size", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("data.eval_batch_size", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("data.max_tokens", lambda v: v is None or (_integer(v) and v >= 1), "null or an integer >= 1"),
    ("data.mega_batch_factor", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("data.num_workers", lambda v: v is None or (_integer(v) and v >= 0), "an integer >= 0 (null: from the CPUs)"),
    ("model.tokenizer.input_size", lambda v: v is None or (_integer(v) and v >= 3), "null or an integer >= 3"),
    ("model.head_dropout", lambda v: _number(v) and 0 <= v < 1, "a probability in [0, 1)"),
    ("model.freeze_layers", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("trainer.max_epochs", lambda v: _integer(v) and (v >= 1 or v == -1), "an integer >= 1 (or -1: no limit)"),
    ("trainer.accumulate_grad_batches", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("trainer.gradient_clip_val", lambda v: v is None or (_number(v) and v >= 0), "null or a number >= 0"),
    ("trainer.log_every_n_steps", lambda v: _integer(v) and v >= 1, "an integer >= 1"),
    ("callbacks.early_stopping.patience", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
)


def check_values(cfg: DictConfig) -> None:
    """Every value with a known range, checked before anything is built or written: one line for the first bad one."""
    flat = flatten(OmegaConf.to_container(cfg, resolve=True))
    for key, valid, expected in _VALUE_CHECKS:
        if key in flat and not valid(flat[key]):
            raise InputError(f"{key} is {flat[key]!r}; set it to {expected}")
    if flat.get("data.max_tokens") is not None and flat.get("trainer.max_epochs") == -1:
        raise InputError("data.max_tokens needs trainer.max_epochs >= 1: every epoch's batches are planned before "
                         "training, so that the learning-rate schedule knows the number of steps")
    max_tokens, input_size = flat.get("data.max_tokens"), flat.get("model.tokenizer.input_size")
    if max_tokens is not None and input_size is not None and max_tokens < input_size:
        raise InputError(f"data.max_tokens is {max_tokens}, less than one cell of model.tokenizer.input_size "
                         f"{input_size} tokens; set it to at least {input_size} (or null for batch_size cells)")


# ---- overrides ----

def has_key(cfg: DictConfig, key: str) -> bool:
    """Whether the dotted ``key`` is in ``cfg`` (its value, an interpolation maybe, is not resolved)."""
    parent_key, _, name = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, throw_on_resolution_failure=False) if parent_key else cfg
    if isinstance(parent, ListConfig):
        return name.isdigit() and int(name) < len(parent)
    return isinstance(parent, DictConfig) and name in parent.keys()


def closest(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest of ``choices``, or nothing."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def unknown_key(key: str, keys: Iterable[str]) -> InputError:
    return InputError(f"{key}: no such key in the config{closest(key, keys)}; a new key is added with +{key}=..., "
                      "where the class it configures takes it")


def unknown_option(group: str, option: str, options: Sequence[str]) -> InputError:
    return InputError(f"{group}={option}: {group} has no option {option!r}{closest(option, options)}; choose one "
                      f"of {', '.join(options)}")




@contextlib.contextmanager
def composing_in(config_dir: Path) -> Iterator[GlobalHydra]:
    """Hydra's compose API on ``config_dir`` for the block; a Hydra app already running (its GlobalHydra)
    is put back afterwards."""
    outer = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            yield GlobalHydra.instance()
    finally:
        GlobalHydra.instance().clear()
        if outer is not None:
            GlobalHydra.instance().initialize(outer)


def compose_run_config(saved: Path, overrides: Sequence[str], conf_dir: Path) -> DictConfig:
    """A run's saved config with command-line overrides in Hydra's own grammar.

    Dotted overrides (``data.test_donors=[KUL21]``, ``+key=...``, ``~key``) apply to the saved
    values; a config group override (``data=h5ad``) replaces that group's node with the option
    from ``conf_dir``, composed against the saved config (its interpolations see the run's paths
    and seed). The result is :func:`trusted_content` of the composition.
    """
    try:
        content = OmegaConf.to_container(OmegaConf.load(saved), resolve=False)
    except (OmegaConfBaseException, OSError, ValueError, yaml.YAMLError) as error:
        raise InputError(f"{saved}: not a readable config ({error}); the run directory is damaged") from None
    if not isinstance(content, dict):
        raise InputError(f"{saved}: not a config mapping; the run directory is damaged")
    groups = {path.name for path in conf_dir.iterdir() if path.is_dir()}
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as error:
        raise InputError(f"override: {error}") from None
    chosen = {o.key_or_group: o.value() for o in parsed
              if o.key_or_group in groups and not o.is_delete() and isinstance(o.value(), str)}
    for group, option in chosen.items():
        options = sorted(path.stem for path in (conf_dir / group).glob("*.yaml"))
        if option not in options:
            raise unknown_option(group, option, options)
    saved_cfg = OmegaConf.create(content)
    for override in parsed:  # keys of the saved config (a group chosen anew is checked as Hydra composes it)
        key = override.key_or_group
        if key.split(".")[0] not in chosen and not (override.is_add() or override.is_force_add()) \
                and not has_key(saved_cfg, key):
            raise unknown_key(key, flatten(OmegaConf.to_container(saved_cfg, resolve=False)))
    dotted = [o.input_line for o in parsed if o.key_or_group not in chosen]
    for group in chosen:
        content.pop(group, None)
    content["defaults"] = ["_self_", *({group: option} for group, option in chosen.items())]
    content["hydra"] = {"searchpath": [f"file://{conf_dir.resolve()}"]}
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "run.yaml").write_text(yaml.safe_dump(content, sort_keys=False))
        try:
            with composing_in(Path(folder)):
                cfg = compose("run", overrides=dotted)
        except (HydraException, OmegaConfBaseException) as error:
            raise InputError(f"{saved}: cannot apply the overrides {list(overrides)}: {error}") from None
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return OmegaConf.create(trusted_content(cfg, str(saved)))


def plain(node: Any) -> Any:
    """A config node as plain Python containers (what checkpoints store), resolved."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
