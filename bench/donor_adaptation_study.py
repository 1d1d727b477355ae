"""The donor-adaptation study: colon6 and each ``adapt`` method (adapting to the test donor's unlabelled cells)
under ``cv=lodo`` with several seeds, on the donor-shift study's two settings of the embedded cohort, and scANVI
holding the held-out donors' cells unlabelled in its model (``baseline=scanvi baseline.transductive=true``); one
table (``make donor-adaptation-study``).

    python bench/donor_adaptation_study.py [--seeds 0 1 2] [--jobs 2] [--out outputs/donor-adaptation-study]
                                           [-- key=value ...]

It is the donor-shift study (``bench/donor_shift_study.py``: its settings, sizes, options and table, with
KUL01's macro F1 as a column of its own: the log's goal is KUL19's Tumor recall up without KUL01 down) with
these recipes, each method at its ``conf/adapt/<name>.yaml`` defaults, in a folder of its own. The table goes to
``<out>/adaptation-study.md`` and the console. Run again, it goes on where it stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/tokenize.py shadows the standard library's `tokenize`: this folder goes last on the module path.
sys.path = [entry for entry in sys.path if entry not in ("", str(Path(__file__).parent))] + [str(Path(__file__).parent)]

import donor_shift_study  # noqa: E402

RECIPES = {
    "colon6": donor_shift_study.RECIPES["colon6"],
    "mlm": ["adapt=mlm"],
    "self_training": ["adapt=self_training"],
    "dann": ["adapt=dann"],
    "tent": ["adapt=tent"],
    "scanvi_transductive": ["baseline=scanvi", "baseline.transductive=true"],
}

if __name__ == "__main__":
    donor_shift_study.main(__doc__, RECIPES, {"scanvi_transductive": "baseline.py"}, set(), "adaptation-study.md",
                           "Donor-adaptation study", kept_donor="KUL01", default_out="outputs/donor-adaptation-study")
