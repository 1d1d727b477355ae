"""The tiny settings that make a whole run take seconds on two CPU cores, and the config composed with them."""

from __future__ import annotations

from pathlib import Path

from geneformer_colon.runs.config import CONF_DIR

# The classes of the KUL3 cohort (and its synthetic look-alike), in the order a run's outputs list them.
CLASSES = ["Normal", "Border", "Tumor"]

# A small cohort, batches and cells: the data side of every tiny run (and of the README walk-through).
TINY = ["data.source.n_cells=480", "data.source.n_genes=300", "data.batch_size=32", "model.tokenizer.input_size=128",
        "callbacks.progress_bar=null"]
# A small encoder: for the models built from scratch (a pretrained checkpoint has its own shape).
TINY_ENCODER = ["model.encoder.hidden_size=32", "model.encoder.intermediate_size=64",
                "model.encoder.num_attention_heads=2"]
# The same cohort as `geneformer-colon synth` arguments.
TINY_SYNTH = ["--cells", "480", "--genes", "300"]


def tiny_overrides(output_dir: Path, shared: dict[str, Path]) -> list[str]:
    """The tiny settings, one epoch, outputs under ``output_dir``, data and caches in the shared folders."""
    return [f"paths.output_dir={output_dir}", f"paths.data_dir={shared['data']}",
            f"paths.cache_dir={shared['cache']}", *TINY, *TINY_ENCODER, "trainer.max_epochs=1"]


def compose_train(overrides: list[str], config_name: str = "train"):
    """The config ``config_name`` (train, baseline, pretrain, eval) as Hydra composes it for the command line."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides=overrides)


def compose_tiny(output_dir: Path, shared: dict[str, Path], *overrides: str, config_name: str = "train"):
    """:func:`compose_train` of the tiny settings (:func:`tiny_overrides`) and ``overrides``."""
    return compose_train(tiny_overrides(output_dir, shared) + list(overrides), config_name)


def datamodule_of(cfg):
    """The config's datamodule, as training instantiates it (not set up)."""
    from hydra.utils import instantiate

    from geneformer_colon.runs.config import plain

    return instantiate(cfg.data, tokenizer=plain(cfg.model.tokenizer))
