"""Config -> objects: the datamodule, the classifier module and the Lightning trainer."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from geneformer_colon.data.datamodule import CellDataModule
from geneformer_colon.errors import InputError
from geneformer_colon.model.backbone import (
    CellEncoder,
    ClassifierHead,
    build_bert,
    check_vocabulary,
    load_pretrained_bert,
)
from geneformer_colon.model.module import CellClassifier


def build_datamodule(cfg: DictConfig, stage: str | None = None) -> CellDataModule:
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup(stage)
    return datamodule


def build_encoder(model_cfg: DictConfig, datamodule: CellDataModule, seed: int) -> CellEncoder:
    """The pretrained Geneformer named by ``model.pretrained``, else a BERT built from ``model.architecture``."""
    vocab_size = len(datamodule.dictionaries.token)
    pad_id = datamodule.special_token_ids["<pad>"]
    input_size = datamodule.store.meta["input_size"]
    if model_cfg.pretrained:
        bert = load_pretrained_bert(model_cfg.pretrained, subfolder=model_cfg.get("subfolder"),
                                    revision=model_cfg.get("revision"))
        source = f"model.pretrained={model_cfg.pretrained}"
    else:
        bert = build_bert(vocab_size=vocab_size, pad_token_id=pad_id, seed=seed,
                          **OmegaConf.to_container(model_cfg.architecture, resolve=True))
        source = "model.architecture"
    check_vocabulary(bert.config, vocab_size, pad_id, input_size, source)
    return CellEncoder(bert, pooling=model_cfg.pooling, freeze_layers=model_cfg.freeze_layers)


def build_module(cfg: DictConfig, datamodule: CellDataModule) -> CellClassifier:
    encoder = build_encoder(cfg.model, datamodule, cfg.seed)
    head = ClassifierHead(encoder.hidden_size, len(datamodule.class_names), dropout=cfg.model.head_dropout)
    return CellClassifier(
        encoder=encoder,
        head=head,
        loss=instantiate(cfg.loss, class_names=datamodule.class_names),
        augment=instantiate(cfg.augment),
        class_names=datamodule.class_names,
        special_token_ids=datamodule.special_token_ids,
        seed=cfg.seed,
        **OmegaConf.to_container(cfg.optimizer, resolve=True),
    )


def resolve_checkpoint(path: str | Path, which: str = "best") -> Path:
    """A ``.ckpt`` file, or a run directory's ``checkpoints/<which>.ckpt``."""
    path = Path(path)
    checkpoint = path / "checkpoints" / f"{which}.ckpt" if path.is_dir() else path
    if not checkpoint.is_file():
        raise InputError(f"{checkpoint}: no checkpoint there; give a run directory holding "
                         f"checkpoints/{which}.ckpt or a .ckpt file")
    return checkpoint


def load_weights(module: CellClassifier, path: str | Path) -> Path:
    """Copy another run's weights into ``module`` (safe loading; the vocabulary must match)."""
    checkpoint = resolve_checkpoint(path)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    expected = module.state_dict()
    for name, tensor in state.items():
        if name in expected and expected[name].shape != tensor.shape:
            what = "vocabulary" if "word_embeddings" in name else "shape"
            raise InputError(
                f"{checkpoint}: {name} has {what} {tuple(tensor.shape)} but this run needs "
                f"{tuple(expected[name].shape)}; start from a run with the same model and dictionaries"
            )
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(f"{checkpoint}: not a checkpoint of this model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); start from a run with the same model config")
    return checkpoint


def start_from(module: CellClassifier, path: str | Path, reinit_head: bool = False) -> Path:
    """``init_from``: another run's best weights; ``model.reinit_head`` then gives the head fresh ones."""
    checkpoint = load_weights(module, path)
    if reinit_head:
        module.head.reset_parameters()
    return checkpoint


def resolve_precision(precision: str | int) -> str | int:
    """``auto``: bf16 autocast where the GPU supports it, full precision otherwise."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def build_trainer(cfg: DictConfig, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs["precision"] = resolve_precision(trainer_kwargs.get("precision", "auto"))
    return pl.Trainer(
        **trainer_kwargs,
        callbacks=[instantiate(c) for c in cfg.callbacks.values() if c is not None] + list(callbacks or []),
        logger=[instantiate(c) for c in cfg.logger.values() if c is not None],
        use_distributed_sampler=False,
        default_root_dir=cfg.paths.run_dir,
    )
