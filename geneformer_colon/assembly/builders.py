"""Config -> objects: the datamodule, the classifier module, the Lightning trainer; checkpoints read safely."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from geneformer_colon.common.errors import InputError
from geneformer_colon.common.names import TRAIN
from geneformer_colon.data.datamodule import CellDataModule
from geneformer_colon.model.backbone import Vocabulary
from geneformer_colon.model.masked_genes import MaskedGeneModel
from geneformer_colon.model.module import CellClassifier
from geneformer_colon.runs.checkpoints import read_checkpoint, resolve_checkpoint
from geneformer_colon.runs.config import plain


def build_datamodule(cfg: DictConfig, stage: str | None = None, labelled: bool = True) -> CellDataModule:
    """The data of a composed config (a config from a run directory is checked when it is read); ``labelled``:
    False reads no label (pretraining, whatever ``data.labels`` says)."""
    datamodule = instantiate(cfg.data, tokenizer=plain(cfg.model.tokenizer), use_labels=labelled)
    datamodule.prepare_data()
    datamodule.setup(stage)
    return datamodule


def vocabulary_of(datamodule: CellDataModule) -> Vocabulary:
    return Vocabulary(len(datamodule.dictionaries.token), datamodule.special_token_ids["<pad>"],
                      datamodule.store.meta["input_size"], datamodule.dictionaries, datamodule.settings.model_version)


def build_module(cfg: DictConfig, datamodule: CellDataModule) -> CellClassifier:
    """The classifier: the encoder ``model.encoder`` names (new or pretrained), pooling, head, loss, augmentation."""
    make_bert = instantiate(cfg.model.encoder, _partial_=True)
    bert = make_bert(vocabulary=vocabulary_of(datamodule), seed=cfg.seed)
    return CellClassifier(
        bert_config=bert.config.to_dict(),
        class_names=datamodule.class_names,
        special_token_ids=datamodule.special_token_ids,
        tokenizer={"model_version": datamodule.settings.model_version,
                   "input_size": datamodule.settings.resolved_input_size},
        pooling=cfg.model.pooling,
        head_dropout=cfg.model.head_dropout,
        freeze_layers=cfg.model.freeze_layers,
        loss=plain(cfg.loss),
        augment=plain(cfg.augment),
        optimizer=plain(cfg.optimizer),
        scheduler=plain(cfg.scheduler),
        seed=cfg.seed,
        donors=datamodule.donors,
        train_donors=datamodule.split_donors(TRAIN),
        robust=plain(cfg.get("robust")),
        lora=plain(cfg.model.get("lora")),
        attn_implementation=cfg.model.get("attn_implementation", "sdpa"),
        gradient_checkpointing=bool(cfg.model.get("gradient_checkpointing", False)),
        bert=bert,
    )


def build_masked_gene_model(cfg: DictConfig, datamodule: CellDataModule) -> MaskedGeneModel:
    """The BertForMaskedLM ``model.encoder`` makes (a checkpoint with a masked-gene head, as a released
    Geneformer, continues with that head)."""
    model = instantiate(cfg.model.encoder, _partial_=True)(vocabulary=vocabulary_of(datamodule), seed=cfg.seed,
                                                            masked_lm=True)
    genes = [token for name, token in datamodule.dictionaries.token.items() if not name.startswith("<")]
    return MaskedGeneModel(
        bert_config=model.config.to_dict(),
        special_token_ids=datamodule.special_token_ids,
        gene_token_ids=genes,
        masking=plain(cfg.pretrain.masking),
        tokenizer={"model_version": datamodule.settings.model_version,
                   "input_size": datamodule.settings.resolved_input_size},
        optimizer=plain(cfg.optimizer),
        scheduler=plain(cfg.scheduler),
        seed=cfg.seed,
        model=model,
    )


def load_weights(module: CellClassifier, path: str | Path) -> Path:
    """Copy another run's weights into ``module`` (safe loading; the vocabulary must match)."""
    checkpoint = resolve_checkpoint(path)
    state = read_checkpoint(checkpoint, mapped=True)["state_dict"]
    expected = module.state_dict()
    for name, tensor in state.items():
        if name in expected and expected[name].shape != tensor.shape:
            what = "vocabulary" if "word_embeddings" in name else "shape"
            raise InputError(
                f"{checkpoint}: {name} has {what} {tuple(tensor.shape)} but this run needs "
                f"{tuple(expected[name].shape)}; start from a run with the same model and dictionaries"
            )
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [name for name in missing if not name.startswith("robust.")]  # this run's own strategy starts fresh
    unexpected = [name for name in unexpected if not name.startswith("robust.")]
    if missing or unexpected:
        raise InputError(f"{checkpoint}: not a checkpoint of this model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); start from a run with the same model config")
    return checkpoint


def classifier_from_checkpoint(path: str | Path, which: str = "best") -> tuple[CellClassifier, Path]:
    """A run's classifier (a run directory or a ``.ckpt``), rebuilt from the checkpoint alone, in eval mode."""
    checkpoint_path = resolve_checkpoint(path, which)
    checkpoint = read_checkpoint(checkpoint_path, mapped=True)
    settings = checkpoint.get("hyper_parameters")
    if not isinstance(settings, dict) or "bert_config" not in settings:
        raise InputError(f"{checkpoint_path}: holds no model settings (hyper_parameters); use a checkpoint "
                         "written by train.py of this version")
    try:
        module = CellClassifier(**settings)
    except TypeError as error:
        raise InputError(f"{checkpoint_path}: its model settings do not fit this version ({error}); use a checkpoint "
                         "written by train.py of this version") from None
    missing, unexpected = module.load_state_dict(checkpoint["state_dict"], strict=False)
    if missing or unexpected:
        raise InputError(f"{checkpoint_path}: its weights do not fit its settings (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); the file is damaged")
    return module.eval(), checkpoint_path


def start_from(module: CellClassifier, path: str | Path, reinit_head: bool = False) -> Path:
    """``init_from``: another run's best weights; ``model.reinit_head`` then gives the head fresh ones."""
    checkpoint = load_weights(module, path)
    if reinit_head:
        module.head.reset_parameters()
    return checkpoint


# ---- the trainer ----


def resolve_precision(precision: str | int) -> str | int:
    """``auto``: bf16 autocast where the GPU supports it, full precision otherwise."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def build_trainer(cfg: DictConfig, callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    """A Trainer of ``cfg.trainer`` (any Trainer argument), the configured callbacks and loggers, and ``callbacks``."""
    trainer_kwargs = plain(cfg.trainer)
    trainer_kwargs["precision"] = resolve_precision(trainer_kwargs.get("precision", "auto"))
    configured = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    loggers = [instantiate(c) for c in cfg.logger.values() if c is not None]
    return pl.Trainer(
        **trainer_kwargs,
        callbacks=configured + list(callbacks or []),
        logger=loggers or False,
        use_distributed_sampler=False,
        default_root_dir=cfg.paths.run_dir,
    )
