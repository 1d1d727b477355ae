"""Donor-robust training: group DRO, the donor adversary, CORAL, mixup across donors, LoRA."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import compose_train, tiny_overrides
from safetensors.torch import load_file
from transformers import BertModel

from geneformer_colon.assembly.builders import build_datamodule, build_module, read_checkpoint
from geneformer_colon.assembly.trained_classifier import TrainedClassifier
from geneformer_colon.common.errors import InputError
from geneformer_colon.jobs.export import export_run
from geneformer_colon.jobs.train import train
from geneformer_colon.model.augment import BatchAugment
from geneformer_colon.model.losses import FocalLoss
from geneformer_colon.model.robust import (
    CoralAlignment,
    DonorAdversary,
    GroupDRO,
    TrainingBatch,
    coral_penalty,
    reverse_gradient,
)

CLASSES = ["Normal", "Border", "Tumor"]
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


@pytest.mark.parametrize("same_class", [False, True])
def test_mixup_across_donors_pairs_cells_of_two_donors(same_class):
    n = 40
    g = torch.Generator().manual_seed(1)
    donors, labels = torch.randint(0, 4, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)
    augment = BatchAugment(mixup_prob=1.0, mixup_alpha=0.6, mixup_across_donors=True, mixup_same_class=same_class)
    for seed in range(5):
        mixed, _ = augment.mix(torch.eye(n), torch.zeros(n, 3), torch.Generator().manual_seed(seed), donors, labels)
        for row in range(n):
            partners = [int(j) for j in torch.nonzero(mixed[row]).flatten() if j != row]
            if mixed[row, row] == 1:  # no eligible partner in the batch: left as it was
                continue
            (partner,) = partners
            assert donors[partner] != donors[row]
            if same_class:
                assert labels[partner] == labels[row]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, shared_dirs) -> list[str]:
    return tiny_overrides(tmp_path_factory.mktemp("robust"), shared_dirs) + [
        "experiment=colon6", "logger=csv", "trainer.limit_train_batches=4", "callbacks.early_stopping=null"]


def test_an_adversary_of_weight_zero_trains_as_the_plain_run_and_logs_its_donor_accuracy(tiny):
    plain = train(compose_train(tiny + ["run_name=plain"]))
    adversary = train(compose_train(tiny + ["run_name=adversary", "robust=donor_adversary", "robust.weight=0"]))
    assert adversary["val"]["macro_f1"] == plain["val"]["macro_f1"]
    root = compose_train(tiny).paths.output_dir
    states = [read_checkpoint(f"{root}/{name}/checkpoints/last.ckpt")["state_dict"] for name in ("plain", "adversary")]
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), name
    log = pd.read_csv(f"{root}/adversary/csv/version_0/metrics.csv")
    assert log["robust/donor_accuracy"].notna().any()


def test_lora_trains_only_adapters_and_its_merged_export_is_plain_bert(tiny, tmp_path):
    cfg = compose_train(tiny + ["run_name=lora", "model.lora.r=2", "model.lora.alpha=4", "model.lora.dropout=0"])
    initial = build_module(cfg, build_datamodule(cfg)).state_dict()
    train(cfg)
    run_dir = cfg.paths.output_dir + "/lora"
    trained = read_checkpoint(f"{run_dir}/checkpoints/last.ckpt")["state_dict"]
    assert set(trained) == set(initial)
    for name, tensor in initial.items():
        if name.startswith("encoder.") and "lora_" not in name:
            assert torch.equal(trained[name], tensor), f"{name} changed: only adapters may train"
    assert any("lora_B" in name and not torch.equal(trained[name], initial[name]) for name in initial)

    export = export_run(run_dir, tmp_path / "export")
    bert = BertModel.from_pretrained(export, add_pooling_layer=False).eval()
    assert not any("lora" in name for name in bert.state_dict())
    model = TrainedClassifier.from_run(run_dir)
    head = load_file(export / "cell_classifier.safetensors")
    ids = torch.randint(4, bert.config.vocab_size, (4, 30))
    mask = torch.ones_like(ids)
    mask[2, 20:] = 0
    with torch.no_grad():
        hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        exported = (pooled @ head["linear.weight"].T + head["linear.bias"]).softmax(-1)
        from_run = model.module.infer(ids, mask).probabilities
    torch.testing.assert_close(exported, from_run, atol=1e-5, rtol=0)
