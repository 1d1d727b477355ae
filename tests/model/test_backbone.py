"""Backbone: building, loading a real BertForMaskedLM checkpoint, vocabulary checks, pooling, freezing, LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel

from geneformer_colon.assembly.builders import build_datamodule, build_module, read_checkpoint
from geneformer_colon.assembly.trained_classifier import TrainedClassifier
from geneformer_colon.common.errors import InputError
from geneformer_colon.data.dictionaries import GeneDictionaries
from geneformer_colon.jobs.export import export_run
from geneformer_colon.jobs.train import train
from geneformer_colon.model.backbone import (
    CellEncoder,
    ClassifierHead,
    Vocabulary,
    check_vocabulary,
    new_bert,
    pretrained_bert,
)

# Geneformer V1's shape, shrunk: relu, dropout 0.02, layer-norm eps 1e-12, pad 0.
SHAPE = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64)
VOCABULARY = Vocabulary(size=60, pad_token_id=0, input_size=48)
SMALL = dict(vocab_size=60, max_position_embeddings=48, **SHAPE)


def small_bert(seed: int = 0):
    return new_bert(VOCABULARY, **SHAPE, seed=seed).eval()


def batch_with_padding() -> tuple[torch.Tensor, torch.Tensor]:
    """Two cells: 5 genes then 3 pads, and 8 genes."""
    input_ids = torch.tensor([[7, 12, 30, 4, 9, 0, 0, 0], [5, 6, 7, 8, 9, 10, 11, 12]])
    attention_mask = (torch.arange(8) < torch.tensor([[5], [8]])).long()
    return input_ids, attention_mask


def test_build_bert_shape_sdpa_and_seeded() -> None:
    bert = small_bert(seed=3)
    config = bert.config
    assert (config.vocab_size, config.num_hidden_layers, config.hidden_size) == (60, 2, 32)
    assert (config.num_attention_heads, config.intermediate_size) == (4, 64)
    assert (config.max_position_embeddings, config.pad_token_id, config.hidden_act) == (48, 0, "relu")
    assert config.hidden_dropout_prob == config.attention_probs_dropout_prob == 0.02
    assert config.layer_norm_eps == 1e-12
    assert config._attn_implementation == "sdpa"
    assert bert.pooler is None
    assert len(bert.encoder.layer) == 2

    rng_before = torch.random.get_rng_state()
    same, other = new_bert(VOCABULARY, **SHAPE, seed=3), new_bert(VOCABULARY, **SHAPE, seed=4)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "global RNG must be untouched"
    for (name, p), q, r in zip(bert.named_parameters(), same.parameters(), other.parameters()):
        assert torch.equal(p, q), name
    weight = bert.encoder.layer[0].attention.self.query.weight
    assert not torch.equal(weight, other.encoder.layer[0].attention.self.query.weight)


@pytest.mark.parametrize("format", ["safetensors", "bin", "classifier"])
def test_load_pretrained_takes_encoder_of_masked_lm(tmp_path: Path, format: str) -> None:
    torch.manual_seed(11)
    config = BertConfig(**SMALL, hidden_act="relu", hidden_dropout_prob=0.02, layer_norm_eps=1e-12)
    mlm = (BertForSequenceClassification if format == "classifier" else BertForMaskedLM)(config).eval()
    if format in ("safetensors", "classifier"):
        mlm.save_pretrained(tmp_path)  # transformers 5 always writes safetensors
        assert (tmp_path / "model.safetensors").is_file()
    else:  # the older Geneformer layout: config.json + pytorch_model.bin with `bert.` keys
        config.save_pretrained(tmp_path)
        torch.save(mlm.state_dict(), tmp_path / "pytorch_model.bin")
    saved = mlm.state_dict()
    assert "bert.encoder.layer.1.output.dense.weight" in saved

    bert = pretrained_bert(VOCABULARY, tmp_path)
    assert bert.config._attn_implementation == "sdpa"
    assert bert.pooler is None
    assert bert.training  # ready to fine-tune: dropout active
    loaded = bert.state_dict()
    # The pooler of a sequence-classification checkpoint is dropped like the heads.
    assert set(loaded) == {
        k.removeprefix("bert.") for k in saved if k.startswith("bert.") and ".pooler." not in k
    }
    for key, value in loaded.items():
        assert value.dtype == torch.float32
        assert torch.equal(value, saved[f"bert.{key}"]), key
    ids, mask = batch_with_padding()
    bert.eval()
    torch.testing.assert_close(
        bert(input_ids=ids, attention_mask=mask).last_hidden_state,
        mlm.bert(input_ids=ids, attention_mask=mask).last_hidden_state,
    )


def test_load_pretrained_subfolder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mlm = BertForMaskedLM(BertConfig(**SMALL))
    mlm.save_pretrained(tmp_path / "Geneformer-V1-10M")
    bert = pretrained_bert(VOCABULARY, tmp_path, subfolder="Geneformer-V1-10M")
    assert torch.equal(bert.embeddings.word_embeddings.weight, mlm.bert.embeddings.word_embeddings.weight)


@pytest.mark.parametrize("where", ["missing_dir", "empty_dir", "hub_offline"])
def test_load_pretrained_errors_name_path_and_fix(tmp_path: Path, where: str) -> None:
    name = {
        "missing_dir": str(tmp_path / "no" / "such" / "dir"),
        "empty_dir": str(tmp_path),
        "hub_offline": "ctheodoris/Geneformer-not-cached",  # conftest sets HF_HUB_OFFLINE=1
    }[where]
    with pytest.raises(InputError) as error:
        pretrained_bert(VOCABULARY, name)
    message = str(error.value)
    assert name in message and "HF_HUB_OFFLINE" in message and "local directory" in message
    assert "\n" not in message


def test_load_pretrained_refuses_non_bert_and_missing_weights(tmp_path: Path) -> None:
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(InputError, match="model_type is 'gpt2'"):
        pretrained_bert(VOCABULARY, tmp_path / "gpt2")

    # A checkpoint holding only the embeddings: the encoder would silently start random.
    config = BertConfig(**SMALL)
    config.save_pretrained(tmp_path / "partial")
    embeddings = small_bert().embeddings.state_dict()
    partial = {f"bert.embeddings.{k}": v for k, v in embeddings.items()}
    torch.save(partial, tmp_path / "partial" / "pytorch_model.bin")
    with pytest.raises(InputError, match="encoder weights missing"):
        pretrained_bert(VOCABULARY, tmp_path / "partial")


def test_check_vocabulary() -> None:
    config = BertConfig(**SMALL)
    check_vocabulary(config, VOCABULARY, source="m")
    with pytest.raises(InputError) as error:
        check_vocabulary(config, Vocabulary(25426, 0, 48), source="ckpt/v2")
    message = str(error.value)
    assert all(s in message for s in ("ckpt/v2", "60", "25426", "model=geneformer_v1", "model=geneformer_v2"))
    with pytest.raises(InputError, match=r"pad_token_id 0 != dictionary <pad> id 1"):
        check_vocabulary(config, Vocabulary(60, 1, 48), source="m")
    with pytest.raises(InputError, match=r"input size 4096 > max_position_embeddings 48"):
        check_vocabulary(config, Vocabulary(60, 0, 4096), source="m")


def test_a_pretrained_vocabulary_of_another_size_is_refused_before_loading(tmp_path: Path) -> None:
    BertForMaskedLM(BertConfig(**SMALL)).save_pretrained(tmp_path)
    with pytest.raises(InputError, match=r"vocab_size 60 != token dictionary size 100"):
        pretrained_bert(Vocabulary(100, 0, 48), tmp_path)


def test_a_checkpoint_with_its_own_dictionaries_must_be_used_with_them(tmp_path: Path) -> None:
    BertForMaskedLM(BertConfig(**SMALL)).save_pretrained(tmp_path)
    token = {"<pad>": 0, "<mask>": 1, **{f"ENSG{i:011d}": i for i in range(2, 60)}}
    median = {gene: 1.0 for gene in token if gene.startswith("ENSG")}
    GeneDictionaries(token, median).save(tmp_path)
    assert pretrained_bert(Vocabulary(60, 0, 48, GeneDictionaries(token, median)), tmp_path).config.vocab_size == 60
    other = GeneDictionaries(token, {**median, "ENSG00000000002": 2.0})
    with pytest.raises(InputError, match=r"token_dictionary.pkl and gene_median_dictionary.pkl differ"):
        pretrained_bert(Vocabulary(60, 0, 48, other), tmp_path)


def test_mean_pooling_ignores_padding() -> None:
    encoder = CellEncoder(small_bert(), pooling="mean").eval()
    ids, mask = batch_with_padding()
    pooled = encoder(ids, mask)
    assert pooled.shape == (2, encoder.hidden_size) == (2, 32)

    # Independent reference: each cell alone, unpadded, averaged by hand over its positions.
    for row, length in enumerate(mask.sum(1).tolist()):
        alone = encoder.bert(input_ids=ids[row : row + 1, :length]).last_hidden_state
        torch.testing.assert_close(pooled[row], alone[0].mean(0), atol=1e-5, rtol=1e-5)

    # Changing what sits under the padding (ids, hence embeddings) changes nothing.
    other_ids = ids.clone()
    other_ids[0, 5:] = torch.tensor([33, 1, 59])
    torch.testing.assert_close(encoder(other_ids, mask), pooled, atol=1e-6, rtol=1e-6)
    # ... while changing a real gene does.
    other_ids[0, 2] = 31
    assert not torch.allclose(encoder(other_ids, mask)[0], pooled[0], atol=1e-4)


def test_cls_pooling_is_position_zero() -> None:
    bert = small_bert()
    encoder = CellEncoder(bert, pooling="cls").eval()
    ids, mask = batch_with_padding()
    hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(encoder(ids, mask), hidden[:, 0])


def test_freeze_layers() -> None:
    encoder = CellEncoder(small_bert(), freeze_layers=1)
    frozen = {n for n, p in encoder.named_parameters() if not p.requires_grad}
    expected = {
        n for n, _ in encoder.named_parameters()
        if n.startswith(("bert.embeddings.", "bert.encoder.layer.0."))
    }
    assert frozen == expected and len(expected) > 10
    assert all(p.requires_grad for p in CellEncoder(small_bert(), freeze_layers=0).parameters())

    # Backward leaves frozen parameters without gradients.
    ids, mask = batch_with_padding()
    encoder(ids, mask).sum().backward()
    grads = {n: p.grad is not None for n, p in encoder.named_parameters()}
    assert not any(grads[n] for n in frozen)
    assert grads["bert.encoder.layer.1.output.dense.weight"]


@pytest.mark.parametrize("kwargs", [{"pooling": "max"}, {"freeze_layers": 3}, {"freeze_layers": -1}])
def test_cell_encoder_bad_config(kwargs: dict) -> None:
    with pytest.raises(InputError, match="model.(pooling|freeze_layers)"):
        CellEncoder(small_bert(), **kwargs)


def test_classifier_head_reset() -> None:
    torch.manual_seed(0)
    head = ClassifierHead(hidden_size=32, n_classes=3, dropout=0.0)
    pooled = torch.randn(4, 32)
    torch.testing.assert_close(head(pooled), pooled @ head.linear.weight.T + head.linear.bias)
    assert head(pooled).shape == (4, 3)
    with torch.no_grad():
        head.linear.weight.fill_(1.0)
        head.linear.bias.fill_(1.0)
    head.reset_parameters()
    assert torch.count_nonzero(head.linear.bias) == 0
    assert 0.005 < head.linear.weight.std().item() < 0.05


def test_lora_trains_only_adapters_and_its_merged_export_is_plain_bert(tiny_cfg, tmp_path):
    cfg = tiny_cfg("experiment=colon6", "logger=csv", "trainer.limit_train_batches=4", "callbacks.early_stopping=null",
                   "run_name=lora", "model.lora.r=2", "model.lora.alpha=4", "model.lora.dropout=0")
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


def framed_batch(framed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Three cells of 11, 6 and 3 tokens, padded to 11 (a length the encoder pads on to 16); V2 framing puts
    <cls>=2 first and <eos>=3 last in each cell."""
    generator = torch.Generator().manual_seed(0)
    cells = [torch.randint(4, 60, (length,), generator=generator) for length in (11, 6, 3)]
    if framed:
        cells = [torch.cat([torch.tensor([2]), cell[1:-1], torch.tensor([3])]) for cell in cells]
    input_ids = torch.zeros(3, 11, dtype=torch.long)
    attention_mask = torch.zeros(3, 11, dtype=torch.long)
    for row, cell in enumerate(cells):
        input_ids[row, : len(cell)], attention_mask[row, : len(cell)] = cell, 1
    return input_ids, attention_mask


@pytest.mark.parametrize("framed", [False, True], ids=["V1", "V2"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_the_4d_padding_mask_gives_the_2d_masks_logits_and_embeddings(framed: bool, pooling: str) -> None:
    encoder = CellEncoder(small_bert(), pooling=pooling, frame_token_ids=[2, 3] if framed else []).eval()
    head = ClassifierHead(encoder.hidden_size, 3).eval()
    ids, mask = framed_batch(framed)
    seen = []
    forward = encoder.bert.forward
    encoder.bert.forward = lambda **kwargs: seen.append(kwargs) or forward(**kwargs)
    pooled = encoder.pool(encoder.hidden_states(ids, mask, multiple=8), ids, mask)  # as on a GPU
    four_d = seen[-1]["attention_mask"]
    assert four_d.dtype == torch.bool and four_d.shape == (3, 1, 1, 16), "a (batch, 1, 1, L) mask, L a multiple of 8"
    assert seen[-1]["input_ids"].shape == (3, 16)
    # transformers' own path: the 2-D mask, unpadded
    two_d = encoder.pool(encoder.bert(input_ids=ids, attention_mask=mask).last_hidden_state, ids, mask)
    torch.testing.assert_close(pooled, two_d, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head(pooled), head(two_d), atol=1e-5, rtol=1e-5)
    # on the CPU no padding is added; a batch without padding gets no mask at all: SDPA's flash kernel may run
    torch.testing.assert_close(encoder(ids, mask), pooled, atol=1e-5, rtol=1e-5)
    assert seen[-1]["input_ids"].shape == (3, 11)
    encoder(ids[:, :5], torch.ones(3, 5, dtype=torch.long))
    assert seen[-1]["attention_mask"] is None and seen[-1]["input_ids"].shape == (3, 5)


def test_mean_pooling_leaves_out_cls_and_eos() -> None:
    encoder = CellEncoder(small_bert(), pooling="mean", frame_token_ids=[2, 3]).eval()
    ids, mask = framed_batch(framed=True)
    pooled = encoder(ids, mask)
    for row, length in enumerate(mask.sum(1).tolist()):
        alone = encoder.bert(input_ids=ids[row : row + 1, :length]).last_hidden_state[0]
        torch.testing.assert_close(pooled[row], alone[1 : length - 1].mean(0), atol=1e-5, rtol=1e-5)


def test_eager_attention_gives_sdpas_outputs_and_bad_implementations_are_one_line() -> None:
    ids, mask = framed_batch(framed=True)
    sdpa = CellEncoder(small_bert(), pooling="cls").eval()
    eager = CellEncoder(small_bert(), pooling="cls", attn_implementation="eager").eval()
    assert eager.bert.config._attn_implementation == "eager"
    torch.testing.assert_close(eager(ids, mask), sdpa(ids, mask), atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="model.attn_implementation is 'fast'; set it to one of sdpa"):
        CellEncoder(small_bert(), attn_implementation="fast")
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match="model.attn_implementation=flash_attention_2: .*use model.attn_"):
            CellEncoder(small_bert(), attn_implementation="flash_attention_2")


def test_gradient_checkpointing_gives_the_plain_paths_gradients() -> None:
    ids, mask = framed_batch(framed=True)
    grads = []
    for checkpointing in (False, True):
        encoder = CellEncoder(small_bert(), pooling="mean", frame_token_ids=[2, 3],
                              gradient_checkpointing=checkpointing).train()
        layers = encoder.bert.encoder.layer
        assert all(layer.gradient_checkpointing == checkpointing for layer in layers)
        torch.manual_seed(0)  # the same dropout draws (non-reentrant checkpointing replays the RNG state)
        encoder(ids, mask).pow(2).sum().backward()
        grads.append({name: p.grad for name, p in encoder.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-5, msg=name)
