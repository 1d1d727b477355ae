"""Adapting to a target donor's unlabelled cells (adaptation.py): the settings' refusals, class-balanced pseudo-labels
and self-training on a planted shift, tent's LayerNorm-only updates, the target adversary's donor head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertConfig

from geneformer_colon.common.errors import InputError
from geneformer_colon.data.token_rows import padded_length
from geneformer_colon.data.unlabelled import UnlabelledCells
from geneformer_colon.model.adaptation import (
    AdaptSettings,
    TargetAdversary,
    check_adaptation,
    entropy_minimisation,
    layer_norm_parameters,
    pseudo_labels,
    self_train,
)
from geneformer_colon.model.module import CellClassifier
from geneformer_colon.model.robust import GroupDRO, PlainTraining, TrainingBatch


@pytest.mark.parametrize(("node", "expected"), [
    ({"name": "self_training", "threshold": 1.0}, "adapt.threshold is 1.0; set it to a probability strictly between"),
    ({"name": "self_training", "threshold": 0}, "adapt.threshold is 0;"),
    ({"name": "self_training", "rounds": 0}, "adapt.rounds is 0; set it to a whole number of rounds >= 1"),
    ({"name": "tent", "steps": -1}, "adapt.steps is -1"),
    ({"name": "tent", "lr": 0}, "adapt.lr is 0"),
    ({"name": "tent", "rounds": 2}, "adapt.rounds is no key of adapt=tent"),
    ({"name": "dann", "targets": "val"}, "adapt.targets is 'val'; set it to test, val_and_test or a list of donors"),
    ({"name": "mlm", "masking": {"select": 2}}, "pretrain.masking.select is 2"),
    ({"name": "nope"}, "adapt.name is 'nope'; choose adapt=none"),
])
def test_a_bad_setting_is_one_line_naming_its_key(node, expected):
    with pytest.raises(InputError) as raised:
        AdaptSettings.of(node)
    assert expected in str(raised.value) and "\n" not in str(raised.value)


def test_targets_are_held_out_donors_never_a_training_donor():
    assert AdaptSettings.of({"name": "tent"}).target_donors(["KUL19"], ["KUL01"]) == ["KUL01"]
    assert AdaptSettings.of({"name": "tent", "targets": "val_and_test"}).target_donors(["KUL19"], ["KUL01"]) == [
        "KUL19", "KUL01"]
    with pytest.raises(InputError, match=r"adapt.targets names \['KUL21'\], not a validation or test donor"):
        AdaptSettings.of({"name": "tent", "targets": ["KUL01", "KUL21"]}).target_donors(["KUL19"], ["KUL01"])
    with pytest.raises(InputError, match="names none"):
        AdaptSettings.of({"name": "dann"}).target_donors(["KUL19"], [])
    # mlm's validation donors select its pretraining's epoch: named as a target in a list, refused as in val_and_test
    with pytest.raises(InputError, match=r"validation donor\(s\) \['KUL19'\] cannot be targets"):
        AdaptSettings.of({"name": "mlm", "targets": ["KUL01", "KUL19"]}).target_donors(["KUL19"], ["KUL01"])


def test_combinations_that_cannot_work_are_refused_before_any_data():
    robust = {"_target_": "geneformer_colon.model.robust.GroupDRO"}
    with pytest.raises(InputError, match="use robust=none"):
        check_adaptation({"adapt": {"name": "self_training"}, "robust": robust, "callbacks": {"model_checkpoint": {}}})
    with pytest.raises(InputError, match="callbacks.model_checkpoint is null"):
        check_adaptation({"adapt": {"name": "tent"}, "callbacks": {"model_checkpoint": None}})
    with pytest.raises(InputError, match="use adapt.targets=test"):
        check_adaptation({"adapt": {"name": "mlm", "targets": "val_and_test"}})
    with pytest.raises(InputError, match="init_from=outputs/colon3 would copy that run's weights over it; set init_"):
        check_adaptation({"adapt": {"name": "mlm"}, "init_from": "outputs/colon3"})
    assert check_adaptation({"adapt": {"name": "dann"}, "robust": robust}).name == "dann"


def test_pseudo_labels_are_confident_class_balanced_and_capped_by_the_share():
    probabilities = np.array([[0.95, 0.05], [0.99, 0.01], [0.97, 0.03], [0.6, 0.4], [0.08, 0.92], [0.2, 0.8]])
    rows, labels = pseudo_labels(probabilities, threshold=0.9, share=1 / 3)  # a quota of one cell a class
    assert rows.tolist() == [1, 4] and labels.tolist() == [0, 1]
    rows, labels = pseudo_labels(probabilities, threshold=0.9, share=1.0)
    assert rows.tolist() == [0, 1, 2, 4] and labels.tolist() == [0, 0, 0, 1]  # 0.6 and 0.8 are below the threshold


def test_self_training_on_a_planted_shift_raises_pseudo_label_accuracy_and_ends_above_the_unadapted_model():
    """Three well separated classes on a line; the target's are shifted by 1.6 standard deviations of the gaps, so
    the source's boundaries cut into its first two classes."""
    from sklearn.linear_model import LogisticRegression

    draw = np.random.default_rng(0)
    means = np.array([[0.0, 0.0], [4.0, 0.0], [8.0, 0.0]])
    source_y, target_y = np.repeat(np.arange(3), 200), np.repeat(np.arange(3), 200)
    source_x = means[source_y] + draw.normal(0, 0.7, (600, 2))
    target_x = means[target_y] + [1.6, 0.0] + draw.normal(0, 0.7, (600, 2))
    model = LogisticRegression().fit(source_x, source_y)
    unadapted = (model.predict(target_x) == target_y).mean()
    accuracy_each_round = []

    def predict() -> np.ndarray:
        probabilities = model.predict_proba(target_x)
        accuracy_each_round.append((probabilities.argmax(1) == target_y).mean())
        return probabilities

    def fit(rows: np.ndarray, labels: np.ndarray) -> None:  # the target's own labels are never read here
        model.fit(np.concatenate([source_x, target_x[rows]]), np.concatenate([source_y, labels]))

    rounds = self_train(predict, fit, rounds=4, threshold=0.8)
    adapted = (model.predict(target_x) == target_y).mean()
    pseudo_accuracy = [(pseudo.labels == target_y[pseudo.rows]).mean() for pseudo in rounds]
    assert [pseudo.share for pseudo in rounds] == [0.25, 0.5, 0.75, 1.0]
    assert [len(pseudo.rows) for pseudo in rounds] == sorted(len(pseudo.rows) for pseudo in rounds)
    assert all(min(pseudo.counts(["a", "b", "c"]).values()) > 0 for pseudo in rounds)
    assert np.all(np.diff(accuracy_each_round) >= 0) and accuracy_each_round[-1] > accuracy_each_round[0]
    assert pseudo_accuracy[-1] > 0.9
    assert unadapted < 0.85 and adapted > unadapted + 0.05, (unadapted, adapted, accuracy_each_round)


class Store:
    """A store of random cells: tokens 2..29 of 6 to 12 genes a cell."""

    def __init__(self, cells: int = 24) -> None:
        draw = np.random.default_rng(1)
        self.cells = [draw.permutation(np.arange(2, 30))[: draw.integers(6, 13)] for _ in range(cells)]

    def cell_tokens(self, position: int) -> np.ndarray:
        return self.cells[position]


def tiny_classifier(**settings) -> CellClassifier:
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32).to_dict()
    torch.manual_seed(0)
    return CellClassifier(config, ["a", "b", "c"], {"<pad>": 0, "<mask>": 1}, **settings)


def test_unlabelled_batches_carry_no_label():
    batch = UnlabelledCells(Store(), np.arange(5), np.zeros(5, int)).batch([0, 3])
    assert set(batch) == {"input_ids", "attention_mask", "index", "donors"}


def test_tent_changes_only_layer_norm_affine_parameters_and_zero_steps_nothing():
    model = tiny_classifier()
    cells = UnlabelledCells(Store(), np.arange(24), np.zeros(24, int))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    probe = cells.batch(range(24))
    model.eval()
    unadapted = model(probe["input_ids"], probe["attention_mask"]).detach()

    assert entropy_minimisation(model.forward, model, cells, 0, 1e-2, 8, seed=0) == []
    assert torch.equal(model(probe["input_ids"], probe["attention_mask"]), unadapted)

    entropies = entropy_minimisation(model.forward, model, cells, 5, 5e-2, 8, seed=0)
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    affine = {name for name, _ in model.named_parameters() if ".LayerNorm." in name}  # BERT's norms
    assert affine == set(layer_norm_parameters(model))
    assert changed and changed <= affine, changed - affine
    assert any(name.startswith("encoder.") for name in changed)
    assert len(entropies) == 5 and entropies[-1] < entropies[0]
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags and not model.training


def test_the_target_adversary_adds_a_donor_head_term_over_training_and_target_donors():
    hidden, donors = 16, ["A", "B"]
    logits, labels = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    targets = torch.nn.functional.one_hot(labels, 3).float()
    embeddings = torch.randn(4, hidden, requires_grad=True)
    cells = UnlabelledCells(Store(), np.arange(6), np.full(6, 2))  # donor index 2 of ["A", "B", "T"]
    encoder = torch.nn.Sequential(torch.nn.Embedding(30, hidden))

    def encode(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return encoder(input_ids).mean(dim=1)

    batch = TrainingBatch(lambda out, soft, sample_weight=None: torch.nn.functional.cross_entropy(out, soft), logits,
                          targets, embeddings, torch.tensor([0, 1, 0, 1]), 0.5)
    plain = PlainTraining(donors, hidden)(batch)[0]
    for weight in (0.0, 0.5):
        encoded = []
        adversary = TargetAdversary(donors, hidden, ["T"], weight=weight)
        adversary.attach(lambda ids, mask: encoded.append(ids.shape) or encode(ids, mask), cells, ["A", "B", "T"],
                         pad_id=0)
        state = torch.random.get_rng_state()
        loss, figures = adversary(batch)
        assert adversary.adversary.donor_head[-1].out_features == 3 and "adapt/donor_accuracy" in figures
        assert (loss == plain) == (weight == 0.0)
        # weight 0: no target cell drawn or encoded, the random state the inner strategy's run leaves
        assert (encoded == []) == torch.equal(torch.random.get_rng_state(), state) == (weight == 0.0)
    assert encoded[0][0] == len(batch.embeddings)  # as many target cells as training cells
    loss.backward()
    assert encoder[0].weight.grad.abs().sum() > 0  # the target cells' gradient reaches the encoder
    # under a token budget (data.max_tokens), only as many target cells as fit it (cells pad to 8 or 16 tokens here)
    encoded.clear()
    adversary.attach(lambda ids, mask: encoded.append(ids.shape) or encode(ids, mask), cells, ["A", "B", "T"],
                     pad_id=0, max_tokens=30)
    torch.manual_seed(0)
    adversary(batch)
    assert 1 <= encoded[0][0] < len(batch.embeddings) and encoded[0][0] * padded_length(encoded[0][1]) <= 30
    inner = TargetAdversary(donors, hidden, ["T"], inner={"_target_": "geneformer_colon.model.robust.GroupDRO"})
    assert isinstance(inner.inner, GroupDRO)
    with pytest.raises(InputError, match="target cells of donors outside"):
        inner.attach(encode, UnlabelledCells(Store(), np.arange(3), np.zeros(3, int)), ["A", "B", "T"], 0)
