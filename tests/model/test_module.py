"""The classifier (model/module.py): one inference call whose answer for a cell does not depend on its
batch, and a training step whose loss reaches the encoder and the head."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import CLASSES
from transformers import BertConfig

from geneformer_colon.model.module import CellClassifier


def tiny_classifier(pooling: str = "mean") -> CellClassifier:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, pad_token_id=0)
    return CellClassifier(config.to_dict(), CLASSES, {"<pad>": 0, "<mask>": 1}, pooling=pooling,
                          donors=["A", "B"], train_donors=["A", "B"]).eval()


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_a_cells_answer_is_the_same_alone_or_padded_in_a_batch(pooling):
    module = tiny_classifier(pooling)
    short, long = torch.tensor([5, 9, 7]), torch.tensor([6, 8, 10, 12, 14, 16])
    batch = torch.zeros(2, len(long), dtype=torch.long)
    batch[0, : len(short)], batch[1] = short, long
    with torch.no_grad():
        together = module.infer(batch, (batch != 0).long())
        alone = module.infer(short[None], torch.ones(1, len(short), dtype=torch.long))
    torch.testing.assert_close(together.logits[:1], alone.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together.embeddings[:1], alone.embeddings, atol=1e-5, rtol=1e-5)
    assert together.embeddings.shape == (2, 16) and together.logits.shape == (2, len(CLASSES))
    torch.testing.assert_close(together.probabilities.sum(dim=1), torch.ones(2))
    torch.testing.assert_close(module(batch, (batch != 0).long()), together.logits)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # no Trainer here: nothing to log to
def test_a_training_step_reaches_the_encoder_and_the_head():
    module = tiny_classifier().train()
    input_ids = torch.randint(2, 40, (4, 8))
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": torch.tensor([0, 1, 2, 0]),
             "donors": torch.tensor([0, 1, 1, 0])}
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    for part in (module.encoder, module.head):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_with_a_token_budget_every_cell_of_an_optimizer_step_weighs_the_same():
    """Two batches of one optimizer step (gradient accumulation 2), of 2 long and 6 short cells: with the token
    budget's loss scale (cells over the mean cells a batch, 4) the step's loss is the mean over its 8 cells, each
    cell weighing 1/8, not 1/4 in the small batch and 1/12 in the large one."""
    import numpy as np
    import torch.nn.functional as F

    from geneformer_colon.data.datamodule import pad_batch
    from geneformer_colon.model.backbone import Vocabulary, new_bert
    from geneformer_colon.model.module import CellClassifier

    bert = new_bert(Vocabulary(size=60, pad_token_id=0, input_size=48), num_hidden_layers=1, hidden_size=16,
                    num_attention_heads=2, intermediate_size=32)
    module = CellClassifier(bert_config=bert.config.to_dict(), class_names=["A", "B", "C"],
                            special_token_ids={"<pad>": 0, "<mask>": 1}, head_dropout=0.0, donors=["d"],
                            train_donors=["d"]).eval()
    rng = np.random.default_rng(0)
    batches = [[{"tokens": rng.integers(2, 60, length), "label": int(rng.integers(3)), "index": 0, "donor": 0}
                for length in lengths] for lengths in ([40, 36], [9, 8, 8, 7, 6, 5])]
    step = sum(module.training_step(pad_batch(items, 0, cells_per_batch=4.0), i) for i, items in enumerate(batches)) / 2
    cells = [item for items in batches for item in items]
    alone = [pad_batch([item]) for item in cells]
    per_cell = torch.stack([F.cross_entropy(module(one["input_ids"], one["attention_mask"]), one["labels"])
                            for one in alone])
    torch.testing.assert_close(step, per_cell.mean(), atol=1e-5, rtol=1e-5)
    unscaled = sum(module.training_step(pad_batch(items, 0), i) for i, items in enumerate(batches)) / 2
    assert not torch.allclose(unscaled, per_cell.mean(), atol=1e-3)  # a batch's mean alone weighs cells unequally
