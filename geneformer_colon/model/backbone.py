"""The Geneformer encoder: build or load a BERT, pool it to one vector per cell, classify it.

``model.encoder`` in the config names how the BERT is made, by its ``_target_``:
:func:`new_bert` (random weights of a given shape) or :func:`pretrained_bert` (a Geneformer
checkpoint). Either is called with the :class:`Vocabulary` the data gives. A released Geneformer
checkpoint is a ``BertForMaskedLM``; only its encoder (``bert.*``) is used here, the
masked-language-model head is dropped and the classifier head starts fresh.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, BertConfig, BertForMaskedLM, BertModel, PretrainedConfig
from transformers.utils import logging as transformers_logging

from geneformer_colon.common.errors import InputError
from geneformer_colon.data.dictionaries import (
    MAPPING_FILE,
    MEDIAN_FILE,
    TOKEN_FILE,
    GeneDictionaries,
    clone_hint,
    load_settings,
)
from geneformer_colon.data.token_rows import PAD_MULTIPLE, padded_length

log = logging.getLogger(__name__)

Pooling = Literal["cls", "mean"]
# model.attn_implementation: PyTorch's SDPA (its flash or memory-efficient kernels, padding as a (batch, 1, 1, L)
# boolean mask), flash-attn 2 (the flash-attn package and a CUDA GPU; padding removed before the kernel) or eager.
ATTENTION_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")


@dataclass(frozen=True)
class Vocabulary:
    """What a BERT must fit: the token dictionary's size and ``<pad>`` id, the longest input, and (to
    check a checkpoint that carries its own) the dictionaries and model version cells are tokenized with."""

    size: int
    pad_token_id: int
    input_size: int
    dictionaries: GeneDictionaries | None = None
    model_version: str = "V1"


def new_bert(
    vocabulary: Vocabulary,
    num_hidden_layers: int = 6,
    hidden_size: int = 256,
    num_attention_heads: int = 4,
    intermediate_size: int = 512,
    hidden_act: str = "relu",
    hidden_dropout_prob: float = 0.02,
    attention_probs_dropout_prob: float = 0.02,
    layer_norm_eps: float = 1e-12,
    max_position_embeddings: int | None = None,
    seed: int = 0,
    masked_lm: bool = False,
) -> BertModel | BertForMaskedLM:
    """A randomly initialised BERT encoder of Geneformer's shape (defaults are Geneformer V1's).

    Positions: ``max_position_embeddings``, by default the vocabulary's input size. The
    initialisation depends on ``seed`` only: the global torch RNG is neither read nor advanced.
    ``masked_lm``: the encoder inside a ``BertForMaskedLM`` (for pretraining).
    """
    config = BertConfig(
        vocab_size=vocabulary.size,
        num_hidden_layers=num_hidden_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings or vocabulary.input_size,
        pad_token_id=vocabulary.pad_token_id,
        hidden_act=hidden_act,
        hidden_dropout_prob=hidden_dropout_prob,
        attention_probs_dropout_prob=attention_probs_dropout_prob,
        layer_norm_eps=layer_norm_eps,
    )
    if hidden_size % num_attention_heads:
        raise InputError(f"model.encoder.hidden_size {hidden_size} is not a multiple of num_attention_heads "
                         f"{num_attention_heads}; choose sizes that divide")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bert = bert_from_config(config.to_dict())
        model = with_masked_lm_head(bert) if masked_lm else bert
    check_vocabulary(bert.config, vocabulary, "model.encoder")
    return model


def with_masked_lm_head(bert: BertModel) -> BertForMaskedLM:
    """A BertForMaskedLM around ``bert`` (its prediction head fresh, the decoder tied to the embeddings)."""
    model = BertForMaskedLM(bert.config)
    model.bert = bert
    model.tie_weights()
    return model


def bert_from_config(config: dict[str, Any]) -> BertModel:
    """A BERT encoder of a saved shape (``BertConfig.to_dict()``), random weights, SDPA attention."""
    settings = {key: value for key, value in config.items() if not key.startswith("_")}
    return BertModel(BertConfig(**settings, attn_implementation="sdpa"), add_pooling_layer=False)


def _unloadable(source: str, error: Exception, pretrained: str | os.PathLike[str]) -> InputError:
    reason = str(error).strip().splitlines()[0]
    if Path(pretrained).parent.is_dir() and not Path(pretrained).exists():  # a local clone that is not there
        return InputError(f"{source}: no such directory; {clone_hint(pretrained)}")
    return InputError(
        f"{source}: cannot load a Geneformer checkpoint ({reason}); give a local directory of a "
        "Geneformer checkout holding config.json and model.safetensors or pytorch_model.bin "
        "(e.g. Geneformer/Geneformer-V1-10M), or a hub id such as ctheodoris/Geneformer with "
        "network access (offline: download it once, then set HF_HUB_OFFLINE=1)"
    )


def pretrained_bert(
    vocabulary: Vocabulary,
    pretrained: str | os.PathLike[str],
    subfolder: str | None = None,
    revision: str | None = None,
    seed: int = 0,
    masked_lm: bool = False,
) -> BertModel | BertForMaskedLM:
    """The encoder of a Geneformer checkpoint (hub id or local directory), in float32 with SDPA.

    Works for checkpoints saved as ``BertForMaskedLM``, ``BertForSequenceClassification`` or
    ``BertModel``, in safetensors or ``pytorch_model.bin``: task heads are ignored. A checkpoint
    that leaves any encoder weight uninitialised is refused rather than silently trained from
    random weights, and so is one whose vocabulary does not fit the dictionaries in use or whose
    directory holds other dictionaries than those (``seed`` is unused: the weights are loaded).
    ``masked_lm``: the checkpoint as a ``BertForMaskedLM``, its masked-gene head too when it has one
    (a released Geneformer: continued pretraining goes on with its head).
    """
    source = f"{pretrained}" + (f" (subfolder {subfolder})" if subfolder else "")
    hub_kwargs = {"subfolder": subfolder or "", "revision": revision or "main"}
    try:
        config = AutoConfig.from_pretrained(pretrained, **hub_kwargs)
    except (OSError, ValueError) as error:  # ValueError: a config.json without a known model_type
        raise _unloadable(source, error, pretrained) from None
    if config.model_type != "bert":
        raise InputError(
            f"{source}: model_type is {config.model_type!r}, not 'bert'; "
            "point the model at a Geneformer checkpoint (a BERT)"
        )
    check_vocabulary(config, vocabulary, source)
    check_own_dictionaries(Path(pretrained) / (subfolder or ""), vocabulary, source)
    model_class, extra = (BertForMaskedLM, {}) if masked_lm else (BertModel, {"add_pooling_layer": False})
    try:
        with _quiet_loading(hide_progress=Path(pretrained).is_dir()):
            model, info = model_class.from_pretrained(
                pretrained,
                config=config,
                attn_implementation="sdpa",
                dtype=torch.float32,
                output_loading_info=True,
                **extra,
                **hub_kwargs,
            )
    except OSError as error:
        raise _unloadable(source, error, pretrained) from None
    encoder_missing = [key for key in info["missing_keys"] if not key.startswith("cls.")]  # a head may start fresh
    if encoder_missing:
        missing = sorted(encoder_missing)
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise InputError(
            f"{source}: {len(missing)} encoder weights missing from the checkpoint ({shown}); "
            "point the model at a Geneformer BERT checkpoint"
        )
    if masked_lm and info["missing_keys"]:
        log.warning("%s: no masked-gene head in the checkpoint; the head starts from random weights", source)
    return model.train()  # from_pretrained leaves it in eval mode: dropout would stay off in training


QUIET_LOADING_LOGGERS = ("transformers.modeling_utils", "transformers.distributed.tensor_parallel")


@contextmanager
def _quiet_loading(hide_progress: bool) -> Iterator[None]:
    """``from_pretrained`` without its load report (a released Geneformer is a masked LM, so loading its
    encoder always "reports" the unused ``cls.*`` head; the caller checks the loading info itself), without
    the tensor-parallel plan check a quiet load triggers (a line naming every layer "not sharded") and, with
    ``hide_progress`` (a local directory: nothing to download), without its progress bar."""
    reports = [transformers_logging.get_logger(name) for name in QUIET_LOADING_LOGGERS]
    levels, bar = [report.level for report in reports], transformers_logging.is_progress_bar_enabled()
    for report in reports:
        report.setLevel(logging.ERROR)
    if hide_progress:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        for report, level in zip(reports, levels):
            report.setLevel(level)
        if bar:
            transformers_logging.enable_progress_bar()


def check_own_dictionaries(directory: Path, vocabulary: Vocabulary, source: str) -> None:
    """A checkpoint directory that carries its dictionaries and tokenizer settings (pretrain.py's hf/, an
    export) must be used with them: the same token and median dictionaries, model version and id mapping."""
    own = directory / TOKEN_FILE
    if vocabulary.dictionaries is None or not own.is_file():
        return
    median = directory / MEDIAN_FILE
    theirs = GeneDictionaries.load(own, median) if median.is_file() else None
    ours = vocabulary.dictionaries
    if theirs is None or theirs.token != ours.token or theirs.median != ours.median:
        raise InputError(
            f"{source}: its token_dictionary.pkl and gene_median_dictionary.pkl differ from the dictionaries this run "
            "tokenizes with; set model.tokenizer.token_dictionary and gene_median_dictionary to the files in that "
            "directory (model=pretrained does)"
        )
    recorded = load_settings(directory)
    if recorded is None:
        return
    mapped = ours.mapping is not None
    if recorded["model_version"] != vocabulary.model_version or recorded["gene_mapping"] != mapped:
        mapping = directory / MAPPING_FILE if recorded["gene_mapping"] else "null"
        theirs_mapped = "with" if recorded["gene_mapping"] else "without"
        raise InputError(
            f"{source}: trained on {recorded['model_version']} tokens {theirs_mapped} an id mapping, but this run "
            f"tokenizes {vocabulary.model_version} {'with' if mapped else 'without'} one; set "
            f"model.tokenizer.model_version={recorded['model_version']} model.tokenizer.gene_mapping={mapping}")


def check_vocabulary(config: PretrainedConfig, vocabulary: Vocabulary, source: str) -> None:
    """Refuse a model whose vocabulary or positions do not fit the tokenizer's dictionaries.

    A model whose config has no pad id is accepted: only the attention mask excludes padding.
    """
    problems = []
    if config.vocab_size != vocabulary.size:
        problems.append(f"vocab_size {config.vocab_size} != token dictionary size {vocabulary.size}")
    if config.pad_token_id is not None and config.pad_token_id != vocabulary.pad_token_id:
        problems.append(f"pad_token_id {config.pad_token_id} != dictionary <pad> id {vocabulary.pad_token_id}")
    if vocabulary.input_size > config.max_position_embeddings:
        problems.append(
            f"input size {vocabulary.input_size} > max_position_embeddings {config.max_position_embeddings}")
    if problems:
        raise InputError(
            f"{source}: model does not match the token dictionary: {'; '.join(problems)}; use the "
            "model with its own dictionaries (model=geneformer_v1 with the *_gc30M dictionaries, "
            "model=geneformer_v2 with the *_gc104M dictionaries, model=pretrained with the directory's own)"
        )


@dataclass(frozen=True)
class LoraSettings:
    """``model.lora``: LoRA adapters (peft) of rank ``r`` on the encoder's ``target_modules`` (BERT's attention
    ``query``, ``key``, ``value``, ``attention.output.dense``; feed-forward ``intermediate.dense``,
    ``output.dense``), scaled by ``alpha / r``; every other encoder weight frozen."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("query", "value")

    def __post_init__(self) -> None:
        if not (isinstance(self.r, int) and self.r >= 1):
            raise InputError(f"model.lora.r is {self.r!r}; set it to an integer >= 1 (or null: no LoRA)")
        if not self.alpha > 0:
            raise InputError(f"model.lora.alpha is {self.alpha!r}; set it to a number > 0")
        if not 0 <= self.dropout < 1:
            raise InputError(f"model.lora.dropout is {self.dropout!r}; set it to a probability in [0, 1)")
        if not self.target_modules:
            raise InputError("model.lora.target_modules is empty; name the layers to adapt, e.g. [query, value]")


def with_lora(bert: BertModel, settings: LoraSettings) -> nn.Module:
    """``bert`` with LoRA adapters (a peft model: only the adapters train; ``merge_and_unload()`` gives a
    plain BertModel back)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules))
    with warnings.catch_warnings():  # transformers' deprecation notices as peft inspects the model
        warnings.simplefilter("ignore", FutureWarning)
        try:
            return get_peft_model(bert, config)
        except ValueError as error:
            reason = str(error).strip().splitlines()[0]
            raise InputError(f"model.lora.target_modules {list(settings.target_modules)}: {reason[:200]}; name "
                             "BERT layers such as query, key, value, dense") from None


class CellEncoder(nn.Module):
    """A BERT encoder pooled to one vector per cell.

    ``pooling="cls"`` takes position 0 (V2's ``<cls>``; in V1, which has no ``<cls>``, that is the
    top-ranked gene); ``pooling="mean"`` averages the hidden states of the cell's genes: padding and the
    ``frame_token_ids`` (V2's ``<cls>`` and ``<eos>``) never enter a cell's vector, as in upstream's
    ``EmbExtractor``.
    ``freeze_layers=N > 0`` freezes the embeddings and the first N encoder layers.
    ``lora``: LoRA adapters on the encoder (:class:`LoraSettings`; none while ``r`` is None), the base
    weights frozen.
    ``attn_implementation``: one of :data:`ATTENTION_IMPLEMENTATIONS`. On a GPU each batch is padded to a multiple
    of ``PAD_MULTIPLE`` positions (within the model's positions) and, with SDPA, its padding is handed to the
    encoder as a (batch, 1, 1, L) boolean mask: transformers would expand a 2-D mask to (batch, 1, L, L), which
    SDPA turns into a float bias of L x L a cell in every layer and which costs it its efficient kernels;
    a batch without padding gets no mask at all (SDPA's flash kernel).
    ``gradient_checkpointing``: transformers' non-reentrant activation checkpointing, a layer at a time (in
    training only): each layer's activations are recomputed in the backward pass instead of kept.
    """

    def __init__(self, bert: BertModel, pooling: Pooling = "mean", freeze_layers: int = 0,
                 lora: dict[str, Any] | None = None, attn_implementation: str = "sdpa",
                 gradient_checkpointing: bool = False, frame_token_ids: Sequence[int] = ()) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise InputError(f"model.pooling is {pooling!r}; set it to 'cls' or 'mean'")
        n_layers = len(bert.encoder.layer)
        if not 0 <= freeze_layers <= n_layers:
            raise InputError(
                f"model.freeze_layers is {freeze_layers}; set it between 0 and the model's "
                f"{n_layers} layers"
            )
        use_attention(bert, attn_implementation)
        if gradient_checkpointing:
            bert.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.bert = bert
        self.pooling = pooling
        self.attn_implementation = attn_implementation
        self.positions = int(bert.config.max_position_embeddings)
        self.pad_token_id = int(bert.config.pad_token_id or 0)
        self.register_buffer("frame_token_ids", torch.tensor(sorted(frame_token_ids), dtype=torch.long),
                             persistent=False)
        if freeze_layers > 0:
            for module in [bert.embeddings, *bert.encoder.layer[:freeze_layers]]:
                module.requires_grad_(False)
        self.lora = LoraSettings(**{**lora, "target_modules": tuple(lora.get("target_modules", ("query", "value")))}
                                 ) if lora and lora.get("r") is not None else None
        if self.lora is not None:
            self.bert = with_lora(bert, self.lora)

    @property
    def hidden_size(self) -> int:
        return self.bert.config.hidden_size

    def plain_bert(self) -> BertModel:
        """The encoder as a plain BertModel: with LoRA, the adapters merged into a copy of the weights."""
        if self.lora is None:
            return self.bert
        return copy.deepcopy(self.bert).merge_and_unload()

    def encoder_mask(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """The padding as the encoder takes it without waste: for SDPA a (batch, 1, 1, L) boolean mask (None
        when nothing is padded); flash-attn 2 and eager build theirs from the 2-D mask."""
        if self.attn_implementation != "sdpa":
            return attention_mask
        if bool(attention_mask.all()):
            return None
        return attention_mask.bool()[:, None, None, :]

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      key_mask: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
                      multiple: int | None = None) -> torch.Tensor:
        """The last layer's hidden states (batch x the input's length x hidden), the batch padded on the way in to a
        multiple of ``multiple`` positions: by default ``PAD_MULTIPLE`` on a GPU (its kernels' alignment), none on
        the CPU (where it would only add work). ``key_mask``: how the 2-D mask reaches the encoder (default
        :meth:`encoder_mask`; the 2-D mask itself is transformers' own path, for comparison)."""
        length = input_ids.shape[1]
        multiple = multiple or (PAD_MULTIPLE if input_ids.is_cuda else 1)
        extra = max(0, min(padded_length(length, multiple), max(self.positions, length)) - length)
        if extra:
            input_ids = F.pad(input_ids, (0, extra), value=self.pad_token_id)
            attention_mask = F.pad(attention_mask, (0, extra), value=0)
        mask = (key_mask or self.encoder_mask)(attention_mask)
        return self.bert(input_ids=input_ids, attention_mask=mask).last_hidden_state[:, :length]

    def pool(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One vector a cell: position 0, or the mean over its gene positions."""
        if self.pooling == "cls":
            return hidden[:, 0]
        genes = attention_mask.bool() & ~torch.isin(input_ids, self.frame_token_ids)
        weights = genes.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.pool(self.hidden_states(input_ids, attention_mask), input_ids, attention_mask)


def use_attention(bert: BertModel, implementation: str) -> None:
    """Switch ``bert`` to ``model.attn_implementation`` (one clear line where the package or device lacks it)."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise InputError(f"model.attn_implementation is {implementation!r}; set it to one of "
                         f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
    try:
        bert.set_attn_implementation(implementation)
    except (ImportError, ValueError) as error:
        reason = str(error).strip().splitlines()[0]
        raise InputError(f"model.attn_implementation={implementation}: {reason[:200]}; use "
                         "model.attn_implementation=sdpa (PyTorch's own kernels)") from None


class ClassifierHead(nn.Module):
    """Dropout then a linear layer from the cell vector to one logit per class."""

    def __init__(self, hidden_size: int, n_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, n_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Fresh weights, initialised as BERT's classifier heads are: N(0, 0.02), zero bias."""
        nn.init.normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(pooled))
