"""Building the parts (builders.py): weights taken from another run, and refused when they do not fit."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_train, run_metrics, tiny_overrides, train_tiny

from geneformer_colon.assembly.builders import (
    build_datamodule,
    build_module,
    load_weights,
    resolve_precision,
    start_from,
)
from geneformer_colon.common.errors import InputError


def test_experiments_from_colon3_start_from_its_best_weights(tmp_path, shared_dirs):
    train_tiny(tmp_path, shared_dirs, "experiment=colon3")
    best = torch.load(tmp_path / "outputs/colon3/checkpoints/best.ckpt", weights_only=True)["state_dict"]
    for experiment in ("colon4", "colon5"):
        cfg = compose_train(tiny_overrides(tmp_path / "outputs", shared_dirs) + [f"experiment={experiment}"])
        assert cfg.init_from == str(tmp_path / "outputs" / "colon3")
        module = build_module(cfg, build_datamodule(cfg))
        load_weights(module, cfg.init_from)
        for name, tensor in module.state_dict().items():
            torch.testing.assert_close(tensor, best[name], msg=name)
        train_tiny(tmp_path, shared_dirs, f"experiment={experiment}", "trainer.fast_dev_run=true")
        assert run_metrics(tmp_path, experiment)["init_from"] == str(tmp_path / "outputs" / "colon3")

    # model.reinit_head: the encoder from colon3, the head fresh
    module = build_module(cfg, build_datamodule(cfg))
    start_from(module, cfg.init_from, reinit_head=True)
    for name, tensor in module.state_dict().items():
        same = torch.equal(tensor, best[name])
        assert same != name.startswith("head."), name


def test_checkpoint_of_another_vocabulary_is_refused(tmp_path, shared_dirs):
    train_tiny(tmp_path, shared_dirs, "run_name=small_vocab", "data.source.n_genes=200",
               "trainer.limit_train_batches=2")
    cfg = compose_train(tiny_overrides(tmp_path / "outputs", shared_dirs))
    module = build_module(cfg, build_datamodule(cfg))
    with pytest.raises(InputError, match="vocabulary"):
        load_weights(module, tmp_path / "outputs" / "small_vocab")


def test_auto_precision_is_full_precision_without_a_gpu_and_a_named_one_is_kept():
    assert resolve_precision("auto") == ("bf16-mixed" if torch.cuda.is_available()
                                         and torch.cuda.is_bf16_supported() else "32-true")
    assert resolve_precision("16-mixed") == "16-mixed" and resolve_precision(32) == 32
