"""The synthetic KUL3 look-alike: design, statistics and the GEO file format."""

from __future__ import annotations

import gzip
import re

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from geneformer_colon.common.errors import InputError
from geneformer_colon.data import synthetic
from geneformer_colon.data.kul3 import ANNOTATION_COLUMNS, ANNOTATION_FILE, CELL_TYPES, CLASSES, DONORS, MATRIX_FILE
from geneformer_colon.data.synthetic import GENE_TABLE_FILE, generate_counts, write_synthetic_kul3

CELL_ID = re.compile(r"^(KUL\d\d)-([NBT])_[ACGT]{16}$")


@pytest.fixture(scope="module")
def small() -> synthetic.SyntheticKUL3:
    return generate_counts(n_cells=600, n_genes=400, seed=0)


@pytest.fixture(scope="module")
def default() -> synthetic.SyntheticKUL3:
    return generate_counts(seed=1)  # 3000 x 2000, well under a second once compiled


@pytest.fixture(scope="module")
def unshifted() -> synthetic.SyntheticKUL3:
    return generate_counts(seed=1, donor_shift=0.0)


def _log_normalised(counts: sp.csr_matrix) -> np.ndarray:
    totals = np.asarray(counts.sum(axis=1)).ravel()
    return np.log1p(counts.multiply(1e4 / totals[:, None]).toarray())


def _held_out_macro_f1(cohort: synthetic.SyntheticKUL3) -> dict[str, float]:
    """A linear proxy of the colon6 split: fit on KUL21/28/30/31, macro F1 on KUL19 and KUL01."""
    log_expr = _log_normalised(cohort.counts)
    donor = cohort.annotation["Patient"].to_numpy()
    label = cohort.annotation["Class"].to_numpy()
    train = ~np.isin(donor, ["KUL19", "KUL01"])
    model = LogisticRegression(C=0.05, max_iter=300, class_weight="balanced")
    model.fit(log_expr[train], label[train])
    return {
        d: f1_score(label[donor == d], model.predict(log_expr[donor == d]), average="macro")
        for d in ("KUL19", "KUL01")
    }


def _batch_distance(cohort: synthetic.SyntheticKUL3) -> dict[str, float]:
    """Per donor: distance of its mean log expression from the other donors' (cells of one type)."""
    log_expr = _log_normalised(cohort.counts)
    donor = cohort.annotation["Patient"].to_numpy()
    t_cells = (cohort.annotation["Cell_type"] == "T cells").to_numpy()
    return {
        d: float(np.linalg.norm(
            log_expr[t_cells & (donor == d)].mean(axis=0) - log_expr[t_cells & (donor != d)].mean(axis=0)
        ))
        for d in DONORS
    }


def test_same_seed_same_bytes_other_seed_differs(small: synthetic.SyntheticKUL3) -> None:
    again = generate_counts(n_cells=600, n_genes=400, seed=0)
    for name in ("data", "indices", "indptr"):
        assert getattr(again.counts, name).tobytes() == getattr(small.counts, name).tobytes()
    pd.testing.assert_frame_equal(again.annotation, small.annotation)
    assert again.ensembl_ids == small.ensembl_ids
    other = generate_counts(n_cells=600, n_genes=400, seed=1)
    assert (other.counts != small.counts).nnz > 0
    assert not other.annotation["Index"].equals(small.annotation["Index"])


def test_shapes_types_and_gene_ids(small: synthetic.SyntheticKUL3) -> None:
    counts = small.counts
    assert sp.isspmatrix_csr(counts) and counts.dtype == np.int32 and counts.shape == (600, 400)
    assert counts.data.min() > 0 and counts.has_sorted_indices
    assert small.symbols == [f"SYNG{i:05d}" for i in range(1, 401)]
    assert list(small.annotation.columns) == list(ANNOTATION_COLUMNS)
    mapped = [e for e in small.ensembl_ids if e]
    assert len(mapped) == 396  # 1% of the genes have no Ensembl id
    assert len(set(mapped)) == len(mapped)
    assert all(re.fullmatch(r"ENSG9\d{10}", e) for e in mapped)


def test_design_donors_classes_cell_types(small: synthetic.SyntheticKUL3) -> None:
    ann = small.annotation
    assert set(ann["Patient"]) == set(DONORS)
    assert set(ann["Class"]) == set(CLASSES)
    assert set(ann["Cell_type"]) == set(CELL_TYPES)
    assert (pd.crosstab(ann["Patient"], ann["Class"]) > 0).all().all()
    assert ann["Index"].is_unique
    columns = ann[["Index", "Patient", "Class", "Sample"]]
    for cell_id, donor, klass, sample in columns.itertuples(index=False):
        match = CELL_ID.match(cell_id)
        assert match and match.group(1) == donor and match.group(2) == klass[0]
        assert cell_id.startswith(sample + "_")


def test_class_imbalance_and_more_epithelial_in_tumour(default: synthetic.SyntheticKUL3) -> None:
    ann = default.annotation
    share = ann["Class"].value_counts(normalize=True)
    assert share.idxmax() == "Tumor" and share.max() - share.min() > 0.05
    epithelial = (ann["Cell_type"] == "Epithelial cells").groupby(ann["Class"]).mean()
    assert epithelial["Tumor"] > 2 * epithelial["Normal"]


def test_genes_per_cell_scale_with_gene_count(default: synthetic.SyntheticKUL3) -> None:
    detected = np.diff(default.counts.indptr)
    # The real 200-6,000 of 33,694 genes, at 2,000 genes: floor ~150, ceiling ~356.
    assert detected.min() >= 130
    assert detected.max() <= 430
    assert 200 <= detected.mean() <= 320


def test_kul19_has_the_largest_batch_shift_and_the_lowest_depth(
    default: synthetic.SyntheticKUL3,
) -> None:
    distance = _batch_distance(default)
    assert max(distance, key=distance.get) == "KUL19"
    assert distance["KUL19"] > 1.3 * sorted(distance.values())[-2]
    assert min(distance, key=distance.get) == "KUL01"
    detected = pd.Series(np.diff(default.counts.indptr)).groupby(default.annotation["Patient"]).mean()
    assert detected.idxmin() == "KUL19" and detected["KUL19"] < 0.95 * detected.drop("KUL19").min()


def test_held_out_kul19_is_hard_and_kul01_easy(default: synthetic.SyntheticKUL3) -> None:
    """The colon6 story on a linear proxy: trained on four donors, KUL01 well classified, KUL19 not."""
    f1 = _held_out_macro_f1(default)
    assert f1["KUL01"] >= 0.7
    assert f1["KUL19"] <= f1["KUL01"] - 0.25


def test_donor_shift_zero_makes_the_donors_exchangeable(
    default: synthetic.SyntheticKUL3, unshifted: synthetic.SyntheticKUL3
) -> None:
    # Same cells (the draws do not depend on donor_shift), only their expression differs.
    pd.testing.assert_frame_equal(unshifted.annotation, default.annotation)
    assert (unshifted.counts != default.counts).nnz > 0
    # No donor stands out: batch distance, depth and held-out accuracy alike.
    distance = _batch_distance(unshifted)
    assert max(distance.values()) < 1.3 * min(distance.values())
    detected = pd.Series(np.diff(unshifted.counts.indptr)).groupby(unshifted.annotation["Patient"]).mean()
    assert detected.max() < 1.05 * detected.min()
    f1 = _held_out_macro_f1(unshifted)
    assert min(f1.values()) >= 0.8 and abs(f1["KUL19"] - f1["KUL01"]) < 0.1


def test_larger_donor_shift_is_harsher(default: synthetic.SyntheticKUL3) -> None:
    harsher = generate_counts(seed=1, donor_shift=2.0)
    assert _batch_distance(harsher)["KUL19"] > 1.5 * _batch_distance(default)["KUL19"]
    with pytest.raises(InputError, match="donor_shift -1"):
        generate_counts(n_cells=60, n_genes=200, donor_shift=-1.0)


def test_tumour_programme_replicates_on_kul01_not_on_kul19(default: synthetic.SyntheticKUL3) -> None:
    """Genes up in Tumor vs Normal epithelium on four donors are up on KUL01 too, not on KUL19.

    KUL19's tumour has a programme of its own and its normal mucosa a field effect.
    """
    ann = default.annotation
    log_expr = _log_normalised(default.counts)
    donor = ann["Patient"].to_numpy()
    epithelial = (ann["Cell_type"] == "Epithelial cells").to_numpy()
    klass = {c: (ann["Class"] == c).to_numpy() for c in CLASSES}
    train = ~np.isin(donor, ["KUL01", "KUL19"])
    train_up = (
        log_expr[train & epithelial & klass["Tumor"]].mean(axis=0)
        - log_expr[train & epithelial & klass["Normal"]].mean(axis=0)
    )
    score = log_expr[:, np.argsort(train_up)[-40:]].mean(axis=1)

    def mean(held_out: str, mask: np.ndarray) -> float:
        return float(score[(donor == held_out) & mask].mean())

    normal, border, tumour = (mean("KUL01", epithelial & klass[c]) for c in CLASSES)
    assert normal < border < tumour
    assert tumour - normal > 0.5
    # Weaker in the other cells of a tumour sample.
    others = mean("KUL01", ~epithelial & klass["Tumor"]) - mean("KUL01", ~epithelial & klass["Normal"])
    assert 0 < others < tumour - normal
    kul19 = mean("KUL19", epithelial & klass["Tumor"]) - mean("KUL19", epithelial & klass["Normal"])
    assert kul19 < 0.5 * (tumour - normal)


def test_too_few_cells_is_an_input_error() -> None:
    with pytest.raises(InputError, match="--cells 10"):
        generate_counts(n_cells=10, n_genes=200)


def test_geo_files_in_the_real_format(tmp_path) -> None:
    paths = write_synthetic_kul3(tmp_path, n_cells=40, n_genes=120, seed=5)
    cohort = generate_counts(n_cells=40, n_genes=120, seed=5)
    assert paths == {
        "matrix": tmp_path / MATRIX_FILE,
        "annotation": tmp_path / ANNOTATION_FILE,
        "gene_table": tmp_path / GENE_TABLE_FILE,
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())

    with gzip.open(paths["matrix"], "rt") as handle:
        lines = handle.read().split("\n")
    assert lines[-1] == ""
    header, rows = lines[0].split("\t"), [line.split("\t") for line in lines[1:-1]]
    assert header[0] == "Index"
    assert header[1:] == list(cohort.annotation["Index"])
    assert all(CELL_ID.match(cell) for cell in header[1:])
    assert [row[0] for row in rows] == cohort.symbols
    assert all(re.fullmatch(r"0|[1-9]\d*", value) for row in rows for value in row[1:])
    genes_by_cells = np.array([[int(v) for v in row[1:]] for row in rows])
    np.testing.assert_array_equal(genes_by_cells.T, cohort.counts.toarray())

    with gzip.open(paths["annotation"], "rt") as handle:
        assert handle.readline() == "Index\tPatient\tClass\tSample\tCell_type\tCell_subtype\n"
    annotation = pd.read_csv(paths["annotation"], sep="\t", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(annotation, cohort.annotation.astype(str))

    table = paths["gene_table"].read_text().splitlines()
    assert table[0] == "symbol\tensembl_id"
    expected = [f"{s}\t{e}" for s, e in zip(cohort.symbols, cohort.ensembl_ids) if e]
    assert table[1:] == expected and len(expected) == 119


@pytest.mark.slow
def test_full_size_depth() -> None:
    counts = generate_counts(n_cells=27_414, n_genes=33_694, seed=0).counts
    detected = np.diff(counts.indptr)
    assert 3_400 <= detected.mean() <= 4_000
    assert detected.min() >= 180 and detected.max() <= 6_500
    assert 90e6 <= counts.nnz <= 115e6


def test_donor_effects_keep_only_the_named_shifts_and_the_default_keeps_them_all():
    from geneformer_colon.data.synthetic import DONOR_EFFECTS, _scaled_shifts

    every, technical = _scaled_shifts(1.0), _scaled_shifts(1.0, ("batch_sigma", "depth", "marker_batch"))
    for name in ("batch_sigma", "depth", "marker_batch"):
        np.testing.assert_array_equal(getattr(technical, name), getattr(every, name))
    assert not technical.field.any() and not technical.private.any() and every.private.max() == 0.9
    default, named = generate_counts(200, 150, seed=3), generate_counts(200, 150, seed=3, donor_effects=DONOR_EFFECTS)
    assert (default.counts != named.counts).nnz == 0
    assert (generate_counts(200, 150, seed=3, donor_effects=("depth",)).counts != default.counts).nnz > 0
    with pytest.raises(InputError, match="unknown"):
        generate_counts(200, 150, donor_effects=("biology",))
