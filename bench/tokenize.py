"""Benchmark: ingest, gene medians and tokenizing, at KUL3 size and at atlas size, time and peak memory.

    python bench/tokenize.py                                # a full-size KUL3 look-alike, from GEO text
    python bench/tokenize.py --cells 1000000 --genes 10000  # an atlas-size h5ad, read in place in chunks

KUL3 size (27,414 cells x 33,694 genes, ~3,700 genes a cell): the synthetic GEO files are written
once, then each stage runs in a fresh process, so that its peak memory is its own:

1. ingest: the GEO text to the canonical ``.h5ad`` (once per dataset, cached);
2. derive: a vocabulary and gene medians from the cells (training from scratch only);
3. tokenize V1 / V2: rank-value encode every cell into a token store;
4. data=h5ad: the canonical file taken as a user's ``.h5ad`` and tokenized (V1) where it is, as
   ``data=h5ad`` does: its columns mapped and its counts checked chunk by chunk, no copy written.

Atlas size (``--cells`` above 100,000): an ``.h5ad`` of synthetic counts is written in chunks (a
block of generated cells repeated, each copy with its own cell ids), then read in place as
``data=h5ad`` reads it: (1) derive, (2) tokenize V1. Every stage reads the matrix a chunk of cells
at a time, so its memory stays bounded whatever the number of cells.

Peak memory is the process's peak resident size above what it held after its imports, set
against the size of the CSR matrix (data + indices + indptr).
"""

from __future__ import annotations

import sys

# This file's name shadows the standard library's `tokenize` (which pandas imports): take the
# script's own folder off the module path before anything else is imported.
sys.path = [entry for entry in sys.path if entry not in ("", __file__.rsplit("/", 1)[0])]

import argparse  # noqa: E402
import multiprocessing  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

ATLAS_CELLS = 100_000
BLOCK_CELLS = 50_000  # generated once, repeated to make an atlas


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _measure(stage: Callable[[], str], results) -> None:
    baseline = _rss_bytes()
    started = time.perf_counter()
    detail = stage()
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results.put((elapsed, max(0, peak - baseline), detail))


def _run(stage: Callable[[], str]) -> tuple[float, int, str]:
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    process = context.Process(target=_measure, args=(stage, results))
    process.start()
    outcome = results.get()
    process.join()
    return outcome


def _ingest_geo(geo_dir: Path, canonical: Path) -> Callable[[], str]:
    def stage() -> str:
        from geneformer_colon.data.sources import KUL3Source
        from geneformer_colon.data.synthetic import GENE_TABLE_FILE

        KUL3Source(data_dir=str(geo_dir), gene_map=str(geo_dir / GENE_TABLE_FILE)).write_canonical(canonical)
        return "GEO text -> canonical"

    return stage


def _user_h5ad(path: Path):
    """``path`` as ``data=h5ad`` reads it: in place, columns mapped, counts checked."""
    from geneformer_colon.data.sources import H5adSource

    return H5adSource(path=str(path), sample_key="sample").cells(path.parent)


def _canonical_file(path: Path):
    """A canonical file a source wrote (counts already checked)."""
    from geneformer_colon.data.h5ad import CanonicalCells

    return CanonicalCells(path, str(path), identity=path.name, checked=True)


def _derive(cells: Callable, out: Path) -> Callable[[], str]:
    def stage() -> str:
        from geneformer_colon.data.dictionaries import derive_dictionaries

        dictionaries = derive_dictionaries(cells().counts(), model_version="V2")
        dictionaries.save(out)
        return f"vocabulary {len(dictionaries.token)} tokens"

    return stage


def _tokenize(cells: Callable, dictionaries: Path, version: str, store: Path) -> Callable[[], str]:
    def stage() -> str:
        from geneformer_colon.data.dictionaries import GeneDictionaries
        from geneformer_colon.data.store import TokenStore, build_store
        from geneformer_colon.data.tokenizer import TokenizerSettings

        loaded = GeneDictionaries.load_directory(dictionaries)
        if version == "V1":  # V1 has no <cls>/<eos>: drop them from the derived V2 vocabulary
            token = {gene: i for i, gene in enumerate(g for g in loaded.token if g not in ("<cls>", "<eos>"))}
            loaded = GeneDictionaries(token=token, median=loaded.median)
        build_store(cells(), loaded, TokenizerSettings(model_version=version), store)
        opened = TokenStore.open(store)
        return f"{len(opened)} cells, {opened.tokens.size / len(opened):.0f} tokens a cell"

    return stage


def write_atlas(path: Path, n_cells: int, n_genes: int) -> None:
    """An h5ad of ``n_cells`` synthetic cells written in chunks: one generated block, repeated with new ids."""
    import numpy as np
    import pandas as pd

    from geneformer_colon.data.canonical import canonical_obs, canonical_var, write_canonical
    from geneformer_colon.data.synthetic import generate_counts

    block = generate_counts(min(BLOCK_CELLS, n_cells), n_genes, seed=0)
    annotation = block.annotation

    def chunks() -> Iterator:
        for start in range(0, n_cells, len(annotation)):
            yield block.counts[: min(len(annotation), n_cells - start)]

    copies = -(-n_cells // len(annotation))
    columns = {"Patient": "donor", "Class": "label", "Cell_type": "cell_type", "Sample": "sample"}
    index = pd.Index([f"{cell}-{copy}" for copy in range(copies) for cell in annotation["Index"]][:n_cells])
    values = {name: np.tile(annotation[column].to_numpy(), copies)[:n_cells] for column, name in columns.items()}
    var = canonical_var(block.symbols, block.ensembl_ids, block.symbols)
    write_canonical(path, chunks(), n_genes, lambda n_counts: canonical_obs(values, index, n_counts), var)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=27_414)
    parser.add_argument("--genes", type=int, default=33_694)
    parser.add_argument("--dir", type=Path, default=Path("data/bench"))
    args = parser.parse_args()
    atlas = args.cells > ATLAS_CELLS
    from geneformer_colon.data.synthetic import GENERATOR_VERSION, write_synthetic_kul3

    # reused while the generator is the same: its version names the input
    name = f"atlas{args.cells}-genes{args.genes}.h5ad" if atlas else f"cells{args.cells}-genes{args.genes}"
    name = f"v{GENERATOR_VERSION}-{name}"
    source = args.dir / name
    if not source.exists():
        started = time.perf_counter()
        if atlas:
            write_atlas(source, args.cells, args.genes)
        else:
            write_synthetic_kul3(source, n_cells=args.cells, n_genes=args.genes, seed=0)
        print(f"synthetic input written in {time.perf_counter() - started:.1f} s: {source}")
    _run(_warm_up)  # compile the kernels (cached) so no stage pays for it

    work = Path(tempfile.mkdtemp(prefix="bench-", dir=args.dir))
    dictionaries = work / "dictionaries"
    try:
        rows = []
        if atlas:
            matrix, cells = source, partial(_user_h5ad, source)
        else:
            matrix, cells = work / "canonical.h5ad", partial(_canonical_file, work / "canonical.h5ad")
            rows.append(("ingest -> canonical .h5ad", *_run(_ingest_geo(source, matrix))))
        rows.append(("derive vocabulary + exact gene medians", *_run(_derive(cells, dictionaries))))
        for version in ("V1",) if atlas else ("V1", "V2"):
            rows.append((f"tokenize {version}: read + encode + write store",
                         *_run(_tokenize(cells, dictionaries, version, work / f"store-{version}"))))
        if not atlas:
            rows.append(("data=h5ad: tokenize V1 in place",
                         *_run(_tokenize(partial(_user_h5ad, matrix), dictionaries, "V1", work / "store-h5ad"))))
        import h5py

        with h5py.File(matrix) as handle:
            csr_bytes = sum(handle["X"][name].size * handle["X"][name].dtype.itemsize
                            for name in ("data", "indices", "indptr"))
            nnz = handle["X"]["data"].size
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.cells} cells x {args.genes} genes, {nnz / args.cells:.0f} genes a cell; "
          f"CSR matrix: {csr_bytes / 1e9:.2f} GB")
    print(f"{'stage':<46} {'time':>8} {'per 1k cells':>12} {'peak extra':>11} {'x CSR':>6}  detail")
    for name, seconds, peak, detail in rows:
        print(f"{name:<46} {seconds:>7.1f}s {1000 * seconds / args.cells:>11.3f}s {peak / 1e9:>9.2f}GB "
              f"{peak / csr_bytes:>6.2f}  {detail}")


def _warm_up() -> str:
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    from geneformer_colon.data.counts import CellCounts
    from geneformer_colon.data.dictionaries import derive_dictionaries
    from geneformer_colon.data.tokenizer import TokenizerSettings, tokenize_cells

    counts = sp.random(20, 30, density=0.5, format="csr", random_state=0, data_rvs=lambda n: np.ones(n)).astype(
        np.int32)
    adata = ad.AnnData(counts)
    adata.var_names = [f"ENSG{i:011d}" for i in range(30)]
    for version in ("V1", "V2"):
        cells = CellCounts.from_anndata(adata)
        tokenize_cells(cells, derive_dictionaries(cells, version), TokenizerSettings(model_version=version))
    return ""


if __name__ == "__main__":
    main()
