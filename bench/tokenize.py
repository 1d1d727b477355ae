"""Benchmark: ingest and tokenize a full-size KUL3 look-alike (27,414 cells x 33,694 genes).

    python bench/tokenize.py [--cells 27414] [--genes 33694] [--dir data/bench]

Writes the synthetic GEO files once (reused on later runs), then times, each stage in a fresh
process so that its peak memory is its own:

1. ingest: the GEO text to the canonical ``.h5ad`` (a one-off per dataset, cached);
2. derive: a vocabulary and gene medians from the cells (only when training from scratch);
3. tokenize V1 / V2: read the ``.h5ad``, rank-value encode every cell, write the token store:
   what every new set of dictionaries or tokenizer settings costs.

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
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402


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


def _ingest(geo_dir: Path, h5ad: Path) -> Callable[[], str]:
    def stage() -> str:
        from geneformer_colon.data import ingest, synthetic

        adata = ingest.read_kul3(geo_dir / synthetic.MATRIX_FILE, geo_dir / synthetic.ANNOTATION_FILE,
                                 gene_map=geo_dir / synthetic.GENE_TABLE_FILE)
        adata.write_h5ad(h5ad)
        X = adata.X
        return f"{adata.n_obs} cells x {adata.n_vars} genes, {X.nnz / adata.n_obs:.0f} genes a cell"

    return stage


def _derive(h5ad: Path, out: Path) -> Callable[[], str]:
    def stage() -> str:
        import anndata as ad

        from geneformer_colon.data.dictionaries import derive_dictionaries

        dictionaries = derive_dictionaries(ad.read_h5ad(h5ad), model_version="V2")
        dictionaries.save(out)
        return f"vocabulary {len(dictionaries.token)} tokens"

    return stage


def _tokenize(h5ad: Path, dictionaries: Path, version: str, store_root: Path) -> Callable[[], str]:
    def stage() -> str:
        import anndata as ad

        from geneformer_colon.data.dictionaries import GeneDictionaries
        from geneformer_colon.data.store import open_or_build_store
        from geneformer_colon.data.tokenizer import TokenizerSettings
        from geneformer_colon.io import file_fingerprint

        loaded = GeneDictionaries.load(dictionaries / "token_dictionary.pkl",
                                       dictionaries / "gene_median_dictionary.pkl")
        if version == "V1":  # V1 has no <cls>/<eos>: drop them from the derived V2 vocabulary
            token = {gene: i for i, gene in enumerate(g for g in loaded.token if g not in ("<cls>", "<eos>"))}
            loaded = GeneDictionaries(token=token, median=loaded.median)
        store = open_or_build_store(store_root, h5ad, file_fingerprint(h5ad), lambda: ad.read_h5ad(h5ad), loaded,
                                    TokenizerSettings(model_version=version))
        return f"{len(store)} cells, {store.tokens.size / len(store):.0f} tokens a cell"

    return stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=27_414)
    parser.add_argument("--genes", type=int, default=33_694)
    parser.add_argument("--dir", type=Path, default=Path("data/bench"))
    args = parser.parse_args()

    from geneformer_colon.data.synthetic import write_synthetic_kul3

    geo_dir = args.dir / f"cells{args.cells}-genes{args.genes}"
    if not (geo_dir / "gene_ids.tsv").is_file():
        started = time.perf_counter()
        write_synthetic_kul3(geo_dir, n_cells=args.cells, n_genes=args.genes, seed=0)
        print(f"synthetic GEO files written in {time.perf_counter() - started:.1f} s: {geo_dir}")
    # Warm the compiled kernels' cache so no stage pays for compilation.
    _run(_tokenize_warmup)

    work = Path(tempfile.mkdtemp(prefix="bench-", dir=args.dir))
    h5ad = work / "kul3.h5ad"
    try:
        rows = [("ingest GEO text -> .h5ad", *_run(_ingest(geo_dir, h5ad)))]
        import anndata as ad

        X = ad.read_h5ad(h5ad).X
        csr_bytes = X.data.nbytes + X.indices.nbytes + X.indptr.nbytes
        del X
        rows.append(("derive vocabulary + medians", *_run(_derive(h5ad, work / "dictionaries"))))
        for version in ("V1", "V2"):
            rows.append((f"tokenize {version}: read .h5ad + encode + write store",
                         *_run(_tokenize(h5ad, work / "dictionaries", version, work / f"store-{version}"))))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nCSR matrix: {csr_bytes / 1e9:.2f} GB")
    print(f"{'stage':<52} {'time':>8} {'peak extra':>11} {'x CSR':>6}  detail")
    for name, seconds, peak, detail in rows:
        print(f"{name:<52} {seconds:>7.2f}s {peak / 1e9:>9.2f}GB {peak / csr_bytes:>6.2f}  {detail}")


def _tokenize_warmup() -> str:
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    from geneformer_colon.data.dictionaries import derive_dictionaries
    from geneformer_colon.data.tokenizer import TokenizerSettings, tokenize_cells

    counts = sp.random(20, 30, density=0.5, format="csr", random_state=0, data_rvs=lambda n: np.ones(n)).astype(
        np.int32)
    adata = ad.AnnData(counts)
    adata.var_names = [f"ENSG{i:011d}" for i in range(30)]
    for version in ("V1", "V2"):
        tokenize_cells(adata, derive_dictionaries(adata, version), TokenizerSettings(model_version=version))
    return ""


if __name__ == "__main__":
    main()
