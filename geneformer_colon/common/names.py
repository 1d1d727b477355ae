"""The names every layer shares: splits, headline metrics, run statuses and how metric keys are spelled
(a leaf: it imports nothing). A metric key is built here, never spelled again by a reader."""

TRAIN, VAL, TEST = "train", "val", "test"
SPLITS = (TRAIN, VAL, TEST)
EVAL_SPLITS = (VAL, TEST)
# The headline metrics of an evaluated split and their short titles.
METRICS = {"accuracy": "acc", "macro_f1": "macro F1", "macro_auroc": "ROC AUC"}
# Which calls to trust: a split's calibration (ECE, Brier, NLL) and abstention (AURC) figures, each lower for a
# better model, and their short titles.
TRUST_METRICS = {"ece": "ECE", "classwise_ece": "classwise ECE", "brier": "Brier", "nll": "NLL", "aurc": "AURC"}
# The calibration figures after the run's post-hoc calibration (a split's ``calibrated`` node in metrics.json), as
# the flat keys of a CV summary and a table of runs, and their short titles.
CALIBRATED_METRICS = {f"calibrated_{metric}": f"{title} calibrated" for metric, title in TRUST_METRICS.items()
                      if metric != "aurc"}
# A prediction-table column a split is broken down by -> its metrics.json key.
GROUPINGS = {"donor": "by_donor", "cell_type": "by_cell_type"}

# Joins the classes of a cell's conformal set in one text column (``Normal|Border``): no class name may hold it.
CLASS_SEPARATOR = "|"

FINISHED, RUNNING, FAILED, INTERRUPTED = "finished", "running", "failed", "interrupted"


def split_figure(entry: dict, key: str) -> float | None:
    """A figure of a split's metrics.json entry: its own ``key``, or a :data:`CALIBRATED_METRICS` key read from its
    ``calibrated`` node (None where absent)."""
    if key in CALIBRATED_METRICS:
        return (entry.get("calibrated") or {}).get(key.removeprefix("calibrated_"))
    return entry.get(key)


def lower_is_better(key: str) -> bool:
    """A calibration or abstention figure (its worst fold is its highest)."""
    return key in TRUST_METRICS or key in CALIBRATED_METRICS


def logged(split: str, metric: str) -> str:
    """What Lightning logs and metrics.json's epochs hold: ``val/macro_f1``."""
    return f"{split}/{metric}"


def per_class(metric: str, class_name: str) -> str:
    """A per-class figure of a split's metrics: ``recall/Tumor``."""
    return f"{metric}/{class_name}"


def column(split: str, metric: str, *qualifiers: str) -> str:
    """A flat key of a table or a CV fold: ``test_macro_f1``, ``test_macro_f1_sd``, ``test_macro_f1_by_cell_type``."""
    return "_".join((split, metric, *qualifiers))


MONITOR = logged(VAL, "macro_f1")
# Logged each epoch when the validation split has several donors: its lowest per-donor macro F1.
WORST_DONOR = logged(VAL, "worst_donor_macro_f1")


# Keys of an h5ad (layers, obs/var columns) that hold a class name: HDF5 reads "/" as a path, so a class such as
# "CD4+/CD25 T Reg" is written with "/" as %2F (and "%" as %25); urllib.parse.unquote reads the name back.
H5AD_KEY_ENCODING = "percent: '/' as %2F, '%' as %25 (urllib.parse.unquote)"


def h5ad_key(name: str) -> str:
    """``name`` as an h5ad key: the same text with "/" and "%" percent-encoded."""
    return name.replace("%", "%25").replace("/", "%2F")
