"""The README runs top to bottom: its Commands and "Use a trained model" blocks, run in order on a copy of the
repository after `make train`, each succeed (with tiny settings added, so the whole walk takes minutes).

A block right after ``<!-- readme-test: skip REASON -->`` is not run; the test says so, with the reason, as a
warning. A command block is a run of lines indented four spaces; a line ending in ``\\`` goes on in the next.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO_ROOT

WALKED_SECTIONS = ("Commands", "Use a trained model")
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s+(?P<reason>.*?)\s*-->")
FIRST = "make train"  # what a fresh clone runs first
# Added to each training, baseline and pretraining command: seconds a run.
TINY = ["data.source.n_cells=480", "data.source.n_genes=300", "data.batch_size=32", "model.tokenizer.input_size=128",
        "trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "logger=csv",
        "callbacks.progress_bar=null"]
TINY_ENCODER = ["model.encoder.hidden_size=32", "model.encoder.intermediate_size=64",
                "model.encoder.num_attention_heads=2"]
TINY_SWEEP = ["hydra.sweeper.n_trials=2"]
TINY_SYNTH = ["--cells", "480", "--genes", "300"]


@dataclass(frozen=True)
class Block:
    line: int
    section: str
    commands: list[str]
    skip: str | None


def readme_blocks(text: str) -> list[Block]:
    """Every indented block of the README with its section, its commands (continuations joined, comments
    dropped) and the reason it is skipped, if marked."""
    blocks, section, skip, current, start = [], "", None, [], 0
    lines = text.splitlines()
    for number, line in enumerate([*lines, ""], start=1):
        if line.startswith("    ") and line.strip():
            if not current:
                start = number
            current.append(line[4:])
            continue
        if current:
            blocks.append(Block(start, section, commands_of(current), skip))
            current, skip = [], None
        if line.startswith("## "):
            section = line[3:].strip()
        elif (marker := SKIP.search(line)) is not None:
            skip = marker.group("reason")
        elif line.strip():
            skip = None if not line.startswith("<!--") else skip
    return blocks


def commands_of(lines: list[str]) -> list[str]:
    commands, pending = [], ""
    for line in lines:
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip() + " "
            continue
        words = shlex.split(pending, comments=True)
        if words:
            commands.append(shlex.join(words))
        pending = ""
    return commands


def runnable(command: str, python: str) -> str:
    """The command as the test runs it: this interpreter, tiny settings appended."""
    words = shlex.split(command)
    if words[:2] == ["make", "train"]:
        words = ["python", "train.py", "experiment=colon6", *words[2:]]
    if words[0] == "geneformer-colon":
        words = ["python", "-m", "geneformer_colon", *words[1:]]
    if words[0] == "make":
        return shlex.join([*words, f"BIN={Path(python).parent}", "STAMP="])
    if words[0] == "python":
        words[0] = python
        if words[1] in ("train.py", "baseline.py", "pretrain.py"):
            words += TINY + ([] if any(w.startswith("model=") for w in words) else TINY_ENCODER)
            words += TINY_SWEEP if "sweep=optuna" in words else []
        if words[1:4] == ["-m", "geneformer_colon", "synth"]:
            words += TINY_SYNTH
    return shlex.join(words)


def test_blocks_are_found_with_their_sections_and_skip_reasons():
    blocks = readme_blocks((REPO_ROOT / "README.md").read_text())
    commands = [block for block in blocks if block.section == "Commands"]
    assert commands[0].commands[0] == "python train.py experiment=colon6 overwrite=true" and commands[0].skip is None
    assert any(block.skip and "Geneformer clone" in block.skip for block in commands)
    assert any(" --fold KUL01 " in command for block in commands for command in block.commands)  # a continuation


@pytest.mark.slow
def test_the_readme_runs_top_to_bottom(tmp_path):
    copy = tmp_path / "clone"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    for name in tracked.splitlines():
        if (REPO_ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, copy / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    blocks = [block for block in readme_blocks((copy / "README.md").read_text()) if block.section in WALKED_SECTIONS]
    done: set[str] = set()
    for block in [Block(0, "Quick start", [FIRST], None), *blocks]:
        if block.skip:
            warnings.warn(f"README line {block.line}: block not run: {block.skip}", stacklevel=1)
            continue
        for command in block.commands:
            if command in done:  # the same command again (a synopsis repeated): it ran already
                continue
            print(f"README line {block.line}: {command}", flush=True)  # progress, with -s
            result = subprocess.run(runnable(command, sys.executable), shell=True, cwd=copy, env=env,
                                    capture_output=True, text=True, timeout=900, check=False)
            assert result.returncode == 0, f"README line {block.line}: {command}\n{result.stderr[-3000:]}"
            done.add(command)
