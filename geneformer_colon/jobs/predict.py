"""Predict any h5ad with a trained classifier: ``geneformer-colon predict RUN_OR_EXPORT INPUT.h5ad --out OUT.h5ad``.

The input is read a chunk of cells at a time (raw counts from ``X`` or a layer; Ensembl ids from a
var column, the var index, or symbols mapped with a gene name dictionary), tokenized with the
model's own dictionaries and settings, and classified; no label or donor column is needed.
OUT.h5ad is the input with, for ``prefix`` (default ``gfc``):

- ``obs["<prefix>_label"]``: the predicted class (empty for a cell with no gene of the vocabulary);
- ``obsm["<prefix>_probabilities"]``: one row a cell, one column a class in the order of
  ``uns["<prefix>"]["classes"]`` (NaN for a cell with no gene of the vocabulary): a matrix, not a
  column a class, because class names (``CD4+/CD25 T Reg``) are no safe h5 names;
- ``obsm["X_<prefix>"]``: the pooled cell embedding the classifier head sees;
- ``obs["<prefix>_uncertainty"]``: each cell's uncertainty score (``--uncertainty``: max_softmax, entropy,
  energy or knn, named in ``uns["<prefix>"]["uncertainty"]``); with ``--abstain COVERAGE`` the label of each
  cell less sure than that share of the validation donors' cells is ``unknown``; with ``--conformal ALPHA``,
  ``obs["<prefix>_conformal_set"]`` holds each cell's conformal set (classes joined by ``|``);
- ``uns["<prefix>"]``: the model (run or export, checkpoint), the classes, the tokenizer, the calibration, the
  uncertainty score, and the abstention (coverage asked and reached) and conformal settings.

The probabilities are the model's calibrated ones (``calibration.json`` of the run or export).

OUT.h5ad is a copy of the input written to a temporary name and renamed when complete; the input
is never opened for writing. Memory holds one chunk of counts and tokens; the embeddings are
written to OUT.h5ad chunk by chunk. With ``label_key`` the metrics of the whole file, by donor and
by cell type, are written in the run-directory format to ``<OUT stem>_metrics/``.
"""

from __future__ import annotations

import itertools
import logging
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem, write_elem
from rich.progress import Progress

from geneformer_colon.assembly.batching import token_budget
from geneformer_colon.assembly.scoring import group_metrics, prediction_table, score_split
from geneformer_colon.assembly.trained_classifier import TrainedClassifier
from geneformer_colon.assembly.trust import CellAnswers, TrustAsked, asked_line
from geneformer_colon.common.errors import InputError
from geneformer_colon.common.io import atomic_path
from geneformer_colon.common.names import FINISHED, GROUPINGS, METRICS, TEST
from geneformer_colon.common.output_folder import output_folder
from geneformer_colon.data.canonical import check_gene_ids, obs_n_counts, obs_strings
from geneformer_colon.data.counts import CellCounts
from geneformer_colon.data.dictionaries import read_gene_name_map
from geneformer_colon.data.h5ad import CHUNK_CELLS, H5adReader, ensembl_ids_of
from geneformer_colon.data.tokenizer import TokenizedCells, tokenize_chunks
from geneformer_colon.runs.layout import RunLayout
from geneformer_colon.runs.record import run_record, write_metrics

log = logging.getLogger(__name__)

PREFIX = "gfc"


@dataclass(frozen=True)
class GeneIds:
    """Where an input's Ensembl ids come from: a var column (``ensembl_key``), the var index (None), or
    symbols (``symbol_key`` var column, or the index) mapped with a gene name dictionary."""

    ensembl_key: str | None = None
    gene_names: str | None = None
    symbol_key: str | None = None

    def of(self, var: pd.DataFrame, path: Path) -> tuple[np.ndarray, str]:
        if self.gene_names is None:
            field = f"var['{self.ensembl_key}']" if self.ensembl_key else "the var index"
            return ensembl_ids_of(var, self.ensembl_key, path, "--ensembl-key"), field
        mapping = read_gene_name_map(self.gene_names)
        symbols = var.index.astype(str) if self.symbol_key is None else pd.Index(
            obs_strings(var, self.symbol_key, path, "--symbol-key", "the var column of gene symbols"))
        field = f"{'the var index' if self.symbol_key is None else f'var[{self.symbol_key!r}]'} mapped by " \
                f"{self.gene_names}"
        return np.array([mapping.get(symbol, "") for symbol in symbols], dtype=object).astype(str), field


def vocabulary_order(gene_ids: np.ndarray, model: TrainedClassifier, path: Path, field: str) -> np.ndarray:
    """The input's columns ordered by their genes' token ids (genes outside the vocabulary last).

    Equal values in a cell rank by column order (Geneformer's rule); ordering the columns by token
    id makes a file's predictions independent of its gene order. With dictionaries derived from
    the training cells, token ids follow the training data's column order: the same tokens.
    """
    vocabulary, mapping = model.dictionaries.token, model.dictionaries.mapping
    ids = gene_ids if mapping is None else [mapping.get(gene.upper(), "") for gene in gene_ids]
    token_ids = np.array([vocabulary.get(gene, np.iinfo(np.int64).max) for gene in ids], dtype=np.int64)
    known = int((token_ids < np.iinfo(np.int64).max).sum())
    if known == 0:
        example = next((gene for gene in gene_ids if gene), "none")
        size = sum(not token.startswith("<") for token in vocabulary)
        raise InputError(f"{path}: none of the {len(gene_ids)} genes in {field} (e.g. {example!r}) is in the model's "
                         f"vocabulary of {size} genes; give Ensembl ids (--ensembl-key) or map symbols with "
                         "--gene-names (Geneformer's gene_name_id_dict)")
    log.info("%d of %d genes of %s are in the model's vocabulary", known, len(gene_ids), path)
    return np.argsort(token_ids, kind="stable")


def file_counts(source: H5adReader, gene_ids: np.ndarray, field: str, order: np.ndarray, chunk_cells: int
                ) -> CellCounts:
    """The input's counts as checked chunks, columns in ``order``; obs['n_counts'] when the file has it, else
    row sums (over all genes, whatever the vocabulary)."""
    fix = "give the layer that holds them with --layer"

    def chunks() -> Iterator[tuple[sp.csr_matrix, np.ndarray]]:
        for start, counts in zip(range(0, source.shape[0], chunk_cells), source.count_chunks(fix, chunk_cells)):
            obs = source.obs.iloc[start : start + counts.shape[0]]
            n_counts = obs_n_counts(obs, counts, obs.index, str(source.path))
            totals = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel() if n_counts is None else n_counts
            yield counts[:, order], totals

    return CellCounts(chunks, gene_ids[order], field, source.shape[0], str(source.path))


def tokenized_chunks(model: TrainedClassifier, source: H5adReader, genes: GeneIds, chunk_cells: int = CHUNK_CELLS
                     ) -> Iterator[tuple[slice, TokenizedCells]]:
    """The cells of an open h5ad tokenized as the model tokenizes, chunk by chunk: (their rows, their tokens)."""
    gene_ids, field = genes.of(source.var, source.path)
    check_gene_ids(gene_ids, source.path, field, "give Ensembl ids (--ensembl-key) or --gene-names")
    order = vocabulary_order(gene_ids, model, source.path, field)
    start = 0
    for tokens in tokenize_chunks(file_counts(source, gene_ids, field, order, chunk_cells), model.dictionaries,
                                  model.settings):
        yield slice(start, start + len(tokens)), tokens
        start += len(tokens)


def predicted_chunks(model: TrainedClassifier, source: H5adReader, genes: GeneIds, chunk_cells: int = CHUNK_CELLS,
                     batch_size: int | None = None, device: str = "cpu", max_tokens: int | None = None
                     ) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """The cells of an open h5ad, chunk by chunk: (their rows, class probabilities, embeddings); batches of
    ``batch_size`` cells or ``max_tokens`` padded tokens (:func:`token_budget`)."""
    batch_size, max_tokens = token_budget(batch_size, max_tokens, model.settings.resolved_input_size)
    for rows, tokens in tokenized_chunks(model, source, genes, chunk_cells):
        probabilities, embeddings = model.apply(tokens, batch_size=batch_size, max_tokens=max_tokens, device=device)
        yield rows, probabilities, embeddings


def new_obsm_array(handle: h5py.File, key: str, shape: tuple[int, int], dtype: type = np.float32) -> h5py.Dataset:
    """An empty ``obsm[key]`` (replacing one of that name), encoded as anndata encodes a dense array."""
    obsm = handle.require_group("obsm")
    if key in obsm:
        del obsm[key]
    dataset = obsm.create_dataset(key, shape=shape, dtype=dtype)
    dataset.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    return dataset


def predict_h5ad(
    model: TrainedClassifier,
    input_path: str | Path,
    out_path: str | Path,
    prefix: str = PREFIX,
    layer: str | None = None,
    genes: GeneIds = GeneIds(),
    label_key: str | None = None,
    donor_key: str | None = None,
    cell_type_key: str | None = None,
    chunk_cells: int = CHUNK_CELLS,
    batch_size: int | None = None,
    device: str = "cpu",
    max_tokens: int | None = None,
    asked: TrustAsked = TrustAsked(),
) -> pd.DataFrame:
    """Write OUT.h5ad (see the module docstring); return the new obs columns (one row a cell)."""
    input_path, out_path = Path(input_path), Path(out_path)
    if out_path.resolve() == input_path.resolve():
        raise InputError(f"{out_path}: the output would overwrite the input; give another --out")
    if not prefix or "/" in prefix:
        raise InputError(f"--prefix {prefix!r}: names obs, obsm and uns entries; give a name without '/'")
    classes = model.class_names
    sources = model.trust_sources()
    asked.check(sources, model.origin.get("run_dir") or model.origin.get("export") or model.origin.get("cv_run_dir")
                or "the model", classes)
    with H5adReader(input_path, layer, layer_setting="--layer") as source:
        truth = labelled_cells(source.obs, classes, label_key, donor_key, cell_type_key, input_path) \
            if label_key is not None else None
        chunks = predicted_chunks(model, source, genes, chunk_cells, batch_size, device, max_tokens)
        first = next(chunks)  # the gene checks, before anything is written
        obs = source.obs.copy()
        n_cells = source.shape[0]
        probabilities = np.full((n_cells, len(classes)), np.nan)
        answers = CellAnswers.empty(n_cells, len(classes), asked)
        with atomic_path(out_path) as tmp:
            shutil.copyfile(input_path, tmp)
            with h5py.File(tmp, "r+") as handle, Progress(transient=True) as progress:
                task = progress.add_task(f"predicting {input_path.name}", total=n_cells)
                embedding = new_obsm_array(handle, f"X_{prefix}", (n_cells, model.hidden_size))
                for rows, chunk_probabilities, chunk_embeddings in itertools.chain([first], chunks):
                    probabilities[rows], embedding[rows] = chunk_probabilities, chunk_embeddings
                    answers.fill(rows, asked.answer(chunk_probabilities, chunk_embeddings, sources))
                    progress.update(task, completed=rows.stop)
                new_obsm_array(handle, probabilities_key(prefix), probabilities.shape, np.float64)[:] = probabilities
                added, trusted = asked.columns(prediction_columns(probabilities, classes, prefix, obs.index)[
                    f"{prefix}_label"], probabilities, answers, prefix, classes, sources)
                write_elem(handle, "obs", pd.concat([obs.drop(columns=added.columns, errors="ignore"), added], axis=1))
                uns = read_elem(handle["uns"]) if "uns" in handle else {}
                origin = {key: str(value) for key, value in model.origin.items() if not isinstance(value, list)}
                uns[prefix] = {**origin, "classes": classes, "model_version": model.settings.model_version,
                               "input_size": model.settings.resolved_input_size, "embedding": f"X_{prefix}",
                               "probabilities": probabilities_key(prefix),
                               "cells_without_vocabulary_genes": int(np.isnan(probabilities[:, 0]).sum()),
                               **trusted}
                write_elem(handle, "uns", uns)
    missing = int(np.isnan(probabilities[:, 0]).sum())
    if missing:
        log.warning("%s: %d cells have no gene of the model's vocabulary: no prediction", input_path, missing)
    if truth is not None:
        with output_folder(metrics_dir(out_path).root, "predict", ("metrics.json", "predictions", "plots")) as written:
            write_labelled_metrics(RunLayout(written), truth, probabilities, classes, model, input_path, donor_key,
                                   asked, answers)
    return added


def probabilities_key(prefix: str) -> str:
    return f"{prefix}_probabilities"


def prediction_columns(probabilities: np.ndarray, classes: Sequence[str], prefix: str, index: pd.Index
                       ) -> pd.DataFrame:
    """The obs column predict adds: the predicted class (empty where no gene of the vocabulary was found)."""
    assigned = ~np.isnan(probabilities[:, 0])
    labels = np.where(assigned, np.asarray(classes, dtype=object)[np.nan_to_num(probabilities).argmax(1)], "")
    return pd.DataFrame({f"{prefix}_label": pd.Categorical(labels)}, index=index)


def metrics_dir(out_path: str | Path) -> RunLayout:
    """Where predict writes the metrics of a labelled file: ``<OUT stem>_metrics/`` beside OUT.h5ad."""
    out_path = Path(out_path)
    return RunLayout(out_path.with_name(f"{out_path.stem}_metrics"))


def labelled_cells(obs: pd.DataFrame, classes: Sequence[str], label_key: str, donor_key: str | None,
                   cell_type_key: str | None, path: Path) -> pd.DataFrame:
    """cell_id, donor, cell_type and the true class index of every cell, checked before anything is predicted."""
    labels = obs_strings(obs, label_key, path, "--label-key", "the column of true classes")
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise InputError(f"{path}: obs['{label_key}'] holds {unknown}, not classes of the model {list(classes)}; "
                         "keep the cells of its classes, or give another --label-key")
    cells = pd.DataFrame({"cell_id": obs.index.astype(str)}, index=obs.index)
    for name, key, option in (("donor", donor_key, "--donor-key"), ("cell_type", cell_type_key, "--cell-type-key")):
        cells[name] = obs_strings(obs, key, path, option, f"the {name} column") if key else "all"
    cells["target"] = pd.Series(labels, index=obs.index).map({name: i for i, name in enumerate(classes)})
    return cells


def write_labelled_metrics(layout: RunLayout, truth: pd.DataFrame, probabilities: np.ndarray, classes: Sequence[str],
                           model: TrainedClassifier, input_path: Path, donor_key: str | None = None,
                           asked: TrustAsked = TrustAsked(), answers: CellAnswers | None = None) -> dict[str, Any]:
    """The whole file's metrics, each donor's and cell type's, as a run directory has them (cells with a
    prediction); with ``donor_key``, the model's held-out and training donors apart (``by_training``); with
    ``--abstain`` or ``--conformal``, how they did (``asked``, overall and each donor's, from predict's
    ``answers``)."""
    scored = ~np.isnan(probabilities[:, 0])
    cells = truth[scored]
    targets = cells["target"].to_numpy()
    title = f"{model.origin.get('run_name', 'model')} on {input_path.name}"
    entry = score_split(layout, TEST, cells, targets, probabilities[scored], classes, title)
    if asked.abstain is not None or asked.conformal is not None:
        donors = cells["donor"].astype(str).to_numpy()
        answered = answers.rows(scored)
        entry["asked"] = asked.figures(targets, probabilities[scored], answered)
        log.info(asked_line(input_path.name, entry["asked"]))
        for donor, figures in entry.get(GROUPINGS["donor"], {}).items():  # where the file has several donors
            rows = donors == donor
            figures["asked"] = asked.figures(targets[rows], probabilities[scored][rows], answered.rows(rows))
            log.info(asked_line(donor, figures["asked"]))
    record = run_record(f"predict {input_path.name}", "predict", FINISHED, {TEST: sorted(set(cells["donor"]))},
                        {TEST: int(scored.sum())}, final={TEST: entry},
                        recipe={"input": str(input_path), **{k: str(v) for k, v in model.origin.items()}})
    if donor_key is not None:
        table = prediction_table(cells, cells["target"].to_numpy(), probabilities[scored], classes)
        record["by_training"] = seen_and_held_out(table, classes, model.origin.get("trained_on") or [],
                                                  model.origin.get("validated_on") or [], input_path)
    return write_metrics(layout, record)


def seen_and_held_out(table: pd.DataFrame, classes: Sequence[str], trained_on: Sequence[str],
                      validated_on: Sequence[str], input_path: Path) -> dict[str, dict[str, Any]]:
    """The figures of the donors the model never saw apart from those of its validation donors (which chose its
    checkpoint) and its training donors (which flatter it), each logged as a line; a warning names the training
    and validation donors found in the file."""
    donors = table["donor"].astype(str)
    seen, validation = donors.isin(trained_on), donors.isin(validated_on) & ~donors.isin(trained_on)
    parts = {"held_out": ~seen & ~validation, "validation": validation, "seen": seen}
    result = {}
    for part, chosen in parts.items():
        if chosen.any():
            names = sorted(donors[chosen].unique())
            result[part] = {"donors": names, **group_metrics(table[chosen], classes)}
            figures = ", ".join(f"{title} {result[part][key]:.3f}" for key, title in METRICS.items()
                                if result[part].get(key) is not None)
            log.info("%s donors %s: %d cells, %s", part.replace("_", "-"), ", ".join(names), result[part]["cells"],
                     figures)
    if "seen" in result:
        log.warning("%s: donors %s were in the model's training data; their figures (seen) overstate how it does on "
                    "new donors: judge it by the held-out ones", input_path, ", ".join(result["seen"]["donors"]))
    if "validation" in result:
        log.warning("%s: donors %s chose the model's checkpoint (its validation donors); their figures (validation) "
                    "are not a new donor's either", input_path, ", ".join(result["validation"]["donors"]))
    return result
