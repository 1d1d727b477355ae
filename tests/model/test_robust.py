"""Donor-robust training: group DRO, the donor adversary, CORAL (mixup across donors: test_augment.py; LoRA:
test_backbone.py)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from helpers.tiny import CLASSES

from geneformer_colon.assembly.builders import read_checkpoint
from geneformer_colon.common.errors import InputError
from geneformer_colon.jobs.train import train
from geneformer_colon.model import robust
from geneformer_colon.model.losses import FocalLoss
from geneformer_colon.model.robust import (
    CoralAlignment,
    DonorAdversary,
    GroupDRO,
    TrainingBatch,
    coral_penalty,
    reverse_gradient,
)

DONORS = ["A", "B", "C"]


def batch_of(logits: torch.Tensor, labels: torch.Tensor, donors: torch.Tensor, embeddings: torch.Tensor | None = None,
             progress: float = 0.5) -> TrainingBatch:
    targets = torch.nn.functional.one_hot(labels, 3).float()
    return TrainingBatch(FocalLoss(CLASSES, {"Normal": 1.0, "Border": 1.4, "Tumor": 2.2}), logits, targets,
                         logits if embeddings is None else embeddings, donors, progress)


def test_group_dro_raises_the_weight_of_the_hard_donor_within_an_epoch_and_step_zero_is_the_plain_loss():
    # a tiny cohort: donors A and B have a learnable class signal, C's labels are noise
    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(600, 8, generator=g), torch.randint(0, 3, (600,), generator=g)
    donors = torch.arange(600) % 3
    features[donors != 2, labels[donors != 2]] += 3.0
    labels[donors == 2] = torch.randint(0, 3, (200,), generator=g)
    model, dro = torch.nn.Linear(8, 3), GroupDRO(DONORS, 8, step_size=0.2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for rows in torch.randperm(600, generator=g).split(30):  # one epoch
        loss, _ = dro(batch_of(model(features[rows]), labels[rows], donors[rows]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    weights = dro.epoch_figures()
    assert weights["robust/dro_weight/C"] > max(weights["robust/dro_weight/A"], weights["robust/dro_weight/B"])
    assert sum(weights.values()) == pytest.approx(1.0)
    assert "weights" in dro.state_dict()  # travels in checkpoints: a resumed run goes on with them

    still = GroupDRO(DONORS, 8, step_size=0.0)
    batch = batch_of(model(features[:50]), labels[:50], donors[:50])
    assert torch.equal(still(batch)[0], batch.loss(batch.logits, batch.targets))
    with pytest.raises(InputError, match="robust.step_size"):
        GroupDRO(DONORS, 8, step_size=-1)


def test_the_reversal_layer_sends_back_the_heads_gradient_negated_and_scaled():
    x = torch.randn(5, 4, requires_grad=True)
    head = torch.nn.Linear(4, 3)
    head(x).pow(2).sum().backward()
    plain = x.grad.clone()
    x.grad = None
    head(reverse_gradient(x, 0.3)).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, -0.3 * plain)

    # the adversary: the encoder's gradient from the donor term is minus the weight x strength x the head's
    adversary = DonorAdversary(DONORS, 4, weight=0.5, schedule_gamma=10.0)
    embeddings = torch.randn(6, 4, requires_grad=True)
    donors = torch.tensor([0, 1, 2, 0, 1, 2])
    zero_loss = TrainingBatch(lambda logits, targets, **_: logits.sum() * 0, torch.zeros(6, 3), torch.zeros(6, 3),
                              embeddings, donors, progress=0.2)
    adversary(zero_loss)[0].backward()
    through = embeddings.grad.clone()
    embeddings.grad = None
    torch.nn.functional.cross_entropy(adversary.donor_head(embeddings), donors).backward()
    strength = 2 / (1 + torch.exp(torch.tensor(-10 * 0.2))) - 1
    torch.testing.assert_close(through, -0.5 * strength * embeddings.grad)


def test_coral_is_zero_for_donors_alike_positive_otherwise_and_trains_the_encoder_only():
    cells = torch.randn(8, 4)
    donors = torch.tensor([0] * 8 + [1] * 8)
    assert coral_penalty(torch.cat([cells, cells]), donors).item() == 0.0
    assert coral_penalty(torch.cat([cells, cells + 0.5]), donors).item() > 0
    assert coral_penalty(torch.cat([cells, cells * 2]), donors).item() > 0  # same mean, other covariance

    encoder, head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)
    embeddings = encoder(torch.cat([cells, cells + 1]))
    step = TrainingBatch(lambda logits, targets, **_: logits.sum() * 0, head(embeddings), torch.zeros(16, 3),
                         embeddings, donors, progress=0.0)
    CoralAlignment(DONORS, 4, weight=1.0)(step)[0].backward()
    assert encoder.weight.grad.abs().sum() > 0 and head.weight.grad.abs().sum() == 0


# A short colon6 run: four batches an epoch, every epoch.
SHORT = ["experiment=colon6", "logger=csv", "trainer.limit_train_batches=4", "callbacks.early_stopping=null"]


def test_an_adversary_of_weight_zero_trains_as_the_plain_run_and_logs_its_donor_accuracy(tiny_cfg):
    plain = train(tiny_cfg(*SHORT, "run_name=plain"))
    adversary = train(tiny_cfg(*SHORT, "run_name=adversary", "robust=donor_adversary", "robust.weight=0"))
    assert adversary["val"]["macro_f1"] == plain["val"]["macro_f1"]
    root = tiny_cfg().paths.output_dir
    states = [read_checkpoint(f"{root}/{name}/checkpoints/last.ckpt")["state_dict"] for name in ("plain", "adversary")]
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), name
    log = pd.read_csv(f"{root}/adversary/csv/version_0/metrics.csv")
    assert log["robust/donor_accuracy"].notna().any()


def test_coral_trains_with_its_penalty_nonzero_and_logged(tiny_cfg):
    train(tiny_cfg(*SHORT, "run_name=coral", "robust=coral", "trainer.limit_train_batches=2"))
    log = pd.read_csv(f"{tiny_cfg().paths.output_dir}/coral/csv/version_0/metrics.csv")
    penalty = log["robust/coral"].dropna()  # the epoch's mean over its batches of several donors (class_donor)
    assert len(penalty) == 1 and penalty.iloc[0] > 0


def test_an_adversary_of_positive_weight_trains_with_its_gradient_reversed_into_the_encoder(tiny_cfg, monkeypatch):
    steps: list[dict[str, torch.Tensor | float]] = []
    reverse = robust.reverse_gradient

    def watched(inputs: torch.Tensor, strength: float) -> torch.Tensor:
        """The reversal layer as the run calls it, with the gradients that reach it and leave it recorded."""
        step: dict[str, torch.Tensor | float] = {"strength": strength}
        before = inputs.view_as(inputs)  # the reversal's input alone (the embeddings also feed the class head)
        after = reverse(before, strength)
        before.register_hook(lambda grad: step.__setitem__("to_encoder", grad.clone()))
        after.register_hook(lambda grad: step.__setitem__("from_donor_head", grad.clone()))
        steps.append(step)
        return after

    monkeypatch.setattr(robust, "reverse_gradient", watched)
    train(tiny_cfg(*SHORT, "run_name=adversary", "robust=donor_adversary", "robust.weight=0.5",
                   "trainer.limit_train_batches=3"))
    assert len(steps) == 3
    for step in steps:  # strength 0 at step 0, warmed up after: the encoder gets the donor gradient negated
        torch.testing.assert_close(step["to_encoder"], -step["strength"] * step["from_donor_head"])
    assert steps[-1]["strength"] > 0 and steps[-1]["from_donor_head"].abs().sum() > 0
    log = pd.read_csv(f"{tiny_cfg().paths.output_dir}/adversary/csv/version_0/metrics.csv")
    assert (log["robust/donor_loss"].dropna() > 0).all() and log["robust/donor_accuracy"].notna().any()
