"""The Hydra apps (hydra_app.py) as a user runs them: a bad command line, or a value only the job checks, is one line
and exit 2, and no run directory is written."""

from __future__ import annotations

import pytest
from helpers.processes import one_error_line, run_script
from helpers.tiny import tiny_overrides


@pytest.mark.slow  # many processes: run by make test-slow (CI too)
def test_bad_command_lines_and_a_late_check_write_nothing(tmp_path, shared_dirs):
    outputs = tmp_path / "outputs"
    common = tiny_overrides(outputs, shared_dirs)
    for script, argument in (("train.py", "+optimizer.lrr=1"), ("pretrain.py", "data.val_donors=[]")):
        result = run_script(script, *common, argument)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr and one_error_line(result.stderr)
        assert not [path for path in outputs.glob("*") if not path.name.startswith(".")]  # no run directory
