"""The KUL3 GEO reader: synthetic round trip, gene maps, plain text variants, bad input."""

from __future__ import annotations

import gzip
import logging
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from geneformer_colon.common.errors import InputError
from geneformer_colon.data.dictionaries import read_gene_name_map
from geneformer_colon.data.kul3 import read_kul3
from geneformer_colon.data.synthetic import generate_counts, write_synthetic_kul3

N_CELLS, N_GENES, SEED = 300, 400, 3


@pytest.fixture(scope="module")
def geo(tmp_path_factory) -> dict[str, Path]:
    return write_synthetic_kul3(tmp_path_factory.mktemp("geo"), N_CELLS, N_GENES, SEED)


@pytest.fixture(scope="module")
def cohort():
    return generate_counts(N_CELLS, N_GENES, SEED)


def _write_gz(path: Path, text: str) -> Path:
    with gzip.open(path, "wt") as handle:
        handle.write(text)
    return path


def _tiny_kul3(tmp_path: Path, matrix_rows: list[str]) -> tuple[Path, Path]:
    """A hand-written GEO pair: genes x cells c1-c3 and an annotation of every cell."""
    cells = ("c1", "c2", "c3")
    matrix = _write_gz(tmp_path / "m.txt.gz", "Index\tc1\tc2\tc3\n" + "".join(matrix_rows))
    rows = "".join(f"{c}\tKUL01\tTumor\tKUL01-T\tT cells\tCD8+ T cells\n" for c in cells)
    annotation = _write_gz(
        tmp_path / "a.txt.gz", "Index\tPatient\tClass\tSample\tCell_type\tCell_subtype\n" + rows
    )
    return matrix, annotation


# ---------------------------------------------------------------- GEO round trip


def test_round_trip_joins_the_annotation_by_index(geo, cohort, tmp_path, caplog) -> None:
    # The annotation shuffled, plus two cells the matrix lacks: the join must go by Index.
    annotation = cohort.annotation.sample(frac=1.0, random_state=0)
    extra = annotation.iloc[:2].assign(Index=["KUL99-T_AAAA", "KUL99-T_CCCC"])
    shuffled = tmp_path / "shuffled.txt.gz"
    pd.concat([annotation, extra]).to_csv(shuffled, sep="\t", index=False)
    with caplog.at_level(logging.WARNING, logger="geneformer_colon.data"):
        adata = read_kul3(geo["matrix"], shuffled, gene_map=geo["gene_table"])

    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.int32
    assert (adata.X != cohort.counts).nnz == 0
    assert list(adata.obs_names) == list(cohort.annotation["Index"])
    expected = cohort.annotation.set_index("Index")
    for obs_column, geo_column in [
        ("donor", "Patient"), ("label", "Class"), ("sample", "Sample"),
        ("cell_type", "Cell_type"), ("cell_subtype", "Cell_subtype"),
    ]:
        assert list(adata.obs[obs_column]) == list(expected[geo_column])
    n_counts = adata.obs["n_counts"]
    assert n_counts.dtype == np.int64
    np.testing.assert_array_equal(n_counts, cohort.counts.toarray().sum(axis=1))
    assert list(adata.var_names) == cohort.symbols
    assert list(adata.var["symbol"]) == cohort.symbols
    assert list(adata.var["ensembl_id"]) == cohort.ensembl_ids  # "" where unmapped
    messages = [r.getMessage() for r in caplog.records]
    assert f"4 of {N_GENES} genes have no Ensembl id in {geo['gene_table']}" in messages
    assert any("2 annotation rows have no column" in m for m in messages)


def test_gene_map_as_dict_and_pickle(geo, cohort, tmp_path) -> None:
    mapping = {s: e for s, e in zip(cohort.symbols, cohort.ensembl_ids) if e}
    pkl = tmp_path / "gene_name_id_dict.pkl"
    pkl.write_bytes(pickle.dumps(mapping))
    assert read_gene_name_map(pkl) == mapping
    from_dict = read_kul3(geo["matrix"], geo["annotation"], gene_map=mapping)
    assert list(from_dict.var["ensembl_id"]) == cohort.ensembl_ids
    unmapped = read_kul3(geo["matrix"], geo["annotation"])
    assert set(unmapped.var["ensembl_id"]) == {""}


def test_plain_text_float_and_crlf_rows_are_read(tmp_path) -> None:
    rows = ["G1\t0\t2\t1.0\n", "G2\t3\t0\t0\r\n", "G3\t0\t0\t12"]  # float, CRLF, no final newline
    matrix, annotation = _tiny_kul3(tmp_path, rows)
    adata = read_kul3(matrix, annotation)
    np.testing.assert_array_equal(adata.X.toarray(), [[0, 3, 0], [2, 0, 0], [1, 0, 12]])
    assert list(adata.var_names) == ["G1", "G2", "G3"]
    assert list(adata.obs["n_counts"]) == [3, 2, 13]


# ---------------------------------------------------------------- bad GEO input


def test_truncated_download(geo, tmp_path) -> None:
    truncated = tmp_path / "truncated.txt.gz"
    truncated.write_bytes(geo["matrix"].read_bytes()[:-2000])
    with pytest.raises(InputError) as err:
        read_kul3(truncated, geo["annotation"])
    assert str(err.value).startswith(f"{truncated}: cannot read the count matrix")
    assert "truncated" in str(err.value)


def test_missing_annotation_column(tmp_path) -> None:
    matrix, _ = _tiny_kul3(tmp_path, ["G1\t1\t2\t3\n"])
    no_class = "Index\tPatient\tSample\tCell_type\tCell_subtype\nc1\tK\tK-T\tT\tx\n"
    annotation = _write_gz(tmp_path / "ann.txt.gz", no_class)
    with pytest.raises(InputError) as err:
        read_kul3(matrix, annotation)
    message = str(err.value)
    assert str(annotation) in message and "'Class' missing" in message
    assert "columns: Index, Patient, Sample, Cell_type, Cell_subtype" in message


def test_cells_missing_from_the_annotation(tmp_path) -> None:
    _, annotation = _tiny_kul3(tmp_path, [])  # annotates c1-c3
    matrix = _write_gz(tmp_path / "m4.txt.gz", "Index\tc1\tc2\tc3\tc9\nG1\t1\t2\t3\t4\n")
    with pytest.raises(InputError) as err:
        read_kul3(matrix, annotation)
    message = str(err.value)
    assert str(matrix) in message and str(annotation) in message and "'c9'" in message


@pytest.mark.parametrize(
    ("row", "what"),
    [("G2\t1\t-4\t0\n", "negative count '-4' for cell 'c2'"),
     ("G2\t1\t0\t2.5\n", "fractional count '2.5' for cell 'c3'"),
     ("G2\t1\tNA\t2\n", "non-numeric count 'NA' for cell 'c2'"),
     ("G2\t1\t2\n", "has 2 counts but the header names 3 cells")],
)
def test_bad_counts_name_the_file_and_gene_row(tmp_path, row: str, what: str) -> None:
    matrix, annotation = _tiny_kul3(tmp_path, ["G1\t0\t1\t2\n", row, "G3\t5\t5\t5\n"])
    with pytest.raises(InputError) as err:
        read_kul3(matrix, annotation)
    message = str(err.value)
    assert message.startswith(f"{matrix}: gene row 'G2' (line 3)")
    assert what in message
