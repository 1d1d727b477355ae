"""Building the parts (builders.py): weights taken from another run, and refused when they do not fit; a checkpoint
whose settings name a target this package does not ship is never loaded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers.runs import metrics_of

from geneformer_colon.assembly.builders import (
    build_datamodule,
    build_module,
    classifier_from_checkpoint,
    load_weights,
    resolve_precision,
    start_from,
)
from geneformer_colon.common.errors import InputError
from geneformer_colon.jobs.train import train
from geneformer_colon.model.module import CellClassifier


def test_experiments_from_colon3_start_from_its_best_weights(tiny_cfg, tmp_path):
    train(tiny_cfg("experiment=colon3"))
    best = torch.load(tmp_path / "outputs/colon3/checkpoints/best.ckpt", weights_only=True)["state_dict"]
    for experiment in ("colon4", "colon5"):
        cfg = tiny_cfg(f"experiment={experiment}")
        assert cfg.init_from == str(tmp_path / "outputs" / "colon3")
        module = build_module(cfg, build_datamodule(cfg))
        load_weights(module, cfg.init_from)
        for name, tensor in module.state_dict().items():
            torch.testing.assert_close(tensor, best[name], msg=name)
        train(tiny_cfg(f"experiment={experiment}", "trainer.fast_dev_run=true"))
        assert metrics_of(tmp_path / "outputs" / experiment)["init_from"] == str(tmp_path / "outputs" / "colon3")

    # model.reinit_head: the encoder from colon3, the head fresh
    module = build_module(cfg, build_datamodule(cfg))
    start_from(module, cfg.init_from, reinit_head=True)
    for name, tensor in module.state_dict().items():
        same = torch.equal(tensor, best[name])
        assert same != name.startswith("head."), name


def test_checkpoint_of_another_vocabulary_is_refused(tiny_cfg, tmp_path):
    train(tiny_cfg("run_name=small_vocab", "data.source.n_genes=200", "trainer.limit_train_batches=2"))
    cfg = tiny_cfg()
    module = build_module(cfg, build_datamodule(cfg))
    with pytest.raises(InputError, match="vocabulary"):
        load_weights(module, tmp_path / "outputs" / "small_vocab")


def test_auto_precision_is_full_precision_without_a_gpu_and_a_named_one_is_kept():
    assert resolve_precision("auto") == ("bf16-mixed" if torch.cuda.is_available()
                                         and torch.cuda.is_bf16_supported() else "32-true")
    assert resolve_precision("16-mixed") == "16-mixed" and resolve_precision(32) == 32


def test_a_checkpoint_whose_settings_name_a_foreign_target_is_not_loaded(trained_runs, tmp_path):
    run_dir = Path(shutil.copytree(trained_runs[0], tmp_path / "run"))  # a path an interpolation can hold (no "=")
    checkpoint = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    for loss in ({"_target_": "shutil.copyfile", "src": str(run_dir / "config.yaml"), "dst": str(tmp_path / "w")},
                 {"_target_": "geneformer_colon.model.losses.FocalLoss",
                  "focal_gamma": "${oc.create:{_target_: shutil.copyfile, src: %s, dst: %s}}" % (
                      run_dir / "config.yaml", tmp_path / "w")}):
        checkpoint["hyper_parameters"]["loss"] = loss
        torch.save(checkpoint, tmp_path / "crafted.ckpt")
        with pytest.raises(InputError, match="shutil.copyfile"):
            classifier_from_checkpoint(tmp_path / "crafted.ckpt")
        with pytest.raises(InputError, match="shutil.copyfile"):
            CellClassifier.load_from_checkpoint(tmp_path / "crafted.ckpt")
    assert not (tmp_path / "w").exists()
