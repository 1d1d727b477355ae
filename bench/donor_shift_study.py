"""The donor-shift study: colon6 under ``cv=lodo`` with several seeds, alone and with each donor-robust
strategy, on the embedded cohort at two kinds of donor shift; one table (``make donor-shift-study``).

    python bench/donor_shift_study.py [--seeds 0 1 2] [--jobs 2] [--out outputs/donor-shift-study] [-- key=value ...]

Settings: ``shift1`` is the embedded cohort at ``donor_shift`` 1 (KUL19 shifted on every axis,
its tumour programme mostly its own); ``technical`` keeps only the batch effects and depth
(``data.source.donor_effects=[batch_sigma,depth,marker_batch]``: no field effect, no private
tumour programme), a shift a robust method should be able to correct. ``pretrained`` (all weights) and
``lora`` (adapters) fine-tune a checkpoint ``pretrain.py`` made on each setting's cells (every donor but
KUL19, no labels). Each recipe runs as
one ``train.py`` process with one thread (``--jobs`` of them at a time); the table goes to
``<out>/study.md`` and the console. Run again, it goes on where it stopped (``resume=true``: finished
folds are kept, an interrupted one resumes); remove ``<out>`` to start afresh. Overrides after ``--`` go
to every ``train.py`` and ``pretrain.py`` run (last, so they win: ``paths.data_dir=...``, a smaller model).
"""

from __future__ import annotations

import sys

# bench/tokenize.py shadows the standard library's `tokenize`: take this folder off the module path first.
sys.path = [entry for entry in sys.path if entry not in ("", __file__.rsplit("/", 1)[0])]

import argparse  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

from geneformer_colon.common.names import TEST  # noqa: E402
from geneformer_colon.common.text_tables import markdown_table  # noqa: E402
from geneformer_colon.report.compare import paired_comparisons  # noqa: E402
from geneformer_colon.report.cv_summary import seed_sd  # noqa: E402
from geneformer_colon.runs.reading import read_run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HARD_DONOR = "KUL19"


def size(cells: int, epochs: int) -> list[str]:
    """A cohort and model small enough for 2 CPU cores (the README states them with the figures)."""
    return [f"data.source.n_cells={cells}", "data.source.n_genes=500", "model.tokenizer.input_size=256",
            f"trainer.max_epochs={epochs}", "optimizer.lr=3e-3", "logger=csv", "callbacks.progress_bar=null"]


SETTINGS = {
    "shift1": [],
    "technical": ["data.source.donor_effects=[batch_sigma,depth,marker_batch]"],
}
RECIPES = {
    "colon6": [],
    "group_dro": ["robust=group_dro", "robust.step_size=0.1"],
    "donor_adversary": ["robust=donor_adversary", "robust.weight=0.1"],
    "coral": ["robust=coral", "robust.weight=0.01"],
    "mixup_across_donors": ["augment.mixup_prob=0.3", "augment.mixup_across_donors=true"],
    "pretrained": ["model=pretrained"],
    "lora": ["model=pretrained", "model.lora.r=8", "model.lora.alpha=16"],
}
PRETRAINED = {"pretrained", "lora"}


def command(script: str, *overrides: str) -> list[str]:
    return [sys.executable, str(REPO / script), *overrides]


def run_logged(arguments: list[str], log: Path) -> float:
    """Run a process with one thread, its output to ``log``; its wall time in seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    with open(log, "w") as out:
        done = subprocess.run(arguments, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(arguments)} failed (exit {done.returncode}); see {log}")
    return time.monotonic() - start


def pretrain(out: Path, setting: str, sized: list[str], tail: list[str]) -> Path:
    """A tiny masked-gene checkpoint of the setting's cohort: <out>/<setting>/pretrain/hf (kept when there)."""
    run_name = f"{setting}/pretrain"
    if (out / run_name / "hf" / "config.json").is_file():
        return out / run_name / "hf"
    run_logged(command("pretrain.py", f"paths.output_dir={out}", f"run_name={run_name}", "overwrite=true",
                       *[o for o in sized if not o.startswith("optimizer.")], *SETTINGS[setting], *tail),
               out / "logs" / f"{setting}-pretrain.log")
    return out / run_name / "hf"


def seconds_file(out: Path, setting: str, recipe: str) -> Path:
    return out / "logs" / f"{setting}-{recipe}.seconds"


def train_recipe(out: Path, setting: str, recipe: str, seeds: list[int], checkpoint: Path | None, sized: list[str],
                 tail: list[str], recipes: dict[str, list[str]] = RECIPES, script: str = "train.py",
                 pretrained: set[str] = PRETRAINED) -> None:
    """One recipe of ``recipes`` under cv=lodo (``sized`` may name some folds: cv.folds) with the seeds, ``tail``
    last, run by ``script`` (``baseline.py``: a baseline); its wall time added to the time its earlier invocations
    took."""
    extra = [f"model.encoder.pretrained={checkpoint}"] if recipe in pretrained else []
    seconds = run_logged(command(script, "experiment=colon6", "cv=lodo", f"cv.seeds=[{','.join(map(str, seeds))}]",
                              f"paths.output_dir={out}", f"run_name={setting}/{recipe}", "resume=true", *sized,
                              *SETTINGS[setting], *recipes[recipe], *extra, *tail),
                         out / "logs" / f"{setting}-{recipe}.log")
    timed = seconds_file(out, setting, recipe)
    earlier = float(timed.read_text()) if timed.is_file() else 0.0
    timed.write_text(f"{earlier + seconds:.0f}\n")


def recipe_row(out: Path, setting: str, recipe: str, kept_donor: str | None = None) -> list[object]:
    """Mean and worst-donor test macro F1, KUL19's F1 and Tumor recall (and ``kept_donor``'s F1), the paired
    comparison with colon6, wall time."""
    run, plain = read_run(out / setting / recipe), read_run(out / setting / "colon6")
    aggregate = run.cv["aggregate"][TEST]["macro_f1"]
    folds = {fold["test_donor"]: fold for fold in run.cv["folds"]}
    worst = min(folds.values(), key=lambda fold: fold[TEST]["macro_f1"])
    sd = seed_sd(worst)
    interval = f"[{aggregate['ci95'][0]:.3f}, {aggregate['ci95'][1]:.3f}]" if aggregate["ci95"] else "-"
    hard = folds.get(HARD_DONOR, {}).get(TEST, {})
    paired = "-"
    if recipe != "colon6":
        (pair,) = paired_comparisons([plain, run], ["colon6", recipe])
        p, _ = pair.test()
        within = pair.within_seed_noise()
        within = "" if within is None else f"; {within}/{len(pair.donors)} within seed noise"
        paired = f"{pair.differences.mean():+.3f} (p {p:.2f}{within})" if p is not None else "+0.000"
    return [setting, recipe, f"{aggregate['mean']:.3f} {interval} ({aggregate['n']} donors)",
            f"{worst[TEST]['macro_f1']:.3f} ({worst['test_donor']}{f', seed sd {sd:.3f}' if sd is not None else ''})",
            hard.get("macro_f1"), hard.get("recall/Tumor"),
            *([folds.get(kept_donor, {}).get(TEST, {}).get("macro_f1")] if kept_donor else []), paired,
            f"{int(timed.read_text()) / 60:.1f} min"
            if (timed := seconds_file(out, setting, recipe)).is_file() else "-"]


def main(description: str = __doc__, recipes: dict[str, list[str]] = RECIPES, scripts: dict[str, str] | None = None,
         pretrained: set[str] = PRETRAINED, table_file: str = "study.md", title: str = "Donor-shift study",
         kept_donor: str | None = None, default_out: str = "outputs/donor-shift-study") -> None:
    """The study of ``recipes`` (each run by ``train.py`` unless ``scripts`` names another), its table in
    ``<out>/<table_file>`` (``--out``, ``default_out`` when not given); ``pretrained``: the recipes that start from
    the setting's pretrained checkpoint; ``kept_donor``: a donor whose test macro F1 gets a column of its own."""
    scripts = scripts or {}
    parser = argparse.ArgumentParser(description=description.split("\n\n")[0])
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--recipes", nargs="+", default=list(recipes), choices=list(recipes))
    parser.add_argument("--jobs", type=int, default=2, help="train.py processes at a time (one thread each)")
    parser.add_argument("--cells", type=int, default=1200, help="cells of the embedded cohort")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--folds", nargs="+", help="only these test donors (default: every donor)")
    parser.add_argument("--table-only", action="store_true", help="no training: the table of the recipes done")
    parser.add_argument("overrides", nargs="*", help="after --: more overrides for every train.py and pretrain.py")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    sized = size(args.cells, args.epochs)
    folds = [f"cv.folds=[{','.join(args.folds)}]"] if args.folds else []
    chosen = ["colon6", *[recipe for recipe in args.recipes if recipe != "colon6"]]
    start = time.monotonic()
    tasks = [(setting, recipe) for recipe in chosen for setting in args.settings]
    if not args.table_only:
        checkpoints = {setting: pretrain(out, setting, sized, args.overrides) if pretrained & set(chosen) else None
                       for setting in args.settings}
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda task: train_recipe(out, *task, args.seeds, checkpoints[task[0]], sized + folds,
                                                       args.overrides, recipes, scripts.get(task[1], "train.py"),
                                                       pretrained),
                          tasks))
    rows = [recipe_row(out, setting, recipe, kept_donor) for setting, recipe in tasks
            if read_run(out / setting / recipe).cv.get("folds") and read_run(out / setting / "colon6").cv]
    headers = ["setting", "recipe", "test macro F1, mean over donors [95% CI]", "worst donor",
               f"{HARD_DONOR} macro F1", f"{HARD_DONOR} Tumor recall",
               *([f"{kept_donor} macro F1"] if kept_donor else []), "vs colon6 (mean diff, Wilcoxon p)", "wall time"]
    total = "" if args.table_only else f", {(time.monotonic() - start) / 60:.1f} min in all"
    table = (f"# {title}: {args.cells} cells, {args.epochs} epochs, seeds {args.seeds}, test donors "
             f"{', '.join(args.folds or ['all'])}, {args.jobs} jobs at a time{total}"
             + (f"; overrides {' '.join(args.overrides)}" if args.overrides else "") + "\n\n"
             + markdown_table(headers, rows))
    (out / table_file).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
