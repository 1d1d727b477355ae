"""Fine-tune Geneformer to classify colorectal-cancer cells as Normal, Border or Tumor."""

import os

# OpenMP threads that wait for work sleep instead of spinning: on a busy node spinning threads take the
# CPUs the working ones need (see geneformer_colon/cpus.py). Read once, when torch starts OpenMP, so it is
# set here, before any module imports torch; OMP_WAIT_POLICY=ACTIVE in the environment still wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
