"""The paths of one run directory (:class:`RunLayout`): every module names a run's files through it::

    outputs/<run_name>/
      config.yaml                 the resolved config
      metrics.json                what the run did and scored (runs.record.run_record)
      checkpoints/best.ckpt       best val macro F1; last.ckpt: the latest state (resume=true)
      predictions/<split>.csv     cell id, donor, cell type, true, predicted, a probability a class
      plots/confusion_<split>.png, roc_<split>.png, pr_<split>.png, loss.png,
            reliability_<split>.png, coverage_<split>.png
      calibration.json            the calibration fitted on the validation donors' cells, what abstention and
                                  conformal sets need of them (assembly.trust); calibration_cells.npz: their
                                  arrays, and training cells' embeddings the kNN score measures against
      csv/                        Lightning's CSV log
      dictionaries/               the gene dictionaries the run used
      history.md                  the run as a training-log entry
      adaptation.json             adapt=self_training|tent: what the adaptation did (jobs.adapt)
      wandb/                      the offline W&B run and its id (wandb/run_id)
      eval/<name>/                eval.py on other cells: metrics.json, predictions/, plots/
      folds/<test donor>/         cv=lodo: one complete run directory a fold (with cv.seeds of two or more:
                                  folds/<test donor>/seed<k>/, one a seed)
      cv.json, cv.md              cv=lodo: the folds side by side and their aggregate
      hf/                         pretrain.py: the Hugging Face checkpoint and its dictionaries
      .hydra/, <job>.log          Hydra's record of the job and its log, once the start is accepted
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from geneformer_colon.common.io import read_json
from geneformer_colon.common.names import FINISHED

# A run's (and an export's) calibration and kNN reference cells: geneformer_colon.assembly.trust
TRUST_FILE = "calibration.json"
CELLS_FILE = "calibration_cells.npz"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / "config.yaml")
    metrics = property(lambda self: self.root / "metrics.json")
    history = property(lambda self: self.root / "history.md")
    checkpoints = property(lambda self: self.root / "checkpoints")
    predictions = property(lambda self: self.root / "predictions")
    plots = property(lambda self: self.root / "plots")
    csv = property(lambda self: self.root / "csv")
    dictionaries = property(lambda self: self.root / "dictionaries")
    wandb = property(lambda self: self.root / "wandb")
    wandb_run_id = property(lambda self: self.root / "wandb" / "run_id")
    evaluations = property(lambda self: self.root / "eval")
    folds = property(lambda self: self.root / "folds")
    cv_json = property(lambda self: self.root / "cv.json")
    cv_markdown = property(lambda self: self.root / "cv.md")
    cv_plot = property(lambda self: self.root / "plots" / "cv_per_donor.png")
    loss_plot = property(lambda self: self.root / "plots" / "loss.png")
    hf = property(lambda self: self.root / "hf")
    adaptation = property(lambda self: self.root / "adaptation.json")
    trust = property(lambda self: self.root / TRUST_FILE)
    calibration_cells = property(lambda self: self.root / CELLS_FILE)
    embeddings = property(lambda self: self.root / "embed")
    hydra = property(lambda self: self.root / ".hydra")
    # beside the directory, not in it: taking the lock changes nothing of the run
    lock = property(lambda self: self.root.parent / f".{self.root.name}.lock")

    def fold_lock(self, test_donor: str) -> Path:
        """A CV fold's lock, in the parent (a lock in folds/ would make any directory look cross-validated)."""
        return self.root / f".fold-{test_donor}.lock"

    def checkpoint(self, which: str = "best") -> Path:
        return self.checkpoints / f"{which}.ckpt"

    def prediction_file(self, split: str) -> Path:
        return self.predictions / f"{split}.csv"

    def confusion_plot(self, split: str) -> Path:
        return self.plots / f"confusion_{split}.png"

    def curve_plot(self, curve: str, split: str) -> Path:
        """``curve``: ``roc`` or ``pr`` (precision-recall)."""
        return self.plots / f"{curve}_{split}.png"

    def trust_plot(self, kind: str, split: str) -> Path:
        """``kind``: ``reliability`` (the reliability diagram) or ``coverage`` (figures against coverage)."""
        return self.plots / f"{kind}_{split}.png"

    def evaluation(self, name: str) -> RunLayout:
        return RunLayout(self.evaluations / name)

    def fold(self, test_donor: str, seed: int | None = None) -> RunLayout:
        """A fold's run directory; with ``seed``, that seed's run of the fold."""
        return RunLayout(self.folds / test_donor / (f"seed{seed}" if seed is not None else ""))

    def written(self) -> list[Path]:
        """What a run wrote here (Hydra's own .hydra/ and log file are not the run's)."""
        names = (self.config, self.metrics, self.history, self.checkpoints, self.predictions, self.plots, self.csv,
                 self.dictionaries, self.wandb, self.evaluations, self.folds, self.cv_json, self.cv_markdown,
                 self.hf, self.embeddings, self.trust, self.calibration_cells, self.adaptation)
        return [path for path in names if path.exists()]

    def holds_a_run(self) -> bool:
        """A checkpoint, a finished record or folds: something a new run must not silently replace.

        A directory left by a start that failed before training (config, dictionaries, no
        checkpoint) holds no run: it may be cleared.
        """
        has_checkpoint = self.checkpoints.is_dir() and any(self.checkpoints.glob("*.ckpt"))
        return has_checkpoint or read_json(self.metrics).get("status") == FINISHED or self.folds.is_dir() \
            or self.hf.is_dir()

