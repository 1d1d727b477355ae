"""How many CPU threads torch uses (cpus.py): the CPUs this process may use, SLURM's share, the variables that
override them, and one line for a bad value."""

from __future__ import annotations

import os

import pytest

from geneformer_colon.common.cpus import THREADS_ENV, chosen_threads
from geneformer_colon.common.errors import InputError


def test_threads_fit_the_cpus_the_process_may_use(monkeypatch):
    for name in (THREADS_ENV, "OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(name, raising=False)
    assert chosen_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert chosen_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv(THREADS_ENV, "5")
    assert chosen_threads() == 5 and chosen_threads(2) == 2
    monkeypatch.setenv(THREADS_ENV, "many")
    with pytest.raises(InputError, match=r"\$GENEFORMER_COLON_THREADS is 'many'"):
        chosen_threads()
    with pytest.raises(InputError, match="threads: 0"):
        chosen_threads(0)
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # set as the package is imported (the tests do not set it)
