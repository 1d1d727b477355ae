"""The Geneformer presets (conf/model/geneformer_*.yaml): each composes, names its checkpoint, input size,
dictionaries, framing and pooling, and builds a classifier with a tiny BERT of its vocabulary standing in for the
released weights (in a folder laid out as a clone of ctheodoris/Geneformer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.tiny import CLASSES, compose_train
from hydra.utils import instantiate

from geneformer_colon.data.dictionaries import GeneDictionaries, special_token_ids
from geneformer_colon.data.tokenizer import TokenizerSettings
from geneformer_colon.model.backbone import Vocabulary
from geneformer_colon.model.module import CellClassifier
from geneformer_colon.runs.config import plain

# preset: checkpoint folder, model version, input size, pooling, token budget, activation checkpointing
PRESETS = {
    "geneformer_v1": ("Geneformer-V1-10M", "V1", 2048, "mean", 12 * 2048, False),
    "geneformer_v2": ("Geneformer-V2-104M", "V2", 4096, "cls", 12 * 4096, False),
    "geneformer_v2_316m": ("Geneformer-V2-316M", "V2", 4096, "cls", 12 * 4096, True),
    "geneformer_v2_cancer": ("Geneformer-V2-104M_CLcancer", "V2", 4096, "cls", 12 * 4096, False),
}


def clone_of_geneformer(root: Path, dictionaries: Path, subfolder: str, version: str) -> Path:
    """The real dictionaries where a Geneformer clone keeps them, and a tiny BertForMaskedLM of the version's
    vocabulary and positions as ``subfolder``."""
    from transformers import BertConfig, BertForMaskedLM

    for folder, corpus in ((root / "geneformer" / "gene_dictionaries_30m", "30M"), (root / "geneformer", "104M")):
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("token_dictionary", "gene_median_dictionary", "ensembl_mapping_dict", "gene_name_id_dict"):
            (folder / f"{name}_gc{corpus}.pkl").symlink_to(dictionaries / f"{name}_gc{corpus}.pkl")
    corpus = "30M" if version == "V1" else "104M"
    token = GeneDictionaries.load(dictionaries / f"token_dictionary_gc{corpus}.pkl",
                                  dictionaries / f"gene_median_dictionary_gc{corpus}.pkl").token
    BertForMaskedLM(BertConfig(vocab_size=len(token), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=2048 if version == "V1" else 4096,
                               hidden_act="relu", pad_token_id=0)).save_pretrained(root / subfolder)
    return root


@pytest.mark.parametrize("preset", PRESETS)
def test_every_geneformer_preset_composes_and_builds_its_classifier(preset, geneformer_dicts, tmp_path):
    subfolder, version, input_size, pooling, max_tokens, checkpointing = PRESETS[preset]
    checkout = clone_of_geneformer(tmp_path / "Geneformer", geneformer_dicts, subfolder, version)
    cfg = compose_train(["experiment=colon6", "data=kul3", f"model={preset}", f"paths.geneformer_dir={checkout}"])
    assert (cfg.model.encoder.subfolder, cfg.model.pooling, cfg.data.max_tokens) == (subfolder, pooling, max_tokens)
    assert (cfg.model.gradient_checkpointing, cfg.model.attn_implementation) == (checkpointing, "sdpa")
    assert cfg.optimizer.lr == 5e-5 and cfg.data.batch_size == 12
    tokenizer = plain(cfg.model.tokenizer)
    settings = TokenizerSettings(model_version=tokenizer["model_version"], input_size=tokenizer["input_size"])
    assert (settings.model_version, settings.resolved_input_size) == (version, input_size)
    dictionaries = GeneDictionaries.load(tokenizer["token_dictionary"], tokenizer["gene_median_dictionary"])
    specials = special_token_ids(dictionaries.token, version)
    vocabulary = Vocabulary(len(dictionaries.token), specials["<pad>"], input_size, dictionaries, version)
    bert = instantiate(cfg.model.encoder, _partial_=True)(vocabulary=vocabulary)
    module = CellClassifier(bert_config=bert.config.to_dict(), class_names=CLASSES, special_token_ids=specials,
                            tokenizer=tokenizer, pooling=cfg.model.pooling, bert=bert,
                            attn_implementation=cfg.model.attn_implementation,
                            gradient_checkpointing=cfg.model.gradient_checkpointing).eval()
    framing = [specials[name] for name in ("<cls>", "<eos>") if name in specials]
    assert sorted(module.encoder.frame_token_ids.tolist()) == sorted(framing) and len(framing) == (version == "V2") * 2
    genes = torch.tensor([[token for name, token in dictionaries.token.items() if not name.startswith("<")][:20]])
    cell = torch.cat([genes[:, :1] * 0 + specials["<cls>"], genes, genes[:, :1] * 0 + specials["<eos>"]], 1) \
        if framing else genes
    assert module(cell, torch.ones_like(cell)).shape == (1, 3)
