"""Adapting to a new donor with its own unlabelled cells: the ``adapt`` config group's settings and methods.

The target donors (``adapt.targets``: each fold's test donors, also its validation donors, or a list) give their
cells without labels (:class:`~geneformer_colon.data.unlabelled.UnlabelledCells`); the model is still selected on
the validation donors' labels.

- ``none``: no adaptation.
- ``mlm``: masked-gene pretraining continued on the training and target donors' cells alone, then fine-tuning
  (``jobs/adapt.py``: the pretraining is ``jobs/pretrain.py``'s, cached per fold).
- ``self_training``: rounds of class-balanced pseudo-labels above a confidence threshold (:func:`pseudo_labels`,
  :func:`self_train`), each round trained on the labelled and pseudo-labelled cells.
- ``dann``: :class:`TargetAdversary`, the donor adversary of ``robust=donor_adversary`` whose donor head also
  sees a batch of target cells each step (Ganin et al. 2016).
- ``tent``: :func:`entropy_minimisation` of the LayerNorm affine parameters on the target cells (Wang et al. 2021).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from geneformer_colon.common.errors import InputError
from geneformer_colon.data.unlabelled import UnlabelledCells
from geneformer_colon.model.masked_genes import MaskingRates
from geneformer_colon.model.robust import DonorAdversary, DonorStrategy, PlainTraining, TrainingBatch
from geneformer_colon.runs.config import instantiate_trusted

TARGET_CHOICES = ("test", "val_and_test")
# The keys of each method (beyond name and targets), as its conf/adapt/<name>.yaml gives them.
METHOD_KEYS = {"none": (), "mlm": ("epochs", "seed", "masking"), "self_training": ("threshold", "rounds", "epochs"),
               "dann": ("weight", "schedule_gamma"), "tent": ("steps", "lr")}
_WHERE = "the model's settings (checkpoint hyper-parameters)"
MLM_VAL = "adapt=mlm holds the validation donors out of its pretraining for the masked-gene loss that selects its epoch"


def _number(value: Any, key: str, expected: str, valid: Callable[[float], bool], integer: bool = False) -> Any:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or not valid(value):
        raise InputError(f"adapt.{key} is {value!r}; set it to {expected}")
    return value


@dataclass(frozen=True)
class AdaptSettings:
    """The ``adapt`` node, checked: one line naming the key for a bad value."""

    name: str = "none"
    targets: str | tuple[str, ...] = "test"
    epochs: int = 1
    seed: int = 0
    masking: Mapping[str, float] = field(default_factory=dict)
    threshold: float = 0.9
    rounds: int = 3
    weight: float = 0.1
    schedule_gamma: float = 10.0
    steps: int = 10
    lr: float = 1e-3

    @classmethod
    def of(cls, node: Mapping[str, Any] | None) -> AdaptSettings:
        """The settings of a config's ``adapt`` node (None: ``adapt=none``)."""
        node = dict(node or {})
        name = node.pop("name", "none")
        if name not in METHOD_KEYS:
            raise InputError(f"adapt.name is {name!r}; choose adapt={', adapt='.join(METHOD_KEYS)}")
        targets = node.pop("targets", "test")
        unknown = sorted(set(node) - set(METHOD_KEYS[name]))
        if unknown:
            raise InputError(f"adapt.{unknown[0]} is no key of adapt={name} (its keys: "
                             f"{', '.join(('targets', *METHOD_KEYS[name]))}); remove it")
        if isinstance(targets, str):
            if targets not in TARGET_CHOICES:
                raise InputError(f"adapt.targets is {targets!r}; set it to test, val_and_test or a list of donors")
        elif not (isinstance(targets, Sequence) and targets and all(isinstance(d, str) for d in targets)):
            raise InputError(f"adapt.targets is {targets!r}; set it to test, val_and_test or a list of donors")
        else:
            targets = tuple(targets)
        settings = cls(name=name, targets=targets, **node)
        settings.check()
        return settings

    def check(self) -> None:
        _number(self.epochs, "epochs", "a whole number of epochs >= 1", lambda v: v >= 1, integer=True)
        _number(self.seed, "seed", "an integer >= 0", lambda v: v >= 0, integer=True)
        MaskingRates(**dict(self.masking))
        _number(self.threshold, "threshold", "a probability strictly between 0 and 1, e.g. 0.9",
                lambda v: 0 < v < 1)
        _number(self.rounds, "rounds", "a whole number of rounds >= 1", lambda v: v >= 1, integer=True)
        _number(self.weight, "weight", "a number >= 0", lambda v: v >= 0)
        _number(self.schedule_gamma, "schedule_gamma", "a number >= 0", lambda v: v >= 0)
        _number(self.steps, "steps", "a whole number of steps >= 0", lambda v: v >= 0, integer=True)
        _number(self.lr, "lr", "a learning rate > 0", lambda v: v > 0)

    @property
    def active(self) -> bool:
        return self.name != "none"

    def target_donors(self, val_donors: Sequence[str], test_donors: Sequence[str]) -> list[str]:
        """The target donors of a split: its test donors (``test``), its validation and test donors
        (``val_and_test``), or the list, each a validation or test donor (no target's labels may train); for
        ``mlm``, never a validation donor."""
        held_out = [*val_donors, *test_donors]
        if self.targets == "test":
            targets = list(test_donors)
        elif self.targets == "val_and_test":
            targets = held_out
        else:
            targets = list(self.targets)
            training = [donor for donor in targets if donor not in held_out]
            if training:
                raise InputError(f"adapt.targets names {training}, not a validation or test donor of the split "
                                 f"({held_out}): a training donor's labels train the model, a target's may not be "
                                 "read; leave it out of adapt.targets or hold it out (data.test_donors)")
        if not targets:
            raise InputError(f"adapt={self.name} adapts to the target donors' cells, and adapt.targets={self.targets} "
                             "names none (data.test_donors is empty); name test donors or list adapt.targets")
        validation = [donor for donor in targets if donor in val_donors]
        if self.name == "mlm" and validation:
            raise InputError(f"{MLM_VAL}, so the validation donor(s) {validation} cannot be targets; use "
                             "adapt.targets=test or list test donors only")
        return targets


def check_adaptation(cfg: Mapping[str, Any]) -> AdaptSettings:
    """What the ``adapt`` node and the rest of the recipe must agree on, before any data is read."""
    settings = AdaptSettings.of(cfg.get("adapt"))
    robust = (cfg.get("robust") or {}).get("_target_")
    plain_robust = f"{PlainTraining.__module__}.{PlainTraining.__qualname__}"
    if settings.name == "self_training" and robust not in (None, plain_robust):
        raise InputError("adapt=self_training trains its rounds on pseudo-labelled target cells, which no "
                         f"donor-robust strategy's training donors include (robust: {robust}); use robust=none, or "
                         "adapt=dann for an adversary that sees the target donors")
    if settings.name in ("self_training", "tent") and not (cfg.get("callbacks") or {}).get("model_checkpoint"):
        raise InputError(f"adapt={settings.name} adapts the best epoch's model, and callbacks.model_checkpoint is "
                         "null; keep the model checkpoint (callbacks=default)")
    if settings.name == "mlm" and settings.targets == "val_and_test":
        raise InputError(f"{MLM_VAL}, so they cannot be targets; use adapt.targets=test")
    if settings.name == "mlm" and cfg.get("init_from"):
        raise InputError(f"adapt=mlm pretrains model.encoder on the target's cells and fine-tunes from that, and "
                         f"init_from={cfg.get('init_from')} would copy that run's weights over it; set init_from=null "
                         "(experiment=colon4 and colon5 set it)")
    return settings


# ---- self-training ----


def pseudo_labels(probabilities: np.ndarray, threshold: float, share: float) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced pseudo-labels: of the cells predicted as a class with probability >= ``threshold``, the most
    confident, at most ``ceil(share * cells / classes)`` a class. The rows (sorted) and their classes."""
    predicted, confidence = probabilities.argmax(axis=1), probabilities.max(axis=1)
    quota = math.ceil(share * len(probabilities) / probabilities.shape[1])
    rows = []
    for label in range(probabilities.shape[1]):
        candidates = np.flatnonzero((predicted == label) & (confidence >= threshold))
        rows.append(candidates[np.argsort(-confidence[candidates], kind="stable")][:quota])
    chosen = np.sort(np.concatenate(rows)).astype(int)
    return chosen, predicted[chosen]


@dataclass(frozen=True)
class PseudoLabelRound:
    """One round: the share of target cells it may label, the rows it labelled and their classes."""

    round: int
    share: float
    rows: np.ndarray
    labels: np.ndarray

    def counts(self, class_names: Sequence[str]) -> dict[str, int]:
        return {name: int((self.labels == label).sum()) for label, name in enumerate(class_names)}


def self_train(predict: Callable[[], np.ndarray], fit: Callable[[np.ndarray, np.ndarray], None], rounds: int,
               threshold: float, on_round: Callable[[PseudoLabelRound], None] | None = None) -> list[PseudoLabelRound]:
    """``rounds`` rounds: ``predict()`` the target cells' class probabilities with the current model, take the
    pseudo-labels of round r (a share r / rounds of the cells, :func:`pseudo_labels`) and ``fit(rows, labels)``
    the model on the labelled plus those cells; ``on_round`` sees each round's labels before it trains."""
    done = []
    for number in range(1, rounds + 1):
        share = number / rounds
        rows, labels = pseudo_labels(predict(), threshold, share)
        done.append(PseudoLabelRound(number, share, rows, labels))
        if on_round is not None:
            on_round(done[-1])
        fit(rows, labels)
    return done


# ---- domain-adversarial training ----


class TargetAdversary(DonorStrategy):
    """``dann``: the ``inner`` strategy's loss (the run's ``robust`` node) plus a :class:`DonorAdversary`'s term
    over the training donors and the target donors, its donor head seeing the batch's training cells and as many
    target cells (drawn each step, after every other draw of the step, so the training cells' own draws are those
    of the run without it; under a token budget, only as many of them as fit it). ``weight=0``: no target cell is
    drawn or encoded (the donor head sees the training cells alone, its term zero, as ``DonorAdversary``'s of
    weight 0), so the run is the inner strategy's exactly. The target cells and the encoder are attached
    (:meth:`attach`) before training; without them (a model loaded to predict) the inner loss alone."""

    def __init__(self, donors: Sequence[str], hidden_size: int, target_donors: Sequence[str],
                 inner: Mapping[str, Any] | None = None, weight: float = 0.1, schedule_gamma: float = 10.0) -> None:
        super().__init__(donors, hidden_size)
        self.inner = instantiate_trusted(inner, _WHERE, donors=self.donors, hidden_size=hidden_size) if inner \
            else PlainTraining(self.donors, hidden_size)
        self.target_donors = list(target_donors)
        self.adversary = DonorAdversary(self.donors + self.target_donors, hidden_size, weight, schedule_gamma)
        self._attached: tuple[Callable[..., torch.Tensor], UnlabelledCells, torch.Tensor, int, int | None] | None \
            = None

    def attach(self, encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], cells: UnlabelledCells,
               donor_names: Sequence[str], pad_id: int, max_tokens: int | None = None) -> None:
        """The encoder and the target cells; ``donor_names``: the names behind the cells' donor indices;
        ``max_tokens``: the padded tokens a batch of target cells may hold (``data.max_tokens``)."""
        lookup = torch.tensor([self.target_donors.index(name) + len(self.donors) if name in self.target_donors
                               else -1 for name in donor_names], dtype=torch.long)
        if (lookup[torch.as_tensor(cells.donor_ids, dtype=torch.long)] < 0).any():
            raise InputError(f"adapt=dann: target cells of donors outside {self.target_donors}")
        self._attached = (encode, cells, lookup, pad_id, max_tokens)

    def forward(self, batch: TrainingBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, figures = self.inner(batch)
        if not self.training or self._attached is None:
            return loss, figures
        embeddings, donors = batch.embeddings, batch.donors
        if self.adversary.weight != 0:  # at 0 the head sees the training cells alone (DDP wants every parameter used)
            encode, cells, lookup, pad_id, max_tokens = self._attached
            rows = torch.randint(len(cells), (len(batch.embeddings),))
            target = cells.batch(rows, pad_id, max_tokens)
            device = batch.embeddings.device
            encoded = encode(target["input_ids"].to(device), target["attention_mask"].to(device))
            donors = torch.cat([donors, lookup[target["donors"]].to(device)])
            embeddings = torch.cat([embeddings, encoded.to(embeddings.dtype)])
        term, adversary = self.adversary.donor_term(embeddings, donors, batch.progress, prefix="adapt")
        return loss + term, {**figures, **adversary}

    def epoch_figures(self) -> dict[str, float]:
        return self.inner.epoch_figures()


def target_adversary_node(robust: Mapping[str, Any] | None, targets: Sequence[str], settings: AdaptSettings
                          ) -> dict[str, Any]:
    """The ``robust`` node a ``dann`` run's classifier is built with (saved with its checkpoint)."""
    return {"_target_": f"{TargetAdversary.__module__}.{TargetAdversary.__qualname__}", "_recursive_": False,
            "inner": dict(robust) if robust else None, "target_donors": list(targets), "weight": settings.weight,
            "schedule_gamma": settings.schedule_gamma}


# ---- test-time entropy minimisation ----


def layer_norm_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The affine parameters (weight, bias) of every LayerNorm, by name."""
    return {f"{name}.{key}" if name else key: parameter for name, module in model.named_modules()
            if isinstance(module, nn.LayerNorm) for key, parameter in module.named_parameters(recurse=False)}


def entropy_minimisation(infer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], model: nn.Module,
                         cells: UnlabelledCells, steps: int, lr: float, batch_size: int, seed: int, pad_id: int = 0
                         ) -> list[float]:
    """Tent: ``steps`` Adam steps of learning rate ``lr`` on ``model``'s LayerNorm affine parameters alone,
    minimising the mean entropy of ``infer(input_ids, attention_mask)``'s logits on batches of ``batch_size``
    target cells drawn by ``seed``; in eval mode (no dropout). Every parameter's ``requires_grad`` and the
    model's mode are put back. The entropy of each step's batch before its update."""
    if steps == 0:
        return []
    parameters = layer_norm_parameters(model)
    if not parameters:
        raise InputError("adapt=tent adapts LayerNorm parameters, and the model has none")
    trainable = {parameter: parameter.requires_grad for parameter in model.parameters()}
    mode = model.training
    generator = torch.Generator().manual_seed(seed)
    device = next(iter(parameters.values())).device
    entropies = []
    try:
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for parameter in parameters.values():
            parameter.requires_grad_(True)
        optimizer = torch.optim.Adam(parameters.values(), lr=lr)
        with torch.inference_mode(False), torch.enable_grad():
            for _ in range(steps):
                rows = torch.randint(len(cells), (min(batch_size, len(cells)),), generator=generator)
                batch = cells.batch(rows, pad_id)
                logits = infer(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float()
                entropy = -(logits.softmax(dim=-1) * logits.log_softmax(dim=-1)).sum(dim=-1).mean()
                optimizer.zero_grad()
                entropy.backward()
                optimizer.step()
                entropies.append(float(entropy.detach()))
    finally:
        for parameter, flag in trainable.items():
            parameter.requires_grad_(flag)
        model.train(mode)
    return entropies
