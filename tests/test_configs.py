"""Every option of every config group composes, and what can be built offline is built from it."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from conftest import compose_train
from hydra.utils import get_method, instantiate
from omegaconf import OmegaConf

from geneformer_colon.assembly.builders import build_trainer
from geneformer_colon.model.backbone import Vocabulary
from geneformer_colon.runs.config import CONF_DIR, check_targets, plain, recipe_changes, targets_in

CONF = CONF_DIR
GROUPS = sorted(path.name for path in CONF.iterdir() if path.is_dir() and path.name != "hydra")
# What an option needs to compose without a file that only a user has.
NEEDS = {("model", "pretrained"): ["model.encoder.pretrained=/nowhere/hf"]}


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def every_option() -> list[tuple[str, str]]:
    return [(group, option) for group in GROUPS for option in options(group)]


def test_every_group_has_options_and_the_groups_are_the_pluggable_parts():
    assert GROUPS == ["augment", "callbacks", "cv", "data", "debug", "experiment", "logger", "loss", "model",
                      "optimizer", "paths", "robust", "scheduler", "sweep", "trainer"]
    assert all(options(group) for group in GROUPS)


@pytest.mark.parametrize(("group", "option"), every_option())
def test_each_option_composes_resolves_and_names_only_trusted_targets(group, option, tmp_path):
    cfg = compose_train([f"{group}={option}", f"paths.output_dir={tmp_path}", *NEEDS.get((group, option), [])])
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


def test_a_key_added_since_a_run_started_is_a_change_only_away_from_its_default():
    before = {"optimizer": {"lr": 0.002}}
    defaults = {"optimizer": {"lr": 0.001}, "robust": {"_target_": "PlainTraining"}, "model": {"lora": {"r": None}}}
    after = {"optimizer": {"lr": 0.002}, "robust": {"_target_": "PlainTraining"}, "model": {"lora": {"r": None}}}
    assert recipe_changes(before, after, defaults=defaults) == {}
    assert recipe_changes(before, after) == {"robust._target_": ("absent", "PlainTraining"),
                                             "model.lora.r": ("absent", "null")}
    lora = {**after, "model": {"lora": {"r": 8}}}
    assert recipe_changes(before, lora, defaults=defaults) == {"model.lora.r": ("absent", "8")}
    # a key the run had keeps counting, whatever the default
    assert recipe_changes({"optimizer": {"lr": 0.003}}, after, defaults=defaults)["optimizer.lr"] == ("0.003", "0.002")
