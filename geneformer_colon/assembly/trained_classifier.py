"""A trained classifier outside training: loaded from a run directory or an export, applied to tokens.

A run directory gives its best checkpoint (the model rebuilt from the checkpoint's own settings)
and its ``dictionaries/``; an export (``geneformer-colon export``) gives a Hugging Face BERT, the
classifier head and its dictionaries. Either way the cells are tokenized as the run tokenized its
own, and :meth:`TrainedClassifier.apply` returns each cell's class probabilities and the pooled
embedding the head sees.

A cross-validated run (``cv=lodo``), or its export, is one model too: the ensemble of its finished
folds' best checkpoints (:class:`FoldEnsemble`): the folds' probabilities averaged, their embeddings
side by side (fold after fold, in the folds' order). Its folds must tokenize alike (the same gene
dictionaries and settings: a Geneformer preset's, not ones derived from each fold's training cells);
``fold=`` picks one fold instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from geneformer_colon.assembly.batching import OomHalving
from geneformer_colon.assembly.builders import classifier_from_checkpoint
from geneformer_colon.assembly.trust import RunTrust, TrustSource
from geneformer_colon.common.errors import InputError
from geneformer_colon.common.names import FINISHED
from geneformer_colon.data.dictionaries import GeneDictionaries, load_settings, special_token_ids
from geneformer_colon.data.samplers import EvalBatchSampler
from geneformer_colon.data.token_rows import TokenRows
from geneformer_colon.data.tokenizer import TokenizerSettings
from geneformer_colon.model.backbone import Vocabulary, pretrained_bert
from geneformer_colon.model.module import CellClassifier, CellOutputs
from geneformer_colon.runs.layout import RunLayout
from geneformer_colon.runs.reading import read_run

EXPORT_SETTINGS = "cell_classifier.json"
EXPORT_HEAD = "cell_classifier.safetensors"
# An ensemble export: this file lists the folds, each an export in folds/<test donor>/.
ENSEMBLE_SETTINGS = "ensemble.json"


def is_export(path: Path) -> bool:
    return (path / EXPORT_SETTINGS).is_file() or (path / ENSEMBLE_SETTINGS).is_file()


def bf16_autocast(device: str | torch.device) -> bool:
    """Whether inference on ``device`` runs under bf16 autocast (a GPU that has it), not in float32."""
    return torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported()


def finished_folds(run_dir: Path) -> list[str]:
    """The test donors of a CV run's finished folds, sorted."""
    folds = RunLayout(run_dir).folds
    return sorted(fold.name for fold in folds.iterdir() if fold.is_dir() and read_run(fold).status == FINISHED)


@dataclass
class TrainedClassifier:
    """The model, the dictionaries and tokenizer settings it was trained with, where it came from, and its
    calibration (``trust``, from the run's or export's ``calibration.json``; None for a run from before it):
    every probability it gives is calibrated."""

    module: CellClassifier
    dictionaries: GeneDictionaries
    settings: TokenizerSettings
    origin: dict[str, Any]
    oom: OomHalving = field(init=False, default_factory=OomHalving, repr=False, compare=False)
    trust: RunTrust | None = None

    @property
    def class_names(self) -> list[str]:
        return list(self.module.class_names)

    @property
    def hidden_size(self) -> int:
        return self.module.encoder.hidden_size

    @classmethod
    def load(cls, path: str | Path, fold: str | None = None) -> TrainedClassifier:
        """A run directory or an export directory; a CV run (or its export): the ensemble of its folds, or
        its ``fold`` (a test donor)."""
        path = Path(path)
        if not path.is_dir():
            raise InputError(f"{path}: no such directory; give a run directory (outputs/<run_name>) or a directory "
                             "written by geneformer-colon export")
        folds = RunLayout(path).folds
        if fold is not None:
            if not (folds / fold).is_dir():
                choices = sorted(p.name for p in folds.iterdir()) if folds.is_dir() else []
                raise InputError(f"{path}: no fold {fold!r}" + (f"; choose one of {', '.join(choices)}" if choices
                                                               else " (not a cross-validated run); leave out --fold"))
            return cls.load(folds / fold)
        if (path / ENSEMBLE_SETTINGS).is_file() or folds.is_dir():
            return FoldEnsemble.load_folds(path)
        return cls.from_export(path) if is_export(path) else cls.from_run(path)

    @classmethod
    def from_run(cls, run_dir: Path) -> TrainedClassifier:
        layout = RunLayout(run_dir)
        module, checkpoint = classifier_from_checkpoint(run_dir)
        settings = TokenizerSettings(**module.hparams.tokenizer)
        run = read_run(run_dir)
        origin = {"run_dir": str(run_dir), "checkpoint": str(checkpoint), "run_name": run.name,
                  "trained_on": run.donors("train"), "validated_on": run.donors("val")}
        return cls(module, GeneDictionaries.load_directory(layout.dictionaries), settings, origin,
                   RunTrust.load(run_dir))

    @classmethod
    def from_export(cls, directory: Path) -> TrainedClassifier:
        try:
            described = json.loads((directory / EXPORT_SETTINGS).read_text())
            tokenizer = {key: load_settings(directory)[key] for key in ("model_version", "input_size")}
            classes, pooling = list(described["classes"]), str(described["pooling"])
            head = load_file(directory / EXPORT_HEAD)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise InputError(f"{directory}: an incomplete export ({type(error).__name__}: {error}); export the run "
                             "again") from None
        dictionaries = GeneDictionaries.load_directory(directory)
        settings = TokenizerSettings(**tokenizer)
        specials = special_token_ids(dictionaries.token, settings.model_version)
        vocabulary = Vocabulary(len(dictionaries.token), specials["<pad>"], settings.resolved_input_size, dictionaries,
                                settings.model_version)
        bert = pretrained_bert(vocabulary, directory).eval()
        module = CellClassifier(bert_config=bert.config.to_dict(), class_names=classes, special_token_ids=specials,
                                tokenizer=tokenizer, pooling=pooling, bert=bert)
        try:
            module.head.load_state_dict(head)
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[0]
            raise InputError(f"{directory / EXPORT_HEAD}: not this classifier's head ({reason}); export the run "
                             "again") from None
        origin = {"export": str(directory), **described.get("run", {})}
        return cls(module.eval(), dictionaries, settings, origin, RunTrust.load(directory))

    @torch.inference_mode()
    def apply(self, cells: TokenRows, rows: np.ndarray | None = None, batch_size: int = 64,
              max_tokens: int | None = None, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities (cells x classes) and embeddings (cells x hidden) of the cells at ``rows`` of
        ``cells`` (default: all), in that order; NaN rows for cells without a token (no gene of the
        vocabulary). Batches group cells of similar length: ``max_tokens`` padded tokens, or ``batch_size`` cells
        (a verb's by :func:`~geneformer_colon.assembly.batching.token_budget`); bf16 autocast on a GPU that has
        it; a batch halved on a GPU's out-of-memory."""
        rows = np.arange(len(cells)) if rows is None else np.asarray(rows, dtype=np.int64)
        probabilities = np.full((len(rows), len(self.class_names)), np.nan, dtype=np.float64)
        embeddings = np.full((len(rows), self.hidden_size), np.nan, dtype=np.float32)
        lengths = cells.lengths[rows]
        present = np.flatnonzero(lengths > 0)
        for batch in EvalBatchSampler(lengths[present], batch_size, max_tokens=max_tokens):
            chosen = present[batch]
            probabilities[chosen], embeddings[chosen] = self.infer(*cells.padded(rows[chosen], self.pad_id), device)
        return probabilities, embeddings

    def outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, device: str | torch.device
                ) -> CellOutputs:
        """The module's logits and embeddings of one padded batch, on the CPU (bf16 autocast on a GPU that has
        it); on a CUDA out-of-memory the batch is halved (:class:`OomHalving`)."""
        module = self.module.to(device).eval()
        device_type = torch.device(device).type

        def forward(rows: slice) -> CellOutputs:
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16_autocast(device)):
                outputs = module.infer(input_ids[rows].to(device), attention_mask[rows].to(device))
            return CellOutputs(outputs.logits.float().cpu(), outputs.embeddings.float().cpu())

        parts = self.oom(forward, len(input_ids))
        return CellOutputs(torch.cat([part.logits for part in parts]), torch.cat([part.embeddings for part in parts]))

    def trust_sources(self) -> list[TrustSource]:
        """Whose validation cells judge this model's calls (predict's abstention and conformal sets): its own."""
        return [TrustSource(self.trust, self.module.head)]

    @property
    def pad_id(self) -> int:
        return special_token_ids(self.dictionaries.token, self.settings.model_version)["<pad>"]

    @torch.inference_mode()
    def infer(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, device: str | torch.device = "cpu"
              ) -> tuple[np.ndarray, np.ndarray]:
        """One padded batch's (calibrated) class probabilities and embeddings (bf16 autocast on a GPU that has
        it)."""
        outputs = self.outputs(input_ids, attention_mask, device)
        probabilities = outputs.probabilities.cpu().numpy()
        if self.trust is not None:
            probabilities = self.trust.calibration.apply(probabilities)
        return probabilities, outputs.embeddings.float().cpu().numpy()


@dataclass
class FoldEnsemble(TrainedClassifier):
    """A CV run as one model: its finished folds' classifiers (``members``, by test donor). ``apply`` averages
    their probabilities and puts their embeddings side by side (``hidden_size``: the members' sum); ``module``,
    ``dictionaries`` and ``settings`` are the first fold's (every fold tokenizes alike)."""

    members: list[TrainedClassifier] = field(default_factory=list)

    @property
    def hidden_size(self) -> int:
        return sum(member.hidden_size for member in self.members)

    @classmethod
    def load_folds(cls, path: Path) -> FoldEnsemble:
        """A CV run directory's finished folds, or an ensemble export's folds."""
        if (path / ENSEMBLE_SETTINGS).is_file():
            folds = list(json.loads((path / ENSEMBLE_SETTINGS).read_text())["folds"])
            members = [TrainedClassifier.from_export(path / "folds" / fold) for fold in folds]
            origin = {"export": str(path), "run_name": members[0].origin.get("run_name", "").split("/")[0]}
        else:
            folds = finished_folds(path)
            if not folds:
                raise InputError(f"{path}: a cross-validated run with no finished fold yet; finish a fold first")
            members = [TrainedClassifier.from_run(RunLayout(path).fold(fold).root) for fold in folds]
            origin = {"cv_run_dir": str(path), "run_name": read_run(path).name}
        first = members[0]
        differ = [fold for fold, member in zip(folds, members)
                  if (member.dictionaries, member.settings, member.class_names)
                  != (first.dictionaries, first.settings, first.class_names)]
        if differ:
            raise InputError(f"{path}: folds {folds[0]} and {differ[0]} tokenize cells with different gene "
                             "dictionaries (derived from each fold's training cells), so their predictions cannot be "
                             "averaged; "
                             f"use one fold with --fold (one of {', '.join(folds)})")
        trained_on = sorted({donor for member in members for donor in member.origin.get("trained_on", [])})
        validated_on = sorted({donor for member in members for donor in member.origin.get("validated_on", [])}
                              - set(trained_on))
        origin.update(folds=folds, trained_on=trained_on, validated_on=validated_on,
                      checkpoint=", ".join(str(member.origin.get("checkpoint")) for member in members))
        return cls(first.module, first.dictionaries, first.settings, origin, members=members)

    def trust_sources(self) -> list[TrustSource]:
        """Each fold's, with its part of the embeddings :meth:`infer` puts side by side."""
        ends = np.cumsum([member.hidden_size for member in self.members])
        return [TrustSource(member.trust, member.module.head, slice(int(end - member.hidden_size), int(end)))
                for member, end in zip(self.members, ends)]

    def infer(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, device: str | torch.device = "cpu"
              ) -> tuple[np.ndarray, np.ndarray]:
        """The folds' mean probabilities and their embeddings concatenated (fold after fold), so ``apply`` and
        perturbation both use the ensemble, never the first fold alone."""
        outputs = [member.infer(input_ids, attention_mask, device) for member in self.members]
        return np.mean([probabilities for probabilities, _ in outputs], axis=0), np.concatenate(
            [embeddings for _, embeddings in outputs], axis=1)
