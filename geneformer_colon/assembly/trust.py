"""Which calls to trust, for a run: the calibration fitted on its validation donors' cells after the best epoch
(``calibration=none|temperature|vector``), what abstention and conformal sets need from those cells, and the
training cells the kNN score measures against; stored in the run directory (``calibration.json`` and
``calibration_cells.npz``), copied into an export, applied by ``predict``.

:func:`cell_trust` gives a split's calibrated probabilities, each cell's uncertainty scores and (with a run's
trust) its conformal set; :func:`trust_figures` the figures ``metrics.json`` holds of them (before and after
calibration, the risk-coverage figures, the conformal coverage).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.special import softmax

from geneformer_colon.common.errors import InputError
from geneformer_colon.common.io import atomic_path, read_json, write_json
from geneformer_colon.common.names import CLASS_SEPARATOR
from geneformer_colon.model.calibration import Calibration, calibration_figures, check_method
from geneformer_colon.model.conformal import DEFAULT_ALPHA, ConformalSets, check_alpha, set_figures, set_labels
from geneformer_colon.model.uncertainty import (
    DEFAULT_SCORE,
    SCORES,
    EmbeddingIndex,
    abstention_figures,
    aurc,
    macro_f1,
    threshold_for,
    uncertainty_scores,
)
from geneformer_colon.runs.layout import CELLS_FILE, TRUST_FILE

DEFAULTS = {"method": "none", "alpha": DEFAULT_ALPHA, "knn_k": 10, "knn_reference_cells": 2000}


def trust_settings(node: Mapping[str, Any] | None) -> dict[str, Any]:
    """A run's ``calibration`` node over the defaults (a run from before the group: ``none``), checked."""
    settings = {**DEFAULTS, **dict(node or {})}
    check_method(settings["method"])
    check_alpha(settings["alpha"], "calibration.alpha")
    for key in ("knn_k", "knn_reference_cells"):
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"calibration.{key}: {value!r}; give an integer >= 1")
    return settings


def check_calibration(node: Mapping[str, Any] | None, val_donors: Sequence[str]) -> None:
    """The calibration settings, and a validation donor to fit a calibration on."""
    settings = trust_settings(node)
    if settings["method"] != "none" and not list(val_donors or []):
        raise InputError(f"calibration={settings['method']} is fitted on the validation donors' cells, but "
                         "data.val_donors is []; name a validation donor, or calibration=none")


@dataclass
class RunTrust:
    """A run's fitted calibration and the validation cells' (calibrated) probabilities, true classes and
    uncertainty scores (abstention thresholds, conformal calibration), with the training cells' reference
    embeddings (``reference``: None without them)."""

    calibration: Calibration
    val_probabilities: np.ndarray
    val_targets: np.ndarray
    val_scores: dict[str, np.ndarray]
    reference: np.ndarray | None = None
    alpha: float = DEFAULT_ALPHA
    k: int = 10
    fitted_on: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fit(cls, settings: Mapping[str, Any], probabilities: np.ndarray, targets: np.ndarray,
            logits: np.ndarray | None, embeddings: np.ndarray | None, reference: np.ndarray | None,
            donors: Sequence[str]) -> RunTrust:
        """Fit ``settings``' calibration on the validation cells' raw probabilities and true classes."""
        settings = trust_settings(settings)
        calibration = Calibration.fit(settings["method"], probabilities, targets)
        calibrated = calibration.apply(probabilities)
        trust = cls(calibration, calibrated, np.asarray(targets, dtype=np.int64), {}, reference, settings["alpha"],
                    settings["knn_k"], {"donors": list(donors), "cells": len(targets)})
        distances = trust.index.distances(embeddings) if trust.index is not None and embeddings is not None else None
        trust.val_scores = uncertainty_scores(calibrated, logits, distances)
        return trust

    @cached_property
    def index(self) -> EmbeddingIndex | None:
        return EmbeddingIndex(self.reference, self.k) if self.reference is not None else None

    @cached_property
    def conformal(self) -> ConformalSets:
        return ConformalSets(self.val_probabilities, self.val_targets)

    def threshold(self, score: str, coverage: float) -> float:
        """The score at or below which ``coverage`` of the validation cells lie."""
        if score not in self.val_scores:
            raise InputError(f"--uncertainty {score}: this model has no {score} score of its validation cells "
                             f"(it has {', '.join(self.val_scores)}); choose one of those")
        return threshold_for(coverage, self.val_scores[score])

    def save(self, directory: Path) -> None:
        """``calibration.json`` (the map and its settings) and ``calibration_cells.npz`` (the validation cells'
        arrays, the reference embeddings) in ``directory``."""
        arrays = {"val_targets": self.val_targets, "val_probabilities": self.val_probabilities,
                  **{f"val_score_{name}": values for name, values in self.val_scores.items()}}
        if self.reference is not None:
            arrays["reference"] = self.reference
        with atomic_path(directory / CELLS_FILE) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
        write_json(directory / TRUST_FILE, {**self.calibration.to_dict(), "alpha": self.alpha, "knn_k": self.k,
                                            "fitted_on": self.fitted_on, "cells_file": CELLS_FILE})

    @classmethod
    def load(cls, directory: Path | str) -> RunTrust | None:
        """A run's or an export's trust, None where it has no ``calibration.json`` (a run from before it)."""
        directory = Path(directory)
        path = directory / TRUST_FILE
        if not path.is_file():
            return None
        try:
            values = read_json(path)
            with np.load(directory / CELLS_FILE) as arrays:
                scores = {name: arrays[f"val_score_{name}"] for name in SCORES if f"val_score_{name}" in arrays}
                return cls(Calibration.from_dict(values), arrays["val_probabilities"], arrays["val_targets"], scores,
                           arrays["reference"] if "reference" in arrays else None, float(values["alpha"]),
                           int(values["knn_k"]), dict(values.get("fitted_on", {})))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise InputError(f"{path}: unreadable ({type(error).__name__}: {error}); train or export the run "
                             "again") from None


def sample_rows(count: int, most: int, seed: int) -> np.ndarray:
    """At most ``most`` of ``count`` rows, drawn without replacement by ``seed``, sorted."""
    if count <= most:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, most, replace=False))


def head_logits(head: torch.nn.Module, embeddings: np.ndarray) -> np.ndarray:
    """The classifier head's logits of pooled embeddings (eval mode: no dropout)."""
    was_training = head.training
    head.eval()
    with torch.inference_mode():
        weight = next(head.parameters())
        logits = head(torch.from_numpy(np.asarray(embeddings)).to(weight.device, weight.dtype)).float().cpu().numpy()
    head.train(was_training)
    return logits


@dataclass(frozen=True)
class CellTrust:
    """A split's calibrated probabilities, each cell's uncertainty scores and, with conformal sets, the sets."""

    calibrated: np.ndarray
    scores: dict[str, np.ndarray]
    sets: np.ndarray | None = None


def cell_trust(probabilities: np.ndarray, trust: RunTrust | None, logits: np.ndarray | None = None,
               embeddings: np.ndarray | None = None, conformal: bool = False) -> CellTrust:
    """The calibrated probabilities (unchanged without ``trust``), the uncertainty scores the inputs allow
    (``knn`` needs ``embeddings`` and the run's reference), and with ``conformal`` each cell's set at the run's
    alpha."""
    calibrated = trust.calibration.apply(probabilities) if trust is not None else probabilities
    index = trust.index if trust is not None else None
    distances = index.distances(embeddings) if index is not None and embeddings is not None else None
    sets = trust.conformal.sets(calibrated, trust.alpha) if trust is not None and conformal else None
    return CellTrust(calibrated, uncertainty_scores(calibrated, logits, distances), sets)


def trust_figures(targets: np.ndarray, probabilities: np.ndarray, cells: CellTrust, trust: RunTrust | None,
                  conformal: bool) -> dict[str, Any]:
    """Of some cells: ``ece``, ``classwise_ece``, ``brier``, ``nll`` of the raw probabilities and ``calibrated``
    the same after calibration; ``aurc`` (by the max-softmax score) and ``abstention`` (each score's AURC, the
    figures at 90% and 80% coverage); with ``conformal``, ``conformal`` (coverage and set size; None where the
    cells have no sets: no validation fit)."""
    figures: dict[str, Any] = calibration_figures(probabilities, targets)
    if trust is not None and trust.calibration.method != "none":
        figures["calibrated"] = calibration_figures(cells.calibrated, targets)
    predicted = cells.calibrated.argmax(axis=1)
    abstention = abstention_figures(targets, predicted, cells.scores[DEFAULT_SCORE])
    figures["aurc"] = abstention.pop("aurc")
    figures["abstention"] = {"score": DEFAULT_SCORE, **abstention,
                             "aurc_by_score": {name: aurc(targets == predicted, cells.scores[name])
                                               for name in SCORES if name in cells.scores}}
    if conformal:
        figures["conformal"] = set_figures(cells.sets, targets, trust.alpha) if cells.sets is not None else None
    return figures


UNKNOWN = "unknown"


@dataclass(frozen=True)
class TrustSource:
    """One classifier's trust (None: a run without ``calibration.json``), its head, and its part of the model's
    embeddings: the model itself, or one fold of a cross-validated ensemble (its slice of the folds' embeddings
    side by side)."""

    trust: RunTrust | None
    head: torch.nn.Module
    part: slice = field(default_factory=lambda: slice(None))

    def answers(self, embeddings: np.ndarray, score: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """This classifier's own calibrated probabilities of cells from their embeddings, and its uncertainty
        scores of them (``knn`` where asked by ``score``)."""
        own = embeddings[:, self.part]
        logits = head_logits(self.head, own)
        probabilities = softmax(logits, axis=1)
        if self.trust is not None:
            probabilities = self.trust.calibration.apply(probabilities)
        distances = self.trust.index.distances(own) if score == "knn" else None
        return probabilities, uncertainty_scores(probabilities, logits, distances)


@dataclass
class CellAnswers:
    """What predict answers of each cell beyond its class: the asked uncertainty score, whether it abstained, its
    conformal set (cells x classes); filled a chunk of cells at a time."""

    uncertainty: np.ndarray
    abstained: np.ndarray | None
    sets: np.ndarray | None

    @classmethod
    def empty(cls, cells: int, classes: int, asked: TrustAsked) -> CellAnswers:
        return cls(np.full(cells, np.nan), np.zeros(cells, dtype=bool) if asked.abstain is not None else None,
                   np.zeros((cells, classes), dtype=bool) if asked.conformal is not None else None)

    def rows(self, chosen: np.ndarray) -> CellAnswers:
        """The answers of the ``chosen`` cells (a boolean mask or indices)."""
        return CellAnswers(self.uncertainty[chosen], None if self.abstained is None else self.abstained[chosen],
                           None if self.sets is None else self.sets[chosen])

    def fill(self, rows: slice, chunk: CellAnswers) -> None:
        self.uncertainty[rows] = chunk.uncertainty
        if self.abstained is not None:
            self.abstained[rows] = chunk.abstained
        if self.sets is not None:
            self.sets[rows] = chunk.sets


@dataclass(frozen=True)
class TrustAsked:
    """What predict is asked beyond each cell's class: which ``uncertainty`` score it writes, abstention at a
    coverage (``abstain``: cells less sure than the validation donors' ``abstain`` share are called
    :data:`UNKNOWN`), conformal sets at a miscoverage rate (``conformal``).

    A cross-validated ensemble answers from its folds, each against its own validation donors: a cell is
    :data:`UNKNOWN` when most folds' classifiers are less sure of it than their threshold, and its conformal set
    is the union of the folds' sets (each holds the true class with probability at least 1 - alpha where the
    cells are exchangeable with that fold's validation cells, so the union does too; it is larger)."""

    uncertainty: str = DEFAULT_SCORE
    abstain: float | None = None
    conformal: float | None = None

    def check(self, sources: Sequence[TrustSource], model: str, classes: Sequence[str] = ()) -> None:
        """Every request the model (of ``classes``, answering through ``sources``) can answer, before anything is
        read or written."""
        if self.uncertainty not in SCORES:
            raise InputError(f"--uncertainty {self.uncertainty!r}: choose one of {', '.join(SCORES)}")
        if self.abstain is not None and not 0 < self.abstain <= 1:
            raise InputError(f"--abstain {self.abstain}: the share of cells to answer; give a number in (0, 1], "
                             "e.g. 0.8 to call the least sure 20% unknown")
        if self.abstain is not None and UNKNOWN in classes:
            raise InputError(f"{model}: --abstain labels the cells it does not call '{UNKNOWN}', which is also a class "
                             "of this model; drop --abstain and read obs['<prefix>_uncertainty'], or train with that "
                             "class renamed")
        if self.conformal is not None:
            check_alpha(self.conformal, "--conformal")
        needs = [option for option, asked in (("--abstain", self.abstain is not None),
                                              ("--conformal", self.conformal is not None),
                                              (f"--uncertainty {self.uncertainty}", self.uncertainty == "knn"))
                 if asked]
        if needs and any(source.trust is None for source in sources):
            lacking = "one of its folds has" if len(sources) > 1 else "it has"
            raise InputError(f"{model}: {' and '.join(needs)} need the validation donors' cells of the run, but "
                             f"{lacking} no {TRUST_FILE} (a run trained before calibration was recorded); train the "
                             "run again")
        if self.uncertainty == "energy" and len(sources) > 1:
            raise InputError(f"{model}: --uncertainty energy needs one classifier's logits, not an ensemble's; use "
                             "--fold or another score")
        if self.uncertainty == "knn" and any(source.trust.reference is None for source in sources):
            raise InputError(f"{model}: --uncertainty knn needs the training cells' embeddings, which this run "
                             f"lacks (its {CELLS_FILE} has none); choose another score")

    def answer(self, probabilities: np.ndarray, embeddings: np.ndarray, sources: Sequence[TrustSource]
               ) -> CellAnswers:
        """A chunk of cells' answers from the model's (calibrated) ``probabilities`` and its embeddings: the asked
        score, abstention against the validation cells' threshold and the conformal set; an ensemble's score is
        that of its mean probabilities (``knn``: its folds' mean distance), its abstention and sets its folds'
        (see the class). Cells without a prediction (NaN) get none."""
        present = ~np.isnan(probabilities[:, 0])
        if len(sources) == 1:
            logits = head_logits(sources[0].head, embeddings[present]) if self.uncertainty == "energy" else None
            distances = sources[0].trust.index.distances(embeddings[present]) if self.uncertainty == "knn" else None
            own = [(probabilities[present], uncertainty_scores(probabilities[present], logits, distances))]
            scores = own[0][1]
        else:
            own = [source.answers(embeddings[present], self.uncertainty) for source in sources]
            distances = np.mean([scores["knn"] for _, scores in own], axis=0) if self.uncertainty == "knn" else None
            scores = uncertainty_scores(probabilities[present], None, distances)
        uncertainty = np.full(len(probabilities), np.nan)
        uncertainty[present] = scores[self.uncertainty]
        abstained = sets = None
        if self.abstain is not None:
            votes = np.mean([scores[self.uncertainty] > source.trust.threshold(self.uncertainty, self.abstain)
                             for source, (_, scores) in zip(sources, own)], axis=0)
            abstained = np.zeros(len(probabilities), dtype=bool)
            abstained[present] = votes > 0.5
        if self.conformal is not None:
            sets = np.zeros(probabilities.shape, dtype=bool)
            sets[present] = np.logical_or.reduce([source.trust.conformal.sets(own_probabilities, self.conformal)
                                                  for source, (own_probabilities, _) in zip(sources, own)])
        return CellAnswers(uncertainty, abstained, sets)

    def columns(self, labels: pd.Series, probabilities: np.ndarray, answers: CellAnswers, prefix: str,
                classes: Sequence[str], sources: Sequence[TrustSource]) -> tuple[pd.DataFrame, dict[str, Any]]:
        """The obs columns (``<prefix>_label`` with abstention, ``<prefix>_uncertainty``, with conformal sets
        ``<prefix>_conformal_set``) and what ``uns[prefix]`` says of them."""
        predicted = labels.astype(str).to_numpy()
        present = ~np.isnan(probabilities[:, 0])
        trusts = [source.trust for source in sources]
        uns: dict[str, Any] = {"uncertainty": self.uncertainty, "uncertainty_key": f"{prefix}_uncertainty",
                               "uncertainty_meaning": SCORE_MEANINGS[self.uncertainty]}
        if all(trust is not None for trust in trusts):
            uns["calibration"] = ", ".join(sorted({trust.calibration.method for trust in trusts}))
        columns = {}
        if answers.abstained is not None:
            predicted = np.where(answers.abstained, UNKNOWN, predicted)
            thresholds = [trust.threshold(self.uncertainty, self.abstain) for trust in trusts]
            uns["abstain"] = {"coverage_asked": self.abstain,
                              "threshold": thresholds[0] if len(trusts) == 1 else thresholds,
                              "coverage_reached": float(1 - answers.abstained.sum() / max(present.sum(), 1)),
                              "threshold_from": fitted_on(trusts)}
            if len(trusts) > 1:
                uns["abstain"]["rule"] = "unknown where most folds' classifiers are less sure than their threshold"
        columns[f"{prefix}_label"] = pd.Categorical(predicted)
        columns[f"{prefix}_uncertainty"] = answers.uncertainty
        if answers.sets is not None:
            columns[f"{prefix}_conformal_set"] = pd.Categorical(
                np.where(present, set_labels(answers.sets, classes), ""))
            uns["conformal"] = {"alpha": self.conformal, "key": f"{prefix}_conformal_set", "separator": CLASS_SEPARATOR,
                                "calibrated_on": fitted_on(trusts),
                                "note": "split conformal, class-conditional (Mondrian) on the validation donors' "
                                        "cells" + (", the union of the folds' sets" if len(trusts) > 1 else "")
                                        + "; a new donor is not exchangeable with them (donor shift), so its "
                                          "coverage may fall below 1 - alpha"}
        return pd.DataFrame(columns, index=labels.index), uns

    def figures(self, targets: np.ndarray, probabilities: np.ndarray, answers: CellAnswers) -> dict[str, Any]:
        """How the asked abstention and conformal sets (``answers``) did on cells whose true classes are known
        (``targets``; ``probabilities`` calibrated): ``abstain`` (the share answered, the accuracy and macro F1 of
        the answered cells and of all) and ``conformal`` (coverage and set size at the asked alpha)."""
        figures: dict[str, Any] = {}
        if answers.abstained is not None:
            answered = ~answers.abstained
            predicted = probabilities.argmax(axis=1)
            figures["abstain"] = {"coverage_asked": self.abstain, "coverage": float(answered.mean()),
                                  **({"accuracy": float(np.mean(targets[answered] == predicted[answered])),
                                      "macro_f1": macro_f1(targets[answered], predicted[answered])}
                                     if answered.any() else {"accuracy": None, "macro_f1": None}),
                                  "accuracy_all": float(np.mean(targets == predicted)),
                                  "macro_f1_all": macro_f1(targets, predicted)}
        if answers.sets is not None:
            figures["conformal"] = set_figures(answers.sets, targets, self.conformal)
        return figures


def fitted_on(trusts: Sequence[RunTrust]) -> dict[str, Any]:
    """The validation donors and cells the trusts were fitted on (of all the folds of an ensemble)."""
    return {"donors": sorted({donor for trust in trusts for donor in trust.fitted_on.get("donors", [])}),
            "cells": sum(int(trust.fitted_on.get("cells", 0)) for trust in trusts)}


def asked_line(name: str, figures: Mapping[str, Any]) -> str:
    """One line of :meth:`TrustAsked.figures` for the log."""
    parts = []
    if "abstain" in figures:
        abstain = figures["abstain"]
        answered = "none answered" if abstain["accuracy"] is None else \
            f"accuracy {abstain['accuracy']:.3f} (all cells {abstain['accuracy_all']:.3f})"
        parts.append(f"answered {abstain['coverage']:.3f} of the cells, {answered}")
    if "conformal" in figures:
        conformal = figures["conformal"]
        parts.append(f"conformal coverage {conformal['coverage']:.3f} at alpha {conformal['alpha']}, mean set size "
                     f"{conformal['mean_set_size']:.2f}")
    return f"{name}: " + "; ".join(parts)


SCORE_MEANINGS = {
    "max_softmax": "1 - the highest class probability (calibrated); higher is less sure",
    "entropy": "entropy of the class probabilities (calibrated, nats); higher is less sure",
    "energy": "-logsumexp of the head's logits; higher is less sure",
    "knn": "mean distance of the cell's embedding to its nearest training cells; higher is less like them",
}
