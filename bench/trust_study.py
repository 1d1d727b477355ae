"""The trust study: which calls to trust on a new donor. colon6 under ``cv=lodo`` with several seeds and
``calibration=temperature`` on the embedded cohort; one table (``make trust-study``).

    python bench/trust_study.py [--seeds 0 1 2] [--folds KUL19 KUL01] [--jobs 2] [--out outputs/trust-study]
                                [-- key=value ...]

One ``train.py`` process a test donor (``--jobs`` at a time, one thread each), at the donor-shift study's size
(``bench/donor_shift_study.py``: 1200 cells, 3 epochs). Each fold's run keeps its raw probabilities
(``predictions/<split>.csv``) beside its temperature (``calibration.json``), so one training gives the figures
without and with temperature scaling. For each test donor, the mean (and sd) over the seeds of: accuracy; ECE
and NLL before and after temperature scaling; the error rate of the 20% least confident cells against that of
the rest, and the share of all errors they hold (20% if errors ignored confidence); the AURC against the error
rate (a confidence that ranks nothing has an AURC equal to it); the largest coverage at which the donor's
surest cells are as accurate as KUL01's cells all together (the same seed); the coverage a threshold chosen
to keep 80% of the fold's validation donor's cells keeps of the test donor (``predict --abstain 0.8``), and the
accuracy there; the conformal sets' coverage and mean size at alpha 0.1 (class-conditional, calibrated on the
validation donor's cells) without and with temperature scaling. The table goes to ``<out>/trust-study.md``
(and the console), the figures to ``<out>/trust-study.json``; run again, it goes on where it stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/tokenize.py shadows the standard library's `tokenize`: this folder goes last on the module path.
sys.path = [entry for entry in sys.path if entry not in ("", str(Path(__file__).parent))] + [str(Path(__file__).parent)]

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from typing import Any  # noqa: E402

import donor_shift_study  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from geneformer_colon.assembly.trust import RunTrust  # noqa: E402
from geneformer_colon.common.io import read_json  # noqa: E402
from geneformer_colon.common.text_tables import markdown_table  # noqa: E402
from geneformer_colon.model.calibration import calibration_figures  # noqa: E402
from geneformer_colon.model.conformal import ConformalSets, set_figures  # noqa: E402
from geneformer_colon.model.uncertainty import aurc, risk_coverage, threshold_for  # noqa: E402
from geneformer_colon.runs.layout import RunLayout  # noqa: E402

REFERENCE_DONOR = "KUL01"
DONORS = ["KUL01", "KUL19", "KUL21", "KUL28", "KUL30", "KUL31"]
RUN_NAME = "colon6-temperature"
ALPHA, LOW_SHARE, ABSTAIN = 0.1, 0.2, 0.8


def train_fold(out: Path, donor: str, seeds: list[int], sized: list[str], tail: list[str]) -> float:
    """One test donor's fold with every seed (``resume=true``: a finished seed is kept); its wall time."""
    return donor_shift_study.run_logged(
        donor_shift_study.command("train.py", "experiment=colon6", "cv=lodo", f"cv.folds=[{donor}]",
                                  f"cv.seeds=[{','.join(map(str, seeds))}]", "calibration=temperature",
                                  f"paths.output_dir={out}", f"run_name={RUN_NAME}", "resume=true", *sized, *tail),
        out / "logs" / f"{donor}.log")


def split_cells(layout: RunLayout, split: str, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A split's raw probabilities and true class indices, from its prediction file."""
    table = pd.read_csv(layout.prediction_file(split))
    return table[[f"prob_{name}" for name in classes]].to_numpy(), table["true"].map(
        {name: i for i, name in enumerate(classes)}).to_numpy()


def seed_figures(layout: RunLayout, reference_accuracy: float | None) -> dict[str, Any]:
    """One fold and seed's figures (see the module docstring)."""
    metrics = read_json(layout.metrics)
    classes = [key.split("/", 1)[1] for key in metrics["test"] if key.startswith("recall/")]
    trust = RunTrust.load(layout.root)
    val, val_targets = split_cells(layout, "val", classes)
    test, targets = split_cells(layout, "test", classes)
    calibrated = trust.calibration.apply(test)
    confidence = 1 - calibrated.max(axis=1)  # temperature scaling keeps the order of the raw probabilities
    correct = calibrated.argmax(axis=1) == targets
    low = np.argsort(confidence, kind="stable")[int(round((1 - LOW_SHARE) * len(targets))):]
    rest = np.setdiff1d(np.arange(len(targets)), low)
    coverage, risk = risk_coverage(correct, confidence)
    reaching = coverage[1 - risk >= reference_accuracy - 1e-9] if reference_accuracy is not None else np.array([])
    kept = confidence <= threshold_for(ABSTAIN, 1 - trust.calibration.apply(val).max(axis=1))
    before, after = calibration_figures(test, targets), calibration_figures(calibrated, targets)
    conformal = {name: set_figures(ConformalSets(trust.calibration.apply(val) if name == "temperature" else val,
                                                 val_targets).sets(probabilities, ALPHA), targets, ALPHA)
                 for name, probabilities in (("raw", test), ("temperature", calibrated))}
    errors = max(int((~correct).sum()), 1)
    return {
        "temperature": trust.calibration.temperature, "accuracy": float(correct.mean()),
        "ece_raw": before["ece"], "ece_temperature": after["ece"], "nll_raw": before["nll"],
        "nll_temperature": after["nll"],
        "error_low_20": float(1 - correct[low].mean()), "error_rest": float(1 - correct[rest].mean()),
        "errors_in_low_20": float((~correct[low]).sum() / errors), "aurc": aurc(correct, confidence),
        "error_rate": float(1 - correct.mean()),
        "coverage_at_reference_accuracy": float(reaching.max()) if len(reaching) else 0.0,
        "abstain_coverage": float(kept.mean()), "abstain_accuracy": float(correct[kept].mean()) if kept.any() else None,
        "conformal_coverage_raw": conformal["raw"]["coverage"], "set_size_raw": conformal["raw"]["mean_set_size"],
        "conformal_coverage_temperature": conformal["temperature"]["coverage"],
        "set_size_temperature": conformal["temperature"]["mean_set_size"],
    }


def donor_figures(out: Path, donors: list[str], seeds: list[int]) -> dict[str, dict[str, list[float]]]:
    """Each finished test donor's figures, a list over the seeds."""
    parent = RunLayout(out / RUN_NAME)
    finished = {donor for donor in donors
                if all(read_json(parent.fold(donor, seed).metrics).get("status") == "finished" for seed in seeds)}
    reference = {seed: split_accuracy(parent.fold(REFERENCE_DONOR, seed)) for seed in seeds} \
        if REFERENCE_DONOR in finished else {}
    figures: dict[str, dict[str, list[float]]] = {}
    for donor in donors:
        if donor in finished:
            for seed in seeds:
                for key, value in seed_figures(parent.fold(donor, seed), reference.get(seed)).items():
                    figures.setdefault(donor, {}).setdefault(key, []).append(value)
    return figures


def split_accuracy(layout: RunLayout) -> float:
    return float(read_json(layout.metrics)["test"]["accuracy"])


def shown(values: list[float | None], digits: int = 3) -> str:
    present = [value for value in values if value is not None]
    if not present:
        return "-"
    sd = f" ± {np.std(present, ddof=1):.{digits}f}" if len(present) > 1 else ""
    return f"{np.mean(present):.{digits}f}{sd}"


COLUMNS = [  # title, figure keys joined by " / "
    ("accuracy", ["accuracy"]),
    ("ECE raw / temperature", ["ece_raw", "ece_temperature"]),
    ("NLL raw / temperature", ["nll_raw", "nll_temperature"]),
    ("error: least sure 20% / rest", ["error_low_20", "error_rest"]),
    ("share of errors in least sure 20%", ["errors_in_low_20"]),
    ("AURC / error rate", ["aurc", "error_rate"]),
    (f"coverage keeping {REFERENCE_DONOR}'s accuracy", ["coverage_at_reference_accuracy"]),
    ("--abstain 0.8: coverage / accuracy", ["abstain_coverage", "abstain_accuracy"]),
    ("conformal coverage raw / temperature (alpha 0.1)", ["conformal_coverage_raw", "conformal_coverage_temperature"]),
    ("set size raw / temperature", ["set_size_raw", "set_size_temperature"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/trust-study")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--folds", nargs="+", default=DONORS, help="test donors (default: every donor)")
    parser.add_argument("--jobs", type=int, default=2, help="train.py processes at a time (one thread each)")
    parser.add_argument("--cells", type=int, default=1200, help="cells of the embedded cohort")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--table-only", action="store_true", help="no training: the table of the folds done")
    parser.add_argument("overrides", nargs="*", help="after --: more overrides for every train.py")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    start = time.monotonic()
    seconds: dict[str, float] = {}
    if not args.table_only:
        sized = donor_shift_study.size(args.cells, args.epochs)
        with ThreadPoolExecutor(args.jobs) as pool:
            for donor, took in zip(args.folds, pool.map(
                    lambda donor: train_fold(out, donor, args.seeds, sized, args.overrides), args.folds)):
                seconds[donor] = took
    figures = donor_figures(out, args.folds, args.seeds)
    rows = [[donor, *(" / ".join(shown(figures[donor][key]) for key in keys) for _, keys in COLUMNS),
             f"{seconds[donor] / 60:.1f} min" if donor in seconds else "-"] for donor in args.folds if donor in figures]
    total = "" if args.table_only else f", {(time.monotonic() - start) / 60:.1f} min in all"
    table = (f"# Trust study: colon6, cv=lodo, calibration=temperature, {args.cells} cells, {args.epochs} epochs, "
             f"seeds {args.seeds}, {args.jobs} jobs at a time{total}"
             + (f"; overrides {' '.join(args.overrides)}" if args.overrides else "")
             + "\n\nMean ± sd over the seeds, each test donor's cells (its fold validated on the next donor).\n\n"
             + markdown_table(["test donor", *(title for title, _ in COLUMNS), "wall time (fold, all seeds)"], rows))
    (out / "trust-study.md").write_text(table)
    (out / "trust-study.json").write_text(json.dumps(figures, indent=1) + "\n")
    print(table)


if __name__ == "__main__":
    main()
