"""A Hydra entry point's command line, checked before Hydra runs: one line for a bad override, exit 2.

Hydra reports a misspelled key, an unknown config group option or a syntax error in several lines
(exit 1), and takes ``+key=value`` for any key, so a misspelled argument of a class fails only when
the class is built, after the run directory was written. :func:`hydra_entry` composes the config
with Hydra's compose API first and names the bad override with the closest valid key or option;
then Hydra runs as usual. ``eval.py`` applies overrides to a run's saved config with the same
messages (``config.unknown_key``, ``config.unknown_option``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from pathlib import Path

from hydra import compose
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from hydra.types import RunMode
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from geneformer_colon.common.errors import InputError
from geneformer_colon.runs.config import closest, composing_in, flatten, has_key, unknown_key, unknown_option

# Keys of a node with a _target_ that instantiate itself takes, not the target.
INSTANTIATE_KEYS = frozenset({"_target_", "_args_", "_recursive_", "_convert_", "_partial_"})


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def parsed_overrides(overrides: Sequence[str]) -> list[Override]:
    parser = OverridesParser.create()
    parsed = []
    for override in overrides:
        try:
            parsed.extend(parser.parse_overrides([override]))
        except HydraException as error:
            raise InputError(f"{override}: not an override ({first_line(error)}); write key=value, group=option, "
                             "+key=value or ~key, quoting values with spaces or brackets") from None
    return parsed


def one_job(override: Override) -> str | None:
    """The override as one job of a sweep has it (a sweep's first value); None for a sweep with no list of values."""
    if not override.is_sweep_override():
        return override.input_line
    try:
        value = next(iter(override.sweep_string_iterator()))
    except (HydraException, StopIteration, TypeError):
        return None
    return f"{override.get_key_element()}={value}"


def keys_of(cfg: DictConfig) -> list[str]:
    """Every key path of a config, nodes and leaves."""
    flat = flatten(OmegaConf.to_container(cfg, resolve=False))
    return sorted({".".join(key.split(".")[:depth]) for key in flat for depth in range(1, key.count(".") + 2)})


def check_groups(parsed: Sequence[Override], options_of: Callable[[str], list[str] | None]) -> None:
    """Every option a group override names (each of a sweep's) is one of the group's."""
    for override in parsed:
        options = options_of(override.key_or_group)
        if options is None or override.is_delete():
            continue
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        for value in values:
            if isinstance(value, str) and value not in options:
                raise unknown_option(override.key_or_group, value, options)


def check_deleted_groups(parsed: Sequence[Override], default: DictConfig,
                         options_of: Callable[[str], list[str] | None]) -> None:
    """No override deletes a config group the job's config chooses by default (``~optimizer``): the job needs
    its node; another option is chosen instead."""
    for override in parsed:
        key = override.key_or_group
        options = options_of(key)
        if override.is_delete() and options and isinstance(OmegaConf.select(default, key, default=None), DictConfig):
            raise InputError(f"~{key}: the job needs its {key} node; choose another option ({key}=<one of "
                             f"{', '.join(options)}>), or delete a key inside it (~{key}.<key>)")


def check_keys(parsed: Sequence[Override], cfg: DictConfig, groups: Sequence[str]) -> None:
    """Every key an override sets or deletes (without ``+``) is in the config (or is a config group)."""
    for override in parsed:
        key = override.key_or_group
        if override.is_add() or override.is_force_add() or key in groups:
            continue
        if not has_key(cfg, key) and override.is_delete():
            raise InputError(f"~{key}: no such key to delete{closest(key, keys_of(cfg))}")
        if not has_key(cfg, key):
            raise unknown_key(key, [*keys_of(cfg), *groups])


def check_added_arguments(parsed: Sequence[Override], cfg: DictConfig) -> None:
    """Every ``+key`` under a node with a ``_target_`` names an argument that target takes."""
    for override in parsed:
        key = override.key_or_group
        if not (override.is_add() or override.is_force_add()) or key.startswith("hydra."):
            continue
        parts = key.split(".")
        for depth in range(len(parts) - 1, 0, -1):
            node_path, argument = ".".join(parts[:depth]), parts[depth]
            target = OmegaConf.select(cfg, f"{node_path}._target_", default=None, throw_on_resolution_failure=False)
            if isinstance(target, str):
                check_argument(key, node_path, target, argument)
                break


def check_argument(key: str, node_path: str, target: str, argument: str) -> None:
    if argument in INSTANTIATE_KEYS:
        return
    try:
        parameters = inspect.signature(get_object(target)).parameters
    except (ImportError, AttributeError, ValueError, TypeError, HydraException):
        return  # what cannot be imported fails where it is built, with its own message
    if argument in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    names = [name for name, p in parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    hint = closest(argument, names).replace("did you mean ", f"did you mean {node_path}.")
    raise InputError(f"+{key}: {target} takes no argument {argument!r}{hint}; it takes {', '.join(names)}")


def check_command_line(conf_dir: Path, config_name: str, argv: Sequence[str]) -> None:
    """The overrides of a Hydra command line, checked as Hydra will compose them (see the module docstring)."""
    args, _ = get_args_parser().parse_known_args(list(argv))
    if args.help or args.hydra_help or args.info or args.shell_completion or args.experimental_rerun \
            or args.config_path or args.config_dir:
        return  # not a run of this app's own config: Hydra answers
    parsed = parsed_overrides(args.overrides)
    with composing_in(conf_dir) as hydra_instance:
        loader = hydra_instance.config_loader()

        def options_of(group: str) -> list[str] | None:
            return sorted(loader.get_group_options(group)) if loader.repository.group_exists(group) else None

        check_groups(parsed, options_of)
        job = [(override, line) for override in parsed if (line := one_job(override)) is not None]
        groups = [override.key_or_group for override in parsed if options_of(override.key_or_group) is not None]
        # the config keys are looked up in: the groups chosen, the keys added
        chosen = [line for override, line in job
                  if override.key_or_group in groups or override.is_add() or override.is_force_add()]
        try:
            check_deleted_groups(parsed, compose(config_name), options_of)
            check_keys(parsed, compose(config_name, overrides=chosen, return_hydra_config=True),
                       [*loader.list_groups(""), *groups])
            cfg = compose(config_name, overrides=[line for _, line in job], return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as error:
            cause = f": {first_line(error.__cause__)}" if error.__cause__ else ""
            raise InputError(f"{' '.join(args.overrides)}: {first_line(error)}{cause}") from None
    check_added_arguments(parsed, cfg)
    if any(o.is_sweep_override() for o in parsed) and not args.multirun and cfg.hydra.mode != RunMode.MULTIRUN:
        sweep = next(o.input_line for o in parsed if o.is_sweep_override())
        raise InputError(f"{sweep}: several values are a sweep; add -m to run a job for each")
