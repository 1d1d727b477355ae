"""The Hydra apps (hydra_app.py) as a user runs them: a bad command line, or a value only the job checks, is one line
and exit 2, and no run directory is written; ``threads=N`` sets torch's CPU threads for the job."""

from __future__ import annotations

import pytest
import torch
from helpers.processes import one_error_line, run_script
from helpers.tiny import tiny_overrides
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from geneformer_colon.cli.hydra_app import run_job
from geneformer_colon.common.errors import InputError
from geneformer_colon.runs.config import CONF_DIR


@pytest.mark.slow  # many processes: run by make test-slow (CI too)
def test_bad_command_lines_and_a_late_check_write_nothing(tmp_path, shared_dirs):
    outputs = tmp_path / "outputs"
    common = tiny_overrides(outputs, shared_dirs)
    for script, argument in (("train.py", "+optimizer.lrr=1"), ("pretrain.py", "data.val_donors=[]")):
        result = run_script(script, *common, argument)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr and one_error_line(result.stderr)
        assert not [path for path in outputs.glob("*") if not path.name.startswith(".")]  # no run directory


def test_threads_sets_torchs_cpu_threads_for_the_job(tmp_path, shared_dirs):
    def job_config(threads: int):
        """The train config of ``threads=N`` as Hydra hands it to a job in ``tmp_path/run``."""
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=[*tiny_overrides(tmp_path, shared_dirs), f"threads={threads}"],
                          return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        HydraConfig.instance().set_config(cfg)
        return cfg

    seen = []

    def job(cfg) -> dict:
        seen.append(torch.get_num_threads())
        return {"val": {"macro_f1": 0.5}}

    before = torch.get_num_threads()
    wanted = before + 2
    try:
        assert run_job(job, job_config(wanted)) == 0.5
        assert seen == [wanted]
        with pytest.raises(InputError, match="threads: 0; give a number of threads >= 1"):
            run_job(job, job_config(0))
        assert seen == [wanted]  # refused before the job ran
    finally:
        torch.set_num_threads(before)
        HydraConfig.instance().cfg = None
