"""Configs beyond composing them (config.py): the keys that differ between runs, and what a resumed run changed."""

from __future__ import annotations

from geneformer_colon.runs.config import differing_keys, recipe_changes


def test_differing_keys_skip_paths_and_names_and_count_absent_keys():
    run_a = {"paths": {"run_dir": "a"}, "run_name": "a", "logger": {"wandb": {"name": "a", "save_dir": "a"}},
             "data": {"val_donors": ["KUL19"], "cache_dir": "x"}, "loss": {"focal_gamma": 0.0}}
    run_b = {"paths": {"run_dir": "b"}, "run_name": "b", "logger": {"wandb": {"name": "b", "save_dir": "b"}},
             "data": {"val_donors": ["KUL21"], "cache_dir": "y"}, "loss": {"focal_gamma": 0.0},
             "baseline": {"alpha": 1.0}}
    assert differing_keys([run_a, run_b]) == ["data.val_donors", "baseline.alpha"]


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
