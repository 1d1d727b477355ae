"""The baseline study: colon6 and every baseline under ``cv=lodo`` with several seeds, on the donor-shift study's
two settings of the embedded cohort; one table (``make baseline-study``).

    python bench/baseline_study.py [--seeds 0 1 2] [--jobs 2] [--out outputs/donor-shift-study] [-- key=value ...]

Is fine-tuning worth it here? Each baseline (``baseline.py``) is scored on exactly colon6's cells, donors, seeds
and metrics, and paired with colon6 donor by donor: naive Bayes, CellTypist's logistic regression, PCA + kNN,
scANVI mapping the held-out donors (``scanvi``) or holding their cells unlabelled (``scanvi_transductive``), and
a logistic-regression probe of frozen embeddings: of the random encoder colon6 starts from (``frozen_probe``)
and of the setting's pretrained checkpoint (``frozen_probe_pretrained``). It is the donor-shift study
(``bench/donor_shift_study.py``: its settings, sizes, options and table) with these recipes, written into the
same folder by default, so colon6's runs and the pretrained checkpoints of a donor-shift study of the same size
are reused rather than trained again. The table goes to ``<out>/baseline-study.md`` and the console. Run again,
it goes on where it stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/tokenize.py shadows the standard library's `tokenize`: this folder goes last on the module path.
sys.path = [entry for entry in sys.path if entry not in ("", str(Path(__file__).parent))] + [str(Path(__file__).parent)]

import donor_shift_study  # noqa: E402

RECIPES = {
    "colon6": donor_shift_study.RECIPES["colon6"],
    "naive_bayes": ["baseline=naive_bayes"],
    "logreg": ["baseline=logreg"],
    "pca_knn": ["baseline=pca_knn"],
    "scanvi": ["baseline=scanvi"],
    "scanvi_transductive": ["baseline=scanvi", "baseline.transductive=true"],
    "frozen_probe": ["baseline=frozen_probe"],
    "frozen_probe_pretrained": ["baseline=frozen_probe", "model=pretrained"],
}
SCRIPTS = {recipe: "baseline.py" for recipe in RECIPES if recipe != "colon6"}

if __name__ == "__main__":
    donor_shift_study.main(__doc__, RECIPES, SCRIPTS, {"frozen_probe_pretrained"}, "baseline-study.md",
                           "Baseline study")
