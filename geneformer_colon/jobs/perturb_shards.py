"""A perturbation job in pieces: shards, chunks of cells written as they finish, resume, merge, several devices.

- **Shards** (``--shard I/N``, I from 0 to N-1): the chosen cells are dealt into N shares of about equal work (a
  cell's work: its length x its perturbations; largest first, each to the least loaded share), and shard I
  perturbs its share into ``<out>.shard-I-of-N/``. A job that is not sharded is shard 0 of 1, whose folder goes
  once its output is written.
- **Chunks**: a shard's cells, most work first, ``--chunk-cells`` at a time; a chunk's results are written whole
  (``chunks/<n>.npz``, under a temporary name then renamed) when its last cell is done. ``--resume`` continues from
  the chunks a stopped job left (SIGTERM, Ctrl-C, a time limit), cut as that job cut them (its ``--chunk-cells``);
  a chunk that cannot be read back, or that holds other cells than the plan's, is done again.
- **Merge** (``--merge DIR...``, or the last shard to finish, when its siblings are the same job's): the shards'
  chunks, checked to come from the same job (``plan.json``: settings, device type and precision, cells, columns,
  goal centroid), each cell once, give the outputs a single process gives, byte for byte: every cell's
  perturbations are batched within the cell alone (so a cell's numbers do not depend on which other cells share
  its process), and the pairs are put in one order (cell, column) before any sum.
- **Devices** (``--devices cuda:0,cuda:1``): one worker process a device, shard I on the I-th, then the merge; a
  Ctrl-C reaches the parent alone, which ends the workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import re
import signal
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from geneformer_colon.common.errors import InputError, Interrupted
from geneformer_colon.common.io import LockHeld, atomic_path, held_lock, remove, write_json

log = logging.getLogger(__name__)

PLAN, CELLS, CHUNKS, DONE = "plan.json", "cells.h5ad", "chunks", "done.json"
SHARD_NAME = re.compile(r"^(?P<name>.+)\.shard-(?P<index>\d+)-of-(?P<count>\d+)$")


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N), with 0 <= I < N; one line otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None or int(match[2]) < 1 or int(match[1]) >= int(match[2]):
        raise InputError(f"--shard {text}: give I/N with N >= 1 shards and I from 0 to N-1 (a SLURM array "
                         "--array=0-<N-1>: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return int(match[1]), int(match[2])


def shard_dir(out: Path, index: int, count: int) -> Path:
    return out.with_name(f"{out.name}.shard-{index}-of-{count}")


def merged_out(shard: Path) -> Path:
    """The output folder a shard folder belongs to (``<out>.shard-I-of-N`` -> ``<out>``)."""
    match = SHARD_NAME.match(shard.name)
    if match is None:
        raise InputError(f"{shard}: not a shard folder (<out>.shard-I-of-N); give the folders perturb --shard wrote")
    return shard.with_name(match["name"])


def share(costs: np.ndarray, index: int, count: int) -> np.ndarray:
    """The cells of shard ``index`` of ``count``: each cell, most work first, to the share with the least work so
    far (ties: the lower share); returned most work first."""
    load = np.zeros(count)
    owner = np.empty(len(costs), dtype=np.int64)
    order = np.argsort(-np.asarray(costs, dtype=np.float64), kind="stable")
    for cell in order:
        owner[cell] = int(np.argmin(load))
        load[owner[cell]] += costs[cell]
    return order[owner[order] == index]


def digest(value: np.ndarray | Sequence[str]) -> str:
    """A short hash of an array's bytes or a list of names (what shards must agree on without storing it twice)."""
    content = value.tobytes() if isinstance(value, np.ndarray) else json.dumps(list(value)).encode()
    return hashlib.sha256(content).hexdigest()[:16]


@dataclass
class Plan:
    """What a shard computes and what must agree across shards (``identity``); ``columns`` names and symbols,
    per-column ``annotations`` and class names go to the merged outputs."""

    identity: dict[str, Any]
    index: int
    count: int
    cells: np.ndarray  # positions in the chosen cells, the shard's share, most work first
    chunk_cells: int
    columns: dict[str, list[str]]
    annotations: dict[str, list[float] | list[int]]

    def document(self) -> dict[str, Any]:
        return {"identity": self.identity, "shard": [self.index, self.count], "cells": self.cells.tolist(),
                "chunk_cells": self.chunk_cells, "columns": self.columns, "annotations": self.annotations}

    @property
    def chunks(self) -> list[np.ndarray]:
        return [self.cells[start: start + self.chunk_cells] for start in range(0, len(self.cells), self.chunk_cells)]


def read_plan(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / PLAN).read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{folder}: no readable {PLAN} ({error}); give a folder perturb --shard wrote") from None


def differing(one: dict[str, Any], other: dict[str, Any]) -> list[str]:
    return sorted(key for key in set(one) | set(other) if one.get(key) != other.get(key))


def chunk_path(folder: Path, number: int) -> Path:
    return folder / CHUNKS / f"{number:05d}.npz"


def read_chunk(path: Path, cells: np.ndarray) -> dict[str, np.ndarray] | None:
    """A chunk's arrays, or None where the file is missing, unreadable or holds other cells than ``cells``."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {key: stored[key] for key in stored.files}
    except Exception as error:  # OSError, ValueError, EOFError, or zipfile's own errors of a damaged file
        log.warning("%s: unreadable (%s); doing its cells again", path, error)
        return None
    if "base_cells" not in arrays or not np.array_equal(arrays["base_cells"], cells):
        log.warning("%s: holds other cells than the plan's; doing them again", path)
        return None
    return arrays


def write_chunk(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A chunk written whole: to a temporary name, then renamed."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)


def open_shard(folder: Path, plan: Plan, obs: pd.DataFrame, resume: bool) -> Plan:
    """Start ``folder`` for ``plan``, or, with ``resume``, check that it holds the same job's chunks; the plan to
    follow (resumed: cut in the stopped job's chunks, which its ``plan.json`` names and the merge reads)."""
    held = sorted((folder / CHUNKS).glob("*.npz")) if (folder / CHUNKS).is_dir() else []
    if folder.is_dir() and (folder / PLAN).is_file():
        before = read_plan(folder)
        if resume:
            changed = differing(before.get("identity", {}), plan.identity)
            if changed or before.get("shard") != [plan.index, plan.count] or before.get("cells") != plan.cells.tolist():
                raise InputError(f"{folder}: holds chunks of another perturb (it differs in "
                                 f"{', '.join(changed) or 'its shard or cells'}); run the command that started it, "
                                 "or remove the folder to start again")
            if before["chunk_cells"] != plan.chunk_cells:
                log.info("%s: --chunk-cells %d, as the stopped run cut its chunks (not %d)", folder,
                         before["chunk_cells"], plan.chunk_cells)
            return replace(plan, chunk_cells=int(before["chunk_cells"]))
        if held:
            raise InputError(f"{folder}: holds {len(held)} finished chunks of an interrupted perturb; add --resume "
                             "to continue it, or remove the folder to start again")
    remove(folder)
    folder.mkdir(parents=True)
    with atomic_path(folder / CELLS) as tmp:  # text columns as categories, as h5ad keeps them (and without its note)
        ad.AnnData(obs=obs.astype({column: "category" for column in obs.columns if obs[column].dtype == object})
                   ).write_h5ad(tmp)
    write_json(folder / PLAN, plan.document())
    return plan


def run_shard(folder: Path, plan: Plan, obs: pd.DataFrame, compute: Callable[[np.ndarray], dict[str, np.ndarray]],
              resume: bool, device: str) -> None:
    """Every chunk of ``plan`` not yet done, each written as it ends; ``done.json`` once all are."""
    with holding(folder):
        plan = open_shard(folder, plan, obs, resume)
        chunks = plan.chunks
        done = [read_chunk(chunk_path(folder, number), cells) is not None for number, cells in enumerate(chunks)]
        if any(done):
            log.info("%s: %d of %d chunks done before; continuing", folder, sum(done), len(chunks))
        try:
            for number, cells in enumerate(chunks):
                if done[number]:
                    continue
                started = time.perf_counter()
                arrays = compute(cells)
                arrays["seconds"] = np.array(time.perf_counter() - started)
                write_chunk(chunk_path(folder, number), arrays)
                done[number] = True
        except Interrupted as stop:
            kept = sum(chunk_path(folder, number).is_file() for number in range(len(chunks)))
            raise Interrupted(stop.signum, f"perturb stopped; {kept} of {len(chunks)} chunks of cells kept in "
                                           f"{folder}: continue with the same command and --resume") from None
        seconds = sum(chunk_seconds(chunk_path(folder, number)) for number in range(len(chunks)))
        write_json(folder / DONE, {"seconds": seconds, "device": device})


def chunk_seconds(path: Path) -> float:
    with np.load(path, allow_pickle=False) as stored:
        return float(stored["seconds"])


@contextlib.contextmanager
def holding(folder: Path) -> Iterator[None]:
    """One process a shard folder (a kernel lock beside it); a second is refused in one line."""
    try:
        with held_lock(folder.with_name(f".{folder.name}.lock"), f"perturb (pid {os.getpid()})", remove_after=True):
            yield
    except LockHeld as held:
        raise InputError(f"{folder}: being computed by {held.holder}; wait for it to end or give another --out"
                         ) from None


def is_complete(folder: Path) -> bool:
    return (folder / DONE).is_file()


@dataclass
class Merged:
    """The shards' results put together: the cells' obs, every (cell, column) pair in one order, each cell's
    unperturbed class probabilities, the plan's columns and annotations, settings and timing."""

    obs: pd.DataFrame
    pairs: dict[str, np.ndarray]
    base_probabilities: np.ndarray
    plan: dict[str, Any]
    seconds: float
    devices: list[str]


def check_shards(folders: Sequence[Path]) -> list[dict[str, Any]]:
    """The shards' plans, checked to be one job's N shards, each once and complete; one line otherwise."""
    if not folders:
        raise InputError("--merge: give the shard folders perturb --shard I/N wrote")
    plans = [read_plan(folder) for folder in folders]
    first = plans[0]
    for folder, plan in zip(folders, plans):
        if arithmetic(plan) != arithmetic(first):
            raise InputError(f"--merge: {folder} was computed on {arithmetic(plan)}, {folders[0]} on "
                             f"{arithmetic(first)}: together they give numbers no single process gives; run every "
                             "shard on one kind of device")
        changed = differing(first["identity"], plan["identity"])
        if changed or plan["shard"][1] != first["shard"][1]:
            raise InputError(f"--merge: {folder} is a shard of another perturb than {folders[0]} (it differs in "
                             f"{', '.join(changed) or 'its number of shards'}); merge the shards of one command")
    count = first["shard"][1]
    indices = sorted(plan["shard"][0] for plan in plans)
    if indices != list(range(count)):
        missing = sorted(set(range(count)) - set(indices))
        twice = sorted({index for index in indices if indices.count(index) > 1})
        wrong = [f"shard {', '.join(map(str, missing))} missing"] if missing else []
        wrong += [f"shard {', '.join(map(str, twice))} given twice"] if twice else []
        raise InputError(f"--merge: the job has {count} shards, 0 to {count - 1}; {'; '.join(wrong)}; give each "
                         "shard folder once")
    unfinished = [str(folder) for folder in folders if not is_complete(folder)]
    if unfinished:
        raise InputError(f"--merge: {', '.join(unfinished)} not finished; run it again with --resume, then merge")
    return plans


def arithmetic(plan: dict[str, Any]) -> str:
    """The device type and precision a shard's numbers come from, e.g. ``cuda bf16``."""
    return f"{plan['identity'].get('device_type')} {plan['identity'].get('precision')}"


def ready_to_merge(folders: Sequence[Path]) -> bool:
    """Whether ``folders`` are one job's shards, every one complete (the last shard to finish then merges them); a
    complete folder of another job among them (an earlier command's) is named in one log line, and left."""
    if not all(is_complete(folder) for folder in folders):
        return False
    try:
        check_shards(folders)
    except InputError as error:
        log.warning("the shards are not merged: %s", error)
        return False
    return True


def merge_shards(folders: Sequence[Path]) -> Merged:
    """Every shard's chunks in one order (see the module docstring)."""
    folders = [Path(folder) for folder in folders]
    plans = check_shards(folders)
    obs = ad.read_h5ad(folders[0] / CELLS).obs
    parts: list[dict[str, np.ndarray]] = []
    for folder, plan in zip(folders, plans):
        cells = np.asarray(plan["cells"], dtype=np.int64)
        for number, start in enumerate(range(0, len(cells), plan["chunk_cells"])):
            arrays = read_chunk(chunk_path(folder, number), cells[start: start + plan["chunk_cells"]])
            if arrays is None:
                raise InputError(f"{chunk_path(folder, number)}: missing or unreadable; run that shard again with "
                                 "--resume, then merge")
            parts.append(arrays)
    base_cells = np.concatenate([part["base_cells"] for part in parts])
    if sorted(base_cells.tolist()) != list(range(len(obs))):
        raise InputError(f"--merge: the shards hold {len(base_cells)} cells of the job's {len(obs)}, not each once; "
                         "merge the shards of one command")
    base = np.empty((len(obs), parts[0]["base_probabilities"].shape[1]), dtype=np.float64)
    base[base_cells] = np.concatenate([part["base_probabilities"] for part in parts])
    keys = [key for key in parts[0] if key not in ("base_cells", "base_probabilities", "seconds")]
    pairs = {key: np.concatenate([part[key] for part in parts]) for key in keys}
    for prefix, order_keys in (("", ("column", "cell")), ("net_", ("net_gene", "net_column", "net_cell"))):
        if order_keys[-1] in pairs:  # one order whatever the shards: by cell, then column (then affected gene)
            order = np.lexsort([pairs[key] for key in order_keys])
            pairs.update({key: pairs[key][order] for key in keys if key.startswith(prefix) and
                          (prefix or not key.startswith("net_"))})
    done = [json.loads((folder / DONE).read_text()) for folder in folders]
    return Merged(obs, pairs, base, plans[0], float(sum(part["seconds"] for part in parts)),
                  [str(entry["device"]) for entry in done])


def sibling_shards(folder: Path) -> list[Path]:
    """Every shard folder of ``folder``'s job (by name: ``<out>.shard-I-of-N``, I from 0 to N-1)."""
    match = SHARD_NAME.match(folder.name)
    count = int(match["count"]) if match else 1
    return [shard_dir(merged_out(folder), index, count) for index in range(count)]


def run_on_devices(devices: Sequence[str], work: Callable[..., Any], arguments: dict[str, Any], out: Path) -> None:
    """``work(**arguments, shard=(i, N), device=devices[i])`` in one spawned process a device, all at once; the
    first failure (an input error as one line) raised once every worker ended. The workers ignore Ctrl-C (they
    start with SIGINT ignored, as the terminal sends it to them too): the parent ends them (SIGTERM) when it
    stops, saying where their chunks of ``out`` are kept."""
    context = multiprocessing.get_context("spawn")
    errors = context.Queue()
    workers = [context.Process(target=worker, args=(work, {**arguments, "shard": (index, len(devices)),
                                                          "device": device}, len(devices), errors))
               for index, device in enumerate(devices)]
    try:
        with sigint_ignored():  # inherited through the exec, kept by Python's start
            for process in workers:
                process.start()
        for process in workers:
            process.join()
    except Interrupted as stop:
        raise Interrupted(stop.signum, f"perturb stopped; the workers' finished chunks are kept in "
                                       f"{out}.shard-*-of-{len(devices)}: continue with the same command and "
                                       "--resume") from None
    finally:
        for process in workers:
            if process.is_alive():
                process.terminate()
                process.join()
    failures = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    failures += [(index, f"worker on {devices[index]} ended with exit code {process.exitcode}", False)
                 for index, process in enumerate(workers) if process.exitcode and
                 not any(failure[0] == index for failure in failures)]
    if failures:
        index, message, is_input = sorted(failures)[0]
        raise (InputError if is_input else RuntimeError)(f"shard {index} on {devices[index]}: {message}")


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def worker(work: Callable[..., Any], arguments: dict[str, Any], workers: int, errors: Any) -> None:
    """One shard in a spawned process, with its share of the CPUs as torch threads; its log lines shown as the
    command shows its own (a spawned process starts with none)."""
    from geneformer_colon.common.console import quiet_libraries
    from geneformer_colon.common.cpus import available_cpus, use_threads

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_libraries()
    use_threads(max(1, available_cpus() // workers))
    try:
        work(**arguments)
    except InputError as error:
        errors.put((arguments["shard"][0], str(error), True))
        raise SystemExit(2) from None
    except Exception:
        errors.put((arguments["shard"][0], traceback.format_exc(limit=3).strip().splitlines()[-1], False))
        raise SystemExit(1) from None
