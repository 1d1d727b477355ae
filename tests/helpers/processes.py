"""The repository's scripts run as a user runs them: in a subprocess, from the repository's root."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from helpers.paths import HELPERS, REPO_ROOT


def run_script(script: str, *arguments: str, wait: bool = True, timeout: int = 600, **kwargs):
    """``python <script> <arguments>`` in the repository, with tests/helpers importable (for test callbacks).

    ``wait``: the finished process (output captured), else the running Popen (output to a log file).
    """
    env = {**os.environ, "PYTHONPATH": str(HELPERS)}
    command = [sys.executable, script, *arguments]
    if wait:
        return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env,
                              check=False, **kwargs)
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, text=True, **kwargs)


def one_error_line(output: str) -> str:
    """The one line of a refused command's output, which starts ``error: `` (asserted)."""
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output[-2000:]
    return lines[0]


def pause_at(marker: Path, epoch: int = 1, batch: int = 4) -> list[str]:
    """Overrides that add pause.PauseAtStep: the run writes ``marker`` at that step and waits for
    ``<marker>.sent``."""
    return ["+callbacks.pause._target_=pause.PauseAtStep", f"+callbacks.pause.epoch={epoch}",
            f"+callbacks.pause.batch={batch}", f"+callbacks.pause.marker={marker}"]


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    """Until ``path`` exists (the run reached its pause), asserting that ``process`` still runs."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the run ended before reaching the pause (exit {process.returncode})"
        assert time.monotonic() < deadline, "the run never reached the pause"
        time.sleep(0.1)


def signal_at_pause(process: subprocess.Popen, marker: Path, signum: int, log: Path, timeout: float = 300) -> str:
    """Once ``process`` reached its pause (``marker``), send it ``signum`` and let it go on; assert it ended with
    128 + ``signum``; its log."""
    wait_for(marker, process, timeout)
    process.send_signal(signum)
    marker.with_name(marker.name + ".sent").touch()
    assert process.wait(timeout=timeout) == 128 + signum, log.read_text()[-3000:]
    return log.read_text()
