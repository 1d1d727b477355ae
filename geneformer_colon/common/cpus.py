"""How many CPU threads torch uses: the CPUs this process may run on, not the machine's.

On a shared node or in a SLURM allocation smaller than the machine, one thread a core of the machine
(or OpenMP threads spinning while they wait) makes every step wait for threads that get no CPU: an
epoch took 11x longer at load 5 on two cores. So torch's intra-op threads are the CPUs the process
may use (its affinity, and SLURM's ``cpus_per_task`` where set), and OpenMP's wait policy is passive
(set in the package's ``__init__``, before torch starts OpenMP).
"""

from __future__ import annotations

import os
import sys

from geneformer_colon.common.errors import InputError

# Overrides the CPUs found; a run's config key ``threads`` overrides this in turn.
THREADS_ENV = "GENEFORMER_COLON_THREADS"


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity, at most SLURM's ``cpus_per_task``."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        cpus = min(cpus, int(slurm))
    return max(cpus, 1)


def chosen_threads(requested: int | None = None) -> int:
    """``requested`` (the config's ``threads``), else $GENEFORMER_COLON_THREADS, else $OMP_NUM_THREADS, else
    the CPUs available."""
    if requested is None:
        for name in (THREADS_ENV, "OMP_NUM_THREADS"):
            value = os.environ.get(name, "").strip()
            if value:
                if not value.isdigit() or int(value) < 1:
                    raise InputError(f"${name} is {value!r}; set it to a number of threads >= 1, or unset it")
                return int(value)
        return available_cpus()
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise InputError(f"threads: {requested!r}; give a number of threads >= 1, or null for the CPUs available")
    return requested


def use_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads (see :func:`chosen_threads`); return how many. Torch not imported yet (a
    command that may not need it): $OMP_NUM_THREADS, which torch reads as it starts."""
    threads = chosen_threads(requested)
    torch = sys.modules.get("torch")
    if torch is None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    elif torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
