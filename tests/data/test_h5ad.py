"""Any .h5ad read in place as canonical cells, a chunk of cells at a time: keys, layers, ids, bad files."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from geneformer_colon.common.errors import InputError
from geneformer_colon.data.h5ad import CanonicalCells, H5adKeys

KEYS = dict(donor_key="patient", label_key="region", cell_type_key="celltype")  # the test h5ad's


@pytest.fixture(scope="module")
def h5ad_file(tmp_path_factory) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(0)
    counts = rng.negative_binomial(2, 0.5, size=(12, 8)).astype(np.int64)
    counts[0, 0] = 0
    normalised = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
    obs = pd.DataFrame(
        {
            "patient": pd.Categorical(["P1", "P2", "P3"] * 4),
            "region": ["Tumor", "Normal"] * 6,
            "celltype": ["Epithelial cells"] * 12,
            "batch": [f"b{i % 2}" for i in range(12)],
        },
        index=[f"cell{i}" for i in range(12)],
    )
    var = pd.DataFrame(
        {"gene_ids": [f"ENSG{i:011d}" for i in range(7)] + [None]},
        index=[f"GENE{i}" for i in range(8)],
    )
    adata = ad.AnnData(X=normalised, obs=obs, var=var, layers={"counts": sp.csr_matrix(counts)})
    path = tmp_path_factory.mktemp("h5ad") / "cells.h5ad"
    adata.write_h5ad(path)
    return path, counts


def canonical(path: Path, chunk_cells: int = 10_000, **keys) -> ad.AnnData:
    """The file's cells read in place through its keys, gathered into the canonical AnnData."""
    return CanonicalCells(path, str(path), "test", keys=H5adKeys(**keys)).to_anndata(chunk_cells)


def simple_h5ad(path: Path, X, obs_names: list[str], var: pd.DataFrame | None = None, **obs_columns) -> Path:
    n = len(obs_names)
    obs = pd.DataFrame({"donor": ["D"] * n, "label": ["Normal"] * n, **obs_columns}, index=obs_names)
    var = var if var is not None else pd.DataFrame({"ensembl_id": [f"E{i}" for i in range(X.shape[1])]},
                                                   index=[f"g{i}" for i in range(X.shape[1])])
    ad.AnnData(X=X, obs=obs, var=var).write_h5ad(path)
    return path


@pytest.mark.parametrize("chunk_cells", [5, 12])
def test_custom_keys_layer_and_var_column(h5ad_file, tmp_path, caplog, chunk_cells) -> None:
    path, counts = h5ad_file
    with caplog.at_level(logging.WARNING, logger="geneformer_colon.data"):
        adata = canonical(path, **KEYS, sample_key="batch", ensembl_key="gene_ids",
                          layer="counts", chunk_cells=chunk_cells)
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.int32
    np.testing.assert_array_equal(adata.X.toarray(), counts)
    assert list(adata.obs.columns) == ["donor", "label", "cell_type", "sample", "n_counts"]
    assert list(adata.obs["donor"]) == ["P1", "P2", "P3"] * 4
    assert list(adata.obs["label"]) == ["Tumor", "Normal"] * 6
    assert list(adata.obs["sample"]) == [f"b{i % 2}" for i in range(12)]
    assert all(isinstance(v, str) for v in adata.obs["donor"])
    np.testing.assert_array_equal(adata.obs["n_counts"], counts.sum(axis=1))
    assert adata.obs["n_counts"].dtype == np.int64
    assert list(adata.var["ensembl_id"]) == [f"ENSG{i:011d}" for i in range(7)] + [""]
    assert list(adata.var["symbol"]) == [f"GENE{i}" for i in range(8)]
    assert any("1 of 8 genes have no Ensembl id" in r.getMessage() for r in caplog.records)


def test_ids_from_var_index_dense_float_counts_and_no_cell_types(tmp_path, h5ad_file) -> None:
    _, counts = h5ad_file
    path = simple_h5ad(tmp_path / "ids.h5ad", counts.astype(np.float32), [f"c{i}" for i in range(12)],
                       var=pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(8)]))
    adata = canonical(path, ensembl_key=None, cell_type_key=None, chunk_cells=5)
    assert adata.X.dtype == np.int32
    np.testing.assert_array_equal(adata.X.toarray(), counts)
    assert list(adata.var["ensembl_id"]) == [f"ENSG{i:011d}" for i in range(8)]
    assert list(adata.obs["sample"]) == ["D-Normal"] * 12
    assert set(adata.obs["cell_type"]) == {"unknown"}


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(donor_key="Patient"),
         ["obs column 'Patient' missing", "patient, region", "data.source.donor_key"]),
        (dict(KEYS, layer="raw"), ["layer 'raw' missing (layers: counts)", "data.source.layer"]),
        (dict(KEYS, ensembl_key="ensembl"),
         ["var column 'ensembl' missing (columns: gene_ids)", "data.source.ensembl_key"]),
        (dict(KEYS, ensembl_key=None), ["X holds a fractional value", "data.source.layer"]),
    ],
)
def test_errors_name_file_and_field(h5ad_file, tmp_path, kwargs, expected) -> None:
    path, _ = h5ad_file
    with pytest.raises(InputError) as err:
        canonical(path, **kwargs)
    message = str(err.value)
    assert message.startswith(str(path))
    for part in expected:
        assert part in message


def test_negative_counts_in_a_layer(tmp_path) -> None:
    path = tmp_path / "neg.h5ad"
    ad.AnnData(
        X=np.zeros((2, 2)),
        obs=pd.DataFrame({"donor": ["D", "D"], "label": ["Tumor"] * 2, "cell_type": ["B cells"] * 2}, index=["a", "b"]),
        var=pd.DataFrame({"ensembl_id": ["E1", "E2"]}, index=["g1", "g2"]),
        layers={"counts": sp.csr_matrix(np.array([[1, 0], [0, -2]]))},
    ).write_h5ad(path)
    with pytest.raises(InputError) as err:
        canonical(path, layer="counts")
    assert str(err.value).startswith(f"{path}: layers['counts'] holds a negative value -2 (cell 'b', gene 'g2')")


def test_duplicate_cell_ids_no_cells_and_no_gene_ids_each_get_their_message(tmp_path) -> None:
    ones = sp.csr_matrix(np.ones((3, 2), dtype=np.int32))
    duplicated = simple_h5ad(tmp_path / "dup.h5ad", ones, ["a", "b", "a"])
    with pytest.raises(InputError, match=r"dup.h5ad: cell id 'a' appears 2 times in obs_names.*obs_names_make_unique"):
        canonical(duplicated, cell_type_key=None)

    empty = simple_h5ad(tmp_path / "empty.h5ad", sp.csr_matrix((0, 2), dtype=np.int32), [])
    with pytest.raises(InputError, match=r"empty.h5ad: holds no cells"):
        canonical(empty, cell_type_key=None)

    no_ids = simple_h5ad(tmp_path / "noids.h5ad", ones, ["a", "b", "c"],
                         var=pd.DataFrame({"ensembl_id": ["", ""]}, index=["g1", "g2"]))
    with pytest.raises(InputError, match=r"noids.h5ad: every one of the 2 genes has an empty Ensembl id in "
                                         r"var\['ensembl_id'\].*data.source.ensembl_key"):
        canonical(no_ids, cell_type_key=None)
    assert not (tmp_path / "out.h5ad").exists()
