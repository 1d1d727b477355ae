"""Per-gene statistics of per-cell gene effects (perturbation shifts, attributions) and the files they go to.

An effect is measured for (cell, gene) pairs. Per gene, across its cells: the number of cells, the
mean and median of every measured value, a 95% t-interval of the mean of the tested value (the
first), its mean per donor (and per class and cell type where asked) and the fraction of donors
whose mean has the overall mean's sign, a p-value and the Benjamini-Hochberg FDR.

The p-value accounts for rank position. An effect depends on where the gene sits in the cell's
rank list (deleting a top-ranked gene moves a cell more than deleting one near the bottom), and a
gene's ranks are not those of a random gene. So the null is rank-matched: each (cell, gene) pair
falls in one of 20 bins of relative rank (position / genes in the cell; a gene the cell lacks,
inserted by overexpression, in a bin of its own), and under the null the gene's effect in a cell is
a draw from the effects of the *other* genes in the same bin. The sum of the gene's effects then has
mean sum_b n_b mu_b and variance sum_b n_b sigma_b^2 (n_b: the gene's pairs in bin b; mu_b,
sigma_b: the other genes' effects there), and z = (observed - mean) / sd gives a two-sided normal
p-value (the sum of n >= --min-cells draws; a permutation that redraws each pair from its bin has
exactly this mean and variance). Pairs within a cell share the cell's baseline; the null draws from
all cells, so a gene is compared with genes at its ranks across the same cells, not with itself.

Files (``write_gene_outputs``): ``genes.csv`` (every statistic; Ensembl id, symbol), ``genes.md``
(the top 30 each way), a cells x genes ``.h5ad`` (sparse: the tested value of every measured pair,
other values as layers, obs the cells' donor/label/cell type/prediction, var the gene statistics),
``plots/top_genes.png`` (mean and interval, one dot a donor), ``plots/volcano.png`` (mean against
-log10 FDR) and ``settings.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from matplotlib.figure import Figure
from scipy import stats

from geneformer_colon.common.figures import save_figure
from geneformer_colon.common.io import atomic_path, write_json
from geneformer_colon.common.names import H5AD_KEY_ENCODING, h5ad_key
from geneformer_colon.common.text_tables import markdown_table

RANK_BINS = 20
TOP = 30
FDR_LINE = 0.05


@dataclass
class GeneEffects:
    """Per (cell, column) effects: ``values`` maps a value's name to one number per pair, the first being the one
    tested; ``rank`` is the gene's relative rank in the cell (0 top, 1 not expressed)."""

    names: list[str]
    symbols: list[str]
    cell: np.ndarray
    column: np.ndarray
    rank: np.ndarray
    values: dict[str, np.ndarray]
    annotations: dict[str, np.ndarray] = field(default_factory=dict)  # per column, beside n_cells (e.g. rankings)

    @property
    def tested(self) -> str:
        return next(iter(self.values))


def rank_bin(rank: np.ndarray) -> np.ndarray:
    """20 bins of relative rank, and bin 20 for genes a cell lacks (rank 1)."""
    return np.where(rank >= 1.0, RANK_BINS, np.minimum((rank * RANK_BINS).astype(np.int64), RANK_BINS - 1))


def rank_matched_test(value: np.ndarray, column: np.ndarray, rank: np.ndarray, n_columns: int,
                      group: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each column's z and two-sided p-value against the rank-matched null (see the module docstring); NaN where a
    bin the column uses holds fewer than two pairs of other columns. ``group`` (one label a column): the other
    columns are those of the column's group only."""
    n_bins = RANK_BINS + 1
    key = column.astype(np.int64) * n_bins + rank_bin(rank)
    size = n_columns * n_bins
    value = value.astype(np.float64)
    n = np.bincount(key, minlength=size).reshape(n_columns, n_bins).astype(np.float64)
    s1 = np.bincount(key, weights=value, minlength=size).reshape(n_columns, n_bins)
    s2 = np.bincount(key, weights=value**2, minlength=size).reshape(n_columns, n_bins)

    def pooled(sums: np.ndarray) -> np.ndarray:
        if group is None:
            return sums.sum(0)
        labels, inverse = np.unique(group, return_inverse=True)
        totals = np.zeros((len(labels), n_bins))
        np.add.at(totals, inverse, sums)
        return totals[inverse]

    other_n = pooled(n) - n
    with np.errstate(invalid="ignore", divide="ignore"):
        other_mean = (pooled(s1) - s1) / other_n
        other_var = np.maximum((pooled(s2) - s2) / other_n - other_mean**2, 0.0)
        used = n > 0
        lacking = (used & (other_n < 2)).any(axis=1)
        null_mean = np.where(used, n * other_mean, 0.0).sum(1)
        null_var = np.where(used, n * other_var, 0.0).sum(1)
        z = (s1.sum(1) - null_mean) / np.sqrt(null_var)
    z[lacking | ~np.isfinite(z)] = np.nan
    return z, 2.0 * stats.norm.sf(np.abs(z))


def fdr(p_values: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (scipy's false_discovery_control) of the finite p-values; NaN elsewhere."""
    adjusted = np.full(len(p_values), np.nan)
    finite = np.isfinite(p_values)
    if finite.any():
        adjusted[finite] = stats.false_discovery_control(p_values[finite], method="bh")
    return adjusted


def gene_table(effects: GeneEffects, obs: pd.DataFrame, groups: Sequence[str] = ("donor",)) -> pd.DataFrame:
    """One row a column (gene or set), ordered by the tested value's mean, largest first."""
    n_columns = len(effects.names)
    pairs = pd.DataFrame({"column": effects.column, **effects.values})
    by_column = pairs.groupby("column")
    tested = effects.tested
    table = pd.DataFrame({"ensembl_id": effects.names, "symbol": effects.symbols}, index=pd.RangeIndex(n_columns))
    table["n_cells"] = np.bincount(effects.column, minlength=n_columns)
    for name, values in effects.annotations.items():
        table[name] = values
    for name in effects.values:
        table[f"mean_{name}"] = by_column[name].mean().reindex(table.index)
        table[f"median_{name}"] = by_column[name].median().reindex(table.index)
    sd = by_column[tested].std().reindex(table.index).to_numpy()
    n = table["n_cells"].to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        half = stats.t.ppf(0.975, np.maximum(n - 1, 1)) * sd / np.sqrt(n)
    table["ci_low"] = table[f"mean_{tested}"] - half
    table["ci_high"] = table[f"mean_{tested}"] + half
    for group in groups:
        if group not in obs.columns:
            continue
        labels = obs[group].astype(str).to_numpy()[effects.cell]
        means = pairs.assign(group=labels).groupby(["column", "group"])[tested].mean().unstack()
        means = means.reindex(table.index)
        for value in means.columns:
            table[f"{group}_{value}"] = means[value]
        if group == "donor":
            signs = np.sign(means.to_numpy())
            overall = np.sign(table[f"mean_{tested}"].to_numpy())[:, None]
            with np.errstate(invalid="ignore"):
                table["donor_agreement"] = (signs == overall).sum(1) / np.isfinite(signs).sum(1)
    table["z"], table["p_value"] = rank_matched_test(effects.values[tested], effects.column, effects.rank, n_columns)
    table["fdr"] = fdr(table["p_value"].to_numpy())
    return table.sort_values(f"mean_{tested}", ascending=False, kind="stable")


def cell_matrix(effects: GeneEffects, name: str, n_cells: int, order: np.ndarray) -> sp.csr_matrix:
    """Cells x columns (in ``order``) of one value; a pair never measured is an implicit zero, a measured zero is
    stored."""
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    matrix = sp.coo_matrix((effects.values[name].astype(np.float32), (effects.cell, position[effects.column])),
                           shape=(n_cells, len(order)))
    return matrix.tocsr()


# What write_gene_outputs writes, but the matrix (named by the command)
GENE_OUTPUTS = ("genes.csv", "genes.md", "plots", "settings.json")


def write_gene_outputs(out: Path, effects: GeneEffects, obs: pd.DataFrame, settings: dict[str, Any],
                       matrix_name: str, title: str, groups: Sequence[str] = ("donor",),
                       timing: dict[str, Any] | None = None) -> pd.DataFrame:
    """genes.csv, genes.md, the cells x genes matrix, plots and settings.json in ``out`` (each written whole).
    ``timing`` (seconds, devices: what differs between runs of equal results) goes to settings.json alone."""
    table = gene_table(effects, obs, groups)
    with atomic_path(out / "genes.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(out / "genes.md") as tmp:
        tmp.write_text(markdown_report(table, effects.tested, title, settings))
    order = table.index.to_numpy()
    layers = {h5ad_key(name): cell_matrix(effects, name, len(obs), order) for name in list(effects.values)[1:]}
    var = table.set_index("ensembl_id").rename(columns=h5ad_key)
    cells = ad.AnnData(X=cell_matrix(effects, effects.tested, len(obs), order), obs=categorical(obs), layers=layers,
                       var=var, uns={"settings": json.dumps(settings, default=str), "key_encoding": H5AD_KEY_ENCODING})
    with atomic_path(out / matrix_name) as tmp:
        cells.write_h5ad(tmp)
    plot_top_genes(table, effects.tested, out / "plots" / "top_genes.png", title)
    plot_volcano(table, effects.tested, out / "plots" / "volcano.png", title)
    write_json(out / "settings.json", {**settings, **(timing or {})})
    return table


def categorical(obs: pd.DataFrame) -> pd.DataFrame:
    """obs as an h5ad holds it: string columns as categories, column names as h5ad keys (``prob_<class>``)."""
    obs = obs.rename(columns=h5ad_key)
    obs.index = obs.index.astype(str)
    for column in obs.columns:
        if obs[column].dtype == object:
            obs[column] = obs[column].astype(str).astype("category")
    return obs


def markdown_report(table: pd.DataFrame, tested: str, title: str, settings: dict[str, Any]) -> str:
    headers = ["gene", "symbol", "cells", f"mean {tested}", "95% CI", f"median {tested}", "donors agreeing", "FDR"]

    def rows(part: pd.DataFrame) -> list[list[Any]]:
        # rows as mappings: a column named after a class ("mean_delta_CD14+ Monocyte") is no attribute name
        return [[row["ensembl_id"], row["symbol"], int(row["n_cells"]), f"{row[f'mean_{tested}']:.4g}",
                 f"[{row['ci_low']:.3g}, {row['ci_high']:.3g}]", f"{row[f'median_{tested}']:.4g}",
                 f"{row['donor_agreement']:.2f}" if pd.notna(row.get("donor_agreement")) else "-",
                 f"{row['fdr']:.2g}" if pd.notna(row["fdr"]) else "-"] for row in part.to_dict("records")]

    measured = table[table["n_cells"] > 0]
    lines = [f"# {title}", "", ", ".join(f"{key}: {value}" for key, value in settings.items()), "",
             f"## Top {TOP}: largest mean {tested}", "", markdown_table(headers, rows(measured.head(TOP))), "",
             f"## Top {TOP}: smallest mean {tested}", "",
             markdown_table(headers, rows(measured.tail(TOP).iloc[::-1])), ""]
    return "\n".join(lines)


def label_of(row: pd.Series) -> str:
    return str(row["symbol"]) if isinstance(row["symbol"], str) and row["symbol"] else str(row["ensembl_id"])


def plot_top_genes(table: pd.DataFrame, tested: str, path: Path, title: str, each_way: int = 15) -> None:
    """The top genes each way: mean and 95% interval, one dot a donor."""
    measured = table[table["n_cells"] > 0]
    top = pd.concat([measured.head(each_way), measured.tail(each_way)]).drop_duplicates("ensembl_id")
    donors = [column for column in table.columns if column.startswith("donor_") and column != "donor_agreement"]
    figure = Figure(figsize=(7.0, 1.2 + 0.26 * len(top)))
    axis = figure.subplots()
    y = np.arange(len(top))[::-1]
    mean = top[f"mean_{tested}"].to_numpy()
    axis.barh(y, mean, color=np.where(mean > 0, "tab:red", "tab:blue"), alpha=0.5)
    axis.errorbar(mean, y, xerr=[mean - top["ci_low"].to_numpy(), top["ci_high"].to_numpy() - mean], fmt="none",
                  ecolor="black", elinewidth=0.8)
    colours = dict(zip(donors, [f"C{i}" for i in range(len(donors))]))
    for donor in donors:
        axis.scatter(top[donor].to_numpy(), y, s=12, color=colours[donor], label=donor.removeprefix("donor_"),
                     zorder=3)
    axis.axvline(0, color="grey", linewidth=0.8)
    axis.set_yticks(y, [label_of(row) for _, row in top.iterrows()], fontsize=7)
    axis.set_xlabel(f"mean {tested} (bar, 95% CI); dots: donors")
    axis.set_title(title, fontsize=9)
    if donors:
        axis.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1))
    save_figure(figure, path)


def plot_volcano(table: pd.DataFrame, tested: str, path: Path, title: str, labelled: int = 10) -> None:
    """Each gene's mean effect against -log10 FDR; the line at FDR 0.05."""
    measured = table[table["fdr"].notna()]
    figure = Figure(figsize=(6.0, 4.5))
    axis = figure.subplots()
    height = -np.log10(np.maximum(measured["fdr"].to_numpy(), 1e-300))
    significant = measured["fdr"].to_numpy() < FDR_LINE
    axis.scatter(measured[f"mean_{tested}"], height, s=8, c=np.where(significant, "tab:red", "tab:grey"))
    for index in np.argsort(-height)[:labelled]:
        axis.annotate(label_of(measured.iloc[index]), (measured[f"mean_{tested}"].iloc[index], height[index]),
                      fontsize=6)
    axis.axhline(-np.log10(FDR_LINE), color="grey", linestyle="--", linewidth=0.8)
    axis.axvline(0, color="grey", linewidth=0.8)
    axis.set_xlabel(f"mean {tested}")
    axis.set_ylabel("-log10 FDR (rank-matched null)")
    axis.set_title(title, fontsize=9)
    save_figure(figure, path)
