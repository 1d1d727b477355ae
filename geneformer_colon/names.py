"""The names every layer shares: splits, headline metrics and run statuses (a leaf: it imports nothing)."""

TRAIN, VAL, TEST = "train", "val", "test"
SPLITS = (TRAIN, VAL, TEST)
EVAL_SPLITS = (VAL, TEST)
# The headline metrics of an evaluated split and their short titles.
METRICS = {"accuracy": "acc", "macro_f1": "macro F1", "macro_auroc": "ROC AUC"}
MONITOR = f"{VAL}/macro_f1"

FINISHED, RUNNING, FAILED, INTERRUPTED = "finished", "running", "failed", "interrupted"
