"""The shipped configs: every option of every config group composes, what can be built offline is built from it,
and the sweep presets and the SLURM launcher compose."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from helpers.tiny import compose_train
from hydra import compose, initialize_config_dir
from hydra.utils import get_method, instantiate
from omegaconf import OmegaConf

from geneformer_colon.assembly.builders import build_trainer
from geneformer_colon.model.backbone import Vocabulary
from geneformer_colon.runs.config import CONF_DIR, check_targets, plain, targets_in

CONF = CONF_DIR
GROUPS = sorted(path.name for path in CONF.iterdir() if path.is_dir() and path.name != "hydra")
# What an option needs to compose without a file that only a user has.
NEEDS = {("model", "pretrained"): ["model.encoder.pretrained=/nowhere/hf"]}
# A group only one primary config composes (python baseline.py baseline=logreg)
PRIMARY = {"baseline": "baseline"}


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def every_option() -> list[tuple[str, str]]:
    return [(group, option) for group in GROUPS for option in options(group)]


def test_every_group_has_options_and_the_groups_are_the_pluggable_parts():
    assert GROUPS == ["adapt", "augment", "baseline", "calibration", "callbacks", "cv", "data", "debug",
                      "experiment", "logger", "loss", "model", "optimizer", "paths", "robust", "scheduler",
                      "sweep", "trainer"]
    assert all(options(group) for group in GROUPS)


@pytest.mark.parametrize(("group", "option"), every_option())
def test_each_option_composes_resolves_and_names_only_trusted_targets(group, option, tmp_path):
    cfg = compose_train([f"{group}={option}", f"paths.output_dir={tmp_path}", *NEEDS.get((group, option), [])],
                        config_name=PRIMARY.get(group, "train"))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    check_targets(resolved, f"{group}={option}")  # a run directory written with this option can be evaluated
    for path, target in targets_in(resolved):
        assert callable(get_method(target)), (path, target)


def build_everything(cfg, tmp_path: Path) -> None:
    loss = instantiate(cfg.loss, class_names=list(cfg.data.labels))
    augment = instantiate(cfg.augment)
    logits = torch.randn(4, len(cfg.data.labels))
    assert torch.isfinite(loss(logits, torch.tensor([0, 1, 2, 0]))) and augment.mixup_prob >= 0
    parameter = torch.nn.Parameter(torch.zeros(3))
    optimizer = instantiate(cfg.optimizer, _partial_=True)([{"params": [parameter]}])
    scheduler = instantiate(cfg.scheduler, _partial_=True)(optimizer, num_training_steps=10)
    assert optimizer.param_groups[0]["lr"] == scheduler.get_last_lr()[0]
    source = instantiate(cfg.data.source)
    assert source.describe()
    if "new_bert" in cfg.model.encoder._target_:
        bert = instantiate(cfg.model.encoder, _partial_=True)(vocabulary=Vocabulary(50, 0, 64), seed=0)
        assert bert.config.vocab_size == 50
    trainer = build_trainer(cfg)
    assert isinstance(trainer, pl.Trainer) and trainer.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("overrides", [[], ["experiment=colon5", "optimizer=sgd", "scheduler=cosine", "logger=csv"],
                                       ["experiment=colon3", "debug=default", "scheduler=constant", "cv=lodo"]])
def test_the_parts_build_offline(overrides, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_train([*overrides, f"paths.output_dir={tmp_path}", f"paths.run_dir={tmp_path / 'run'}"])
    build_everything(cfg, tmp_path)


def test_the_learning_rate_lives_in_optimizer_lr_and_a_model_preset_sets_it():
    assert compose_train([]).optimizer.lr == 2e-3  # tiny: trained from scratch
    assert compose_train(["model=geneformer_v1"]).optimizer.lr == 5e-5  # Geneformer's fine-tuning rate
    assert compose_train(["model=geneformer_v1", "optimizer.lr=1e-4"]).optimizer.lr == 1e-4
    assert compose_train(["optimizer=sgd"]).optimizer._target_ == "torch.optim.SGD"
    flat = yaml.safe_dump(OmegaConf.to_container(compose_train([]), resolve=True))
    assert "learning_rate" not in flat


def test_the_tokenizer_is_one_node_that_data_and_model_read():
    cfg = compose_train(["model=geneformer_v2"])
    assert "tokenizer" not in cfg.data and cfg.model.tokenizer.model_version == "V2"
    assert OmegaConf.to_yaml(cfg, resolve=False).count("token_dictionary:") == 1


def test_every_lightning_trainer_argument_can_be_set_without_a_plus():
    set_by_the_run = {"self", "logger", "callbacks", "default_root_dir", "use_distributed_sampler"}
    arguments = set(inspect.signature(pl.Trainer.__init__).parameters) - set_by_the_run
    assert arguments == set(compose_train([]).trainer)
    cfg = compose_train(["trainer.fast_dev_run=true", "trainer.limit_train_batches=3", "trainer.profiler=simple"])
    assert cfg.trainer.fast_dev_run is True and plain(cfg.trainer)["profiler"] == "simple"


def test_debug_presets_are_quick_and_keep_w_and_b_out():
    quick = compose_train(["experiment=colon6", "debug=default"])
    assert list(quick.logger) == ["csv"] and quick.trainer.limit_train_batches == 5
    assert quick.run_name == "debug-colon6" and quick.overwrite is True
    assert compose_train(["debug=fdr"]).trainer.fast_dev_run is True


def test_presets_and_the_slurm_launcher_compose():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        grid = compose("train", overrides=["sweep=mixup_focal"], return_hydra_config=True)
        optuna_cfg = compose("train", overrides=["experiment=colon6", "sweep=optuna"], return_hydra_config=True)
        slurm = compose("train", return_hydra_config=True, overrides=[
            "hydra/launcher=submitit_slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
            "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4", "hydra.launcher.tasks_per_node=4",
            "hydra.launcher.nodes=2", "hydra.launcher.timeout_min=240"])
    assert grid.hydra.mode.name == "MULTIRUN"
    assert dict(grid.hydra.sweeper.params) == {"augment.mixup_prob": "0,0.15,0.3", "loss.focal_gamma": "0,1.5"}
    sweeper = optuna_cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert optuna_cfg.sweep.pruner == "median" and optuna_cfg.callbacks.prune_hopeless_trial.trial is None
    assert sweeper.study_name == "colon6" and sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.params["optimizer.lr"] == "tag(log, interval(1e-5, 3e-3))"
    assert dict(optuna_cfg.loss.class_weights) == {"Normal": 1.0, "Border": 1.4, "Tumor": 2.2}
    launcher = slurm.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node, launcher.nodes,
            launcher.timeout_min) == ("gpu", 4, 4, 2, 240)
    assert (slurm.trainer.strategy, slurm.trainer.devices, slurm.trainer.num_nodes) == ("ddp", 4, 2)
