"""The README and the docs' command list run top to bottom: the README's Commands, then every block of
docs/commands.md, run in order on a copy of the repository after `make train`, each succeed (with tiny
settings added, so the whole walk takes minutes).

Both files are read the same way. A command block is a fenced block marked ``sh`` (or ``bash``, ``shell``), or a
run of lines indented four spaces outside any fence; a line ending in ``\\`` goes on in the next. A block right
after ``<!-- readme-test: skip REASON -->`` is not run; the test says so, with the reason, as a warning.
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

# (file, the sections walked: None for every section), in the order they run
WALKED = (("README.md", ("Commands",)), ("docs/commands.md", None))
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s+(?P<reason>.*?)\s*-->")
FENCE = re.compile(r"^(?P<fence>```+|~~~+)\s*(?P<info>[\w-]*)")
SHELL = ("sh", "bash", "shell")
LINK = re.compile(r"\]\((?P<target>[^)\s#]+)(?:#[^)\s]*)?\)")
FIRST = "make train"  # what a fresh clone runs first
# Added to each training, baseline and pretraining command: seconds a run.
TINY = ["data.source.n_cells=480", "data.source.n_genes=300", "data.batch_size=32", "model.tokenizer.input_size=128",
        "trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "logger=csv",
        "callbacks.progress_bar=null"]
TINY_ENCODER = ["model.encoder.hidden_size=32", "model.encoder.intermediate_size=64",
                "model.encoder.num_attention_heads=2"]
TINY_SWEEP = ["hydra.sweeper.n_trials=2"]
TINY_SYNTH = ["--cells", "480", "--genes", "300"]
# The installed Hydra commands, run as their modules with this interpreter (a console script would import the
# installed package, not the copy's), and the top-level script each stands for.
INSTALLED = {"geneformer-colon-train": "geneformer_colon.cli.train",
             "geneformer-colon-eval": "geneformer_colon.cli.evaluate",
             "geneformer-colon-baseline": "geneformer_colon.cli.baseline",
             "geneformer-colon-pretrain": "geneformer_colon.cli.pretrain"}
TRAINING = ("train.py", "baseline.py", "pretrain.py", "geneformer_colon.cli.train", "geneformer_colon.cli.baseline",
            "geneformer_colon.cli.pretrain")


@dataclass(frozen=True)
class Block:
    source: str
    line: int
    section: str
    commands: list[str]
    skip: str | None


def command_blocks(text: str, source: str = "README.md") -> list[Block]:
    """Every command block of a Markdown file with its section, its commands (continuations joined, comments
    dropped) and the reason it is skipped, if marked."""
    blocks, section, skip, current, start, fence, shell = [], "", None, [], 0, "", False

    def close() -> None:
        nonlocal current, skip
        if current:
            blocks.append(Block(source, start, section, commands_of(current), skip))
            current, skip = [], None

    for number, line in enumerate([*text.splitlines(), ""], start=1):
        if fence:  # inside a fenced block: its lines are commands if it is a shell block
            if line.strip().startswith(fence):
                if shell:
                    close()
                else:  # a block of text or code: a skip marker before it meant it
                    skip = None
                fence = ""
            elif shell:
                start = start or number
                current.append(line)
            continue
        if (opened := FENCE.match(line.strip())) is not None and not line.startswith("    "):
            close()
            fence, shell, start = opened.group("fence"), opened.group("info") in SHELL, 0
            continue
        if line.startswith("    ") and line.strip():
            if not current:
                start = number
            current.append(line[4:])
            continue
        close()
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


def walked_blocks(root: Path) -> list[Block]:
    """The blocks the walk runs, file after file, in the files' order."""
    return [block for name, sections in WALKED for block in command_blocks((root / name).read_text(), name)
            if sections is None or block.section in sections]


def runnable(command: str, python: str) -> str:
    """The command as the test runs it: this interpreter, tiny settings appended."""
    words = shlex.split(command)
    if words[:2] == ["make", "train"]:
        words = ["python", "train.py", "experiment=colon6", *words[2:]]
    if words[0] == "geneformer-colon":
        words = ["python", "-m", "geneformer_colon", *words[1:]]
    if words[0] in INSTALLED:
        words = ["python", "-m", INSTALLED[words[0]], *words[1:]]
    if words[0] == "make":
        return shlex.join([*words, f"BIN={Path(python).parent}", "STAMP="])
    if words[0] == "python":
        words[0] = python
        script = words[2] if words[1] == "-m" else words[1]
        if script in TRAINING:
            words += TINY + ([] if any(w.startswith("model=") for w in words) else TINY_ENCODER)
            words += TINY_SWEEP if "sweep=optuna" in words else []
        if words[1:4] == ["-m", "geneformer_colon", "synth"]:
            words += TINY_SYNTH
    return shlex.join(words)


def test_blocks_are_found_with_their_sections_and_skip_reasons():
    readme = command_blocks((REPO_ROOT / "README.md").read_text())
    commands = [block for block in readme if block.section == "Commands"]
    assert commands[0].skip is None and commands[0].commands[0].startswith("python train.py experiment=colon6 ")
    assert any(block.skip and "Geneformer clone" in block.skip for block in commands)
    listed = command_blocks((REPO_ROOT / "docs/commands.md").read_text(), "docs/commands.md")
    assert listed[0].commands[0] == "python train.py experiment=colon6 overwrite=true" and listed[0].skip is None
    assert any(block.skip and "Geneformer clone" in block.skip for block in listed)
    assert any(" --fold KUL01 " in command for block in listed for command in block.commands)  # a continuation
    assert any(command.startswith("geneformer-colon-train ") for block in listed for command in block.commands)


def test_fenced_and_indented_blocks_are_read_alike():
    text = "\n".join(["## A", "", "```sh", "python a.py \\", "  x=1   # note", "```", "", "    python b.py", "",
                      "<!-- readme-test: skip slow -->", "", "```bash", "make slow", "```", "", "```python",
                      "print('not a command')", "```", "", "```text", "    python not-a-command.py", "```"])
    blocks = command_blocks(text)
    assert [(block.section, block.commands, block.skip) for block in blocks] == [
        ("A", ["python a.py x=1"], None), ("A", ["python b.py"], None), ("A", ["make slow"], "slow")]


def test_the_installed_commands_run_as_their_modules():
    python = sys.executable
    assert runnable("geneformer-colon-train experiment=colon6", python).startswith(
        shlex.join([python, "-m", "geneformer_colon.cli.train", "experiment=colon6", *TINY]))
    assert runnable("geneformer-colon export a b", python) == shlex.join([python, "-m", "geneformer_colon",
                                                                          "export", "a", "b"])


def test_the_readmes_links_lead_to_files():
    """The README's relative links (its docs pages) exist; the docs' own links are checked by `make docs`."""
    text = (REPO_ROOT / "README.md").read_text()
    targets = [match.group("target") for match in LINK.finditer(text) if "://" not in match.group("target")]
    assert targets and [target for target in targets if not (REPO_ROOT / target).exists()] == []


def files_of_a_checkout(root: Path) -> list[str]:
    """The files a clone would hold: tracked ones and those not yet added but not ignored (a page being written)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, text=True, check=True).stdout
    return sorted(set(listed.splitlines()))


@pytest.mark.slow
def test_the_readme_runs_top_to_bottom(tmp_path):
    copy = tmp_path / "clone"
    for name in files_of_a_checkout(REPO_ROOT):
        if (REPO_ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, copy / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done: set[str] = set()
    for block in [Block("README.md", 0, "Quick start", [FIRST], None), *walked_blocks(copy)]:
        where = f"{block.source} line {block.line}"
        if block.skip:
            warnings.warn(f"{where}: block not run: {block.skip}", stacklevel=1)
            continue
        for command in block.commands:
            if command in done:  # the same command again (the README's, in the full list): it ran already
                continue
            print(f"{where}: {command}", flush=True)  # progress, with -s
            result = subprocess.run(runnable(command, sys.executable), shell=True, cwd=copy, env=env,
                                    capture_output=True, text=True, timeout=900, check=False)
            assert result.returncode == 0, f"{where}: {command}\n{result.stderr[-3000:]}"
            done.add(command)
