"""The names every layer shares (names.py): metric keys spelled in one place, and the module a leaf."""

from __future__ import annotations

import ast
import inspect

from geneformer_colon.common import names
from geneformer_colon.common.names import (
    EVAL_SPLITS,
    MONITOR,
    SPLITS,
    TEST,
    VAL,
    WORST_DONOR,
    column,
    logged,
    per_class,
)


def test_metric_keys_are_spelled_as_a_run_records_them():
    assert logged(VAL, "macro_f1") == "val/macro_f1" == MONITOR  # what Lightning logs and metrics.json's epochs hold
    assert per_class("recall", "Tumor") == "recall/Tumor"  # a per-class figure of a split's metrics
    assert column(TEST, "macro_f1") == "test_macro_f1"  # a table's flat key
    assert column(TEST, "macro_f1", "sd") == "test_macro_f1_sd"
    assert WORST_DONOR == "val/worst_donor_macro_f1"
    assert SPLITS == ("train", "val", "test") and EVAL_SPLITS == ("val", "test")


def test_names_is_a_leaf_that_imports_nothing():
    tree = ast.parse(inspect.getsource(names))
    assert [node.lineno for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))] == []
