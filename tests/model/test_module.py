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
