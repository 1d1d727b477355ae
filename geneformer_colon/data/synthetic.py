"""A synthetic KUL3 look-alike (GSE144735), written in the real GEO file format.

The embedded default of the project trains on this instead of the real cohort: six donors with
the real names, three regions (Normal / Border / Tumor) in unequal numbers, six cell types whose
mix depends on the region, and donors that a model generalises to unequally, as in the team's
log: trained on four donors, it classifies KUL01 well and KUL19 near chance.

Class signal. Each region has a programme, a gene set (1/30 of the genes each, among the better
expressed half) up-regulated by a log fold change of 1.6-2.6 times a per-cell strength: a
homeostatic mucosa programme in Normal cells, an invasive-front (wound-response) programme in
Border cells, which also carry a little of the other two, and a tumour programme, strongest in
the malignant epithelium and weaker in the tumour's microenvironment. Most cells of a sample
(80-85%) and every cell type carry it, so it changes which genes rank high in a cell, which is
what a rank-value model reads.

Donor effects (``_DONOR_SHIFT``, at ``donor_shift=1``):

- Every donor: a technical batch effect (a log-normal multiplier per gene, sigma 0.10-0.50),
  sequencing depth (genes detected per cell), an extra batch shift on the programme genes,
  field cancerisation (a share of the Normal and Border cells lying in patches that carry the
  cohort's tumour programme and lose 90% of their own region's programme), and a tumour of its
  own (a share of the tumour programme's genes swapped for genes of the donor's own).
- KUL01 is the cohort's centre: the smallest batch effect, full depth, no field effect, the
  cohort's tumour programme. A model trained on other donors classifies it well. KUL21, KUL28,
  KUL30 and KUL31 sit between, mildly shifted on every axis.
- KUL19 is shifted on every axis at once. A different tumour (90% of its tumour genes are its
  own, say a hypermutated CMS1-like tumour among CMS2-like ones): its Tumor cells lack the genes
  a model learned on the others. A field effect: 70% of its Normal and Border cells look like
  tumour. A batch effect that hits the class-informative genes (sigma 1.4 on the regions'
  shared programme genes, 0.5 on all, say another dissociation protocol and ambient RNA): each
  class's markers move up or down in all its cells. And 30% lower depth: fewer of those genes
  are seen at all.

``donor_shift`` scales all of it: batch sigmas, field and private shares (at most 1) linearly,
depth as ``depth ** donor_shift``. At 0 the donors are exchangeable (only their class mix and
the sampling differ); above 1 the donors are harsher still. ``donor_effects`` keeps only some of
the effects (``DONOR_EFFECTS``), the others off: ``("batch_sigma", "depth", "marker_batch")`` is a
shift of batch effect and depth only, with no field effect and no private tumour programme, a shift
that leaves every donor's biology the cohort's.

Counts are drawn cell by cell without ever holding a dense cells x genes matrix: a compiled kernel
(``kernels.negative_binomial``) draws each entry by inverse CDF from a counter-based hash of
(seed, cell, gene), so the result is the same whatever the thread count, and most zero entries
cost one hash and one comparison.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp

from geneformer_colon.common.errors import InputError
from geneformer_colon.common.io import atomic_path
from geneformer_colon.data.kernels.negative_binomial import nb_counts
from geneformer_colon.data.kul3 import CELL_TYPES, CLASSES, DONORS, write_kul3

# Bump when the generator's output changes for the same settings (it is part of cache keys).
GENERATOR_VERSION = 3
GENE_TABLE_FILE = "gene_ids.tsv"

# The real cohort's size and depth: genes detected per cell span 200-6,000, mean ~3,700.
_FULL_GENES = 33_694
_FULL_DETECTED = (200.0, 6_000.0)
_MIN_DETECTED = 150.0  # floor at small sizes: the default (2,000 genes) keeps >= ~150

_DONOR_WEIGHTS = np.array([0.20, 0.15, 0.17, 0.16, 0.15, 0.17])
_CLASS_WEIGHTS = np.array([0.27, 0.31, 0.42])  # Normal, Border, Tumor
# Cell-type mix per class (rows: CLASSES, columns: CELL_TYPES): more epithelial in Tumor.
_TYPE_MIX = np.array(
    [
        [0.22, 0.14, 0.04, 0.10, 0.12, 0.38],
        [0.17, 0.21, 0.03, 0.12, 0.14, 0.33],
        [0.08, 0.36, 0.02, 0.15, 0.14, 0.25],
    ]
)
_EPITHELIAL = CELL_TYPES.index("Epithelial cells")
_SAMPLE_LETTER = {"Normal": "N", "Border": "B", "Tumor": "T"}
_SUBTYPES = {
    "B cells": ("CD19+CD20+ B", "IgA+ Plasma", "IgG+ Plasma"),
    "Epithelial cells": ("Mature Enterocytes type 1", "Goblet cells", "Stem-like/TA"),
    "Mast cells": ("Mast cells",),
    "Myeloids": ("SPP1+", "Pro-inflammatory", "cDC", "Proliferating"),
    "Stromal cells": ("Myofibroblasts", "Stromal 1", "Pericytes", "Lymphatic ECs"),
    "T cells": ("CD4+ T cells", "CD8+ T cells", "Regulatory T cells", "NK cells"),
}
_TUMOUR_SUBTYPES = ("CMS1", "CMS2", "CMS3", "CMS4")  # epithelial cells carrying the programme

# Region programmes, in CLASSES order, then the field effect (the cohort's tumour programme).
_NORMAL, _BORDER, _TUMOUR, _FIELD = range(4)
_N_PROGRAMMES = 4
_PROGRAMME_LFC = (1.6, 2.6)  # a programme gene's log fold change at strength 1
_FIELD_LOSS = 0.9  # share of its own region's programme a field-cancerised cell loses


class _DonorShift(NamedTuple):
    """How a donor departs from the cohort (see the module docstring).

    Floats in ``_DONOR_SHIFT`` (at ``donor_shift=1``); arrays over DONORS once scaled.
    """

    batch_sigma: float  # sigma of per-gene log-normal batch multipliers, on every gene
    depth: float  # multiplier of the genes detected per cell
    field: float  # share of the Normal and Border cells in field-cancerised patches
    private: float  # share of the tumour programme's genes swapped for the donor's own
    marker_batch: float  # sigma of extra log-normal batch multipliers on the programme genes


DONOR_EFFECTS = _DonorShift._fields
# Each effect's value when it is off: no batch effect, full depth, no field effect, no private genes.
_NO_SHIFT = _DonorShift(0.0, 1.0, 0.0, 0.0, 0.0)

_DONOR_SHIFT = {
    "KUL01": _DonorShift(0.10, 1.05, 0.00, 0.00, 0.00),
    "KUL19": _DonorShift(0.50, 0.70, 0.70, 0.90, 1.40),
    "KUL21": _DonorShift(0.15, 1.00, 0.08, 0.10, 0.25),
    "KUL28": _DonorShift(0.20, 0.95, 0.15, 0.25, 0.40),
    "KUL30": _DonorShift(0.15, 1.05, 0.03, 0.05, 0.15),
    "KUL31": _DonorShift(0.20, 1.00, 0.12, 0.35, 0.35),
}


class SyntheticKUL3(NamedTuple):
    """What :func:`generate_counts` returns (unpacks like a tuple)."""

    counts: sp.csr_matrix  # int32 UMI counts, cells x genes
    annotation: pd.DataFrame  # columns ANNOTATION_COLUMNS, rows in the order of ``counts``
    symbols: list[str]
    ensembl_ids: list[str]  # "" where the symbol has no Ensembl id


def generate_counts(
    n_cells: int = 3000, n_genes: int = 2000, seed: int = 0, *, donor_shift: float = 1.0,
    donor_effects: tuple[str, ...] = DONOR_EFFECTS,
) -> SyntheticKUL3:
    """Draw a synthetic KUL3 cohort: CSR int32 counts (cells x genes), annotation, gene ids.

    ``donor_shift`` scales every donor-specific effect (0: none, the donors differ only by
    chance; 1: the default story; larger: harsher; see the module docstring). Deterministic per
    seed; the random draws do not depend on ``donor_shift`` or ``donor_effects`` (the donor effects kept, the
    others off: see the module docstring). Full size (27,414 x 33,694, ~100M
    non-zeros) takes ~15 s on two cores and ~1 GB.
    """
    if n_cells < len(DONORS) * len(CLASSES):
        raise InputError(f"--cells {n_cells}: need at least 18 cells (six donors x three classes)")
    if n_genes < 100:
        raise InputError(f"--genes {n_genes}: need at least 100 genes")
    if not (donor_shift >= 0.0 and math.isfinite(donor_shift)):
        raise InputError(f"donor_shift {donor_shift}: need a finite number >= 0")
    unknown = sorted(set(donor_effects) - set(DONOR_EFFECTS))
    if unknown:
        raise InputError(f"donor_effects {unknown}: unknown; choose among {', '.join(DONOR_EFFECTS)}")
    shift = _scaled_shifts(donor_shift, donor_effects)
    rng = np.random.default_rng(seed)
    genes = _gene_model(rng, n_genes)
    donor, klass, ctype = _cell_design(rng, n_cells)
    strength, malignant = _region_strength(rng, donor, klass, ctype, shift)
    donor_effect = genes.batch_noise * shift.batch_sigma[:, None]
    donor_effect[:, genes.region_genes] += genes.region_noise * shift.marker_batch[:, None]
    programme_genes, programme_lfc = _donor_programmes(genes, shift.private)

    # Per (donor, cell type) expression profile, each row summing to one.
    log_profile = (
        genes.base[None, None, :] + donor_effect[:, None, :] + genes.type_effect[None, :, :]
    ).reshape(len(DONORS) * len(CELL_TYPES), n_genes)
    profile = np.exp(log_profile - log_profile.max(axis=1, keepdims=True))
    profile /= profile.sum(axis=1, keepdims=True)
    group = donor * len(CELL_TYPES) + ctype

    # Depth: a target number of detected genes per cell, shifted per donor, met by library size.
    lo, hi = _detected_range(n_genes)
    jitter = np.exp(rng.normal(0.0, 0.08, len(DONORS)) * donor_shift * ("depth" in donor_effects))
    depth = (shift.depth * jitter)[donor]
    target = np.clip(lo + (hi - lo) * rng.beta(3.6, 1.7, n_cells) * depth, lo, hi)
    library = _library_for_detected(profile, genes.inv_dispersion, group, target)

    key = np.uint64(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0])
    args = (
        key, library, group, donor, strength, profile, programme_genes, programme_lfc,
        genes.inv_dispersion,
    )
    indptr = np.zeros(n_cells + 1, np.int64)
    nb_counts(*args, indptr, np.zeros(0, np.int32), np.zeros(0, np.int32), True)
    np.cumsum(indptr, out=indptr)
    indices = np.empty(indptr[-1], np.int32)
    data = np.empty(indptr[-1], np.int32)
    nb_counts(*args, indptr, indices, data, False)
    counts = sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes))

    annotation = _annotation(rng, donor, klass, ctype, malignant)
    symbols = [f"SYNG{i + 1:05d}" for i in range(n_genes)]
    return SyntheticKUL3(counts, annotation, symbols, genes.ensembl_ids)


def programme_genes(n_genes: int = 2000, seed: int = 0, *, donor_shift: float = 1.0) -> dict[str, list[str]]:
    """The planted programmes' genes (Ensembl ids; a gene without one left out), the ground truth that gene
    attributions are checked against: ``Normal``, ``Border`` and ``Tumor`` (the regions' shared
    programmes, the field effect being ``Tumor``'s) and ``Tumor:<donor>`` (a donor's tumour programme:
    the shared one with its private share swapped for the donor's own genes). The same draws as
    :func:`generate_counts` with these settings (the gene model is the generator's first draw)."""
    genes = _gene_model(np.random.default_rng(seed), n_genes)
    ids = np.asarray(genes.ensembl_ids, dtype=object)
    swapped = _swapped(genes, _scaled_shifts(donor_shift).private)
    programmes = {name: genes.shared[k] for k, name in enumerate(CLASSES)}
    programmes.update({f"Tumor:{donor}": _tumour_programme(genes, swapped, d) for d, donor in enumerate(DONORS)})
    return {name: [str(gene) for gene in ids[np.sort(index)] if gene] for name, index in programmes.items()}


def _scaled_shifts(donor_shift: float, effects: tuple[str, ...] = DONOR_EFFECTS) -> _DonorShift:
    """The donor table scaled by ``donor_shift``, the effects not in ``effects`` off: one array over DONORS
    per field."""
    table = np.array([[value if name in effects else off for name, value, off in
                       zip(DONOR_EFFECTS, _DONOR_SHIFT[d], _NO_SHIFT)] for d in DONORS])
    sigma, depth, field, private, marker = table.T
    return _DonorShift(
        sigma * donor_shift,
        depth**donor_shift,
        np.minimum(field * donor_shift, 1.0),
        np.minimum(private * donor_shift, 1.0),
        marker * donor_shift,
    )


def _detected_range(n_genes: int) -> tuple[float, float]:
    """Target range of genes detected per cell: the real 200-6,000 scaled to ``n_genes``.

    The ceiling is aimed 13% low: sampling noise and the region programmes add detected genes.
    """
    scale = n_genes / _FULL_GENES
    lo_full, hi_full = _FULL_DETECTED
    lo = max(lo_full * scale, min(_MIN_DETECTED, 0.075 * n_genes))
    return lo, max(0.87 * hi_full * scale, 1.5 * lo)


class _Genes(NamedTuple):
    base: np.ndarray  # log abundance (G,)
    type_effect: np.ndarray  # (types, G) log fold changes: markers and small noise
    batch_noise: np.ndarray  # (donors, G) unit normals, scaled per donor into batch effects
    region_genes: np.ndarray  # the region-programme genes (all classes' shared sets)
    region_noise: np.ndarray  # (donors, region genes) unit normals: batch shifts on those genes
    shared: np.ndarray  # (classes, n) each region programme's genes, in random order
    private: np.ndarray  # (donors, n) each donor's own tumour-programme genes, in random order
    lfc: np.ndarray  # (G,) a gene's log fold change when its programme is on
    inv_dispersion: np.ndarray  # (G,) negative-binomial size r
    ensembl_ids: list[str]


def _gene_model(rng: np.random.Generator, n_genes: int) -> _Genes:
    base = rng.normal(0.0, 1.6, n_genes)
    type_effect = rng.normal(0.0, 0.25, (len(CELL_TYPES), n_genes))
    n_markers = max(5, n_genes // 25)
    for t in range(len(CELL_TYPES)):
        markers = rng.choice(n_genes, n_markers, replace=False)
        type_effect[t, markers] += rng.uniform(1.5, 3.0, n_markers)
    batch_noise = rng.normal(0.0, 1.0, (len(DONORS), n_genes))
    # Programmes sit on genes expressed well enough to be seen; private ones outside the shared.
    n_programme = max(10, n_genes // 30)
    expressed = rng.permutation(np.argsort(base)[n_genes // 2 :])
    shared = expressed[: len(CLASSES) * n_programme].reshape(len(CLASSES), n_programme)
    others = expressed[len(CLASSES) * n_programme :]
    private = np.stack([rng.choice(others, n_programme, replace=False) for _ in DONORS])
    lfc = rng.uniform(*_PROGRAMME_LFC, n_genes)
    region_genes = np.sort(shared.ravel())
    region_noise = rng.normal(0.0, 1.0, (len(DONORS), region_genes.size))
    inv_dispersion = np.exp(rng.normal(math.log(2.0), 0.5, n_genes))
    numbers = rng.choice(10**10, n_genes, replace=False)
    ensembl_ids = [f"ENSG9{n:010d}" for n in numbers]
    for g in rng.choice(n_genes, max(1, round(0.01 * n_genes)), replace=False):
        ensembl_ids[g] = ""
    return _Genes(
        base, type_effect, batch_noise, region_genes, region_noise, shared, private, lfc,
        inv_dispersion, ensembl_ids,
    )


def _donor_programmes(genes: _Genes, private: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The programme genes (sorted) and each donor's log fold changes on them per programme.

    Returns ``(gene_index (P,), lfc (donors, programmes, P))``; the programmes are the three
    regions' (in CLASSES order) and the field effect. Donor d's tumour programme swaps the
    first ``private[d]`` share of the shared tumour genes for as many of its own genes; the
    field effect is the cohort's (shared) tumour programme in every donor.
    """
    swapped = _swapped(genes, private)
    own = [genes.private[d, : swapped[d]] for d in range(len(DONORS))]
    index = np.unique(np.concatenate([genes.shared.ravel(), *own]))
    lfc = np.zeros((len(DONORS), _N_PROGRAMMES, index.size))
    for d in range(len(DONORS)):
        for k in range(len(CLASSES)):
            on = _tumour_programme(genes, swapped, d) if k == _TUMOUR else genes.shared[k]
            lfc[d, k, np.searchsorted(index, on)] = genes.lfc[on]
        on = genes.shared[_TUMOUR]
        lfc[d, _FIELD, np.searchsorted(index, on)] = genes.lfc[on]
    return index, lfc


def _swapped(genes: _Genes, private: np.ndarray) -> np.ndarray:
    """How many of the shared tumour genes each donor's own genes replace."""
    return np.rint(private * genes.shared.shape[1]).astype(np.intp)


def _tumour_programme(genes: _Genes, swapped: np.ndarray, d: int) -> np.ndarray:
    """Donor d's tumour programme: the shared one, its first ``swapped[d]`` genes swapped for the donor's own."""
    return np.concatenate([genes.shared[_TUMOUR][swapped[d] :], genes.private[d, : swapped[d]]])


def _cell_design(rng: np.random.Generator, n_cells: int) -> tuple[np.ndarray, ...]:
    """Donor, class and cell-type codes; every donor gets every class, in unequal numbers."""
    # Per-donor class mix: the cohort-wide imbalance, perturbed per donor.
    class_mix = rng.dirichlet(_CLASS_WEIGHTS * 100.0, len(DONORS))
    combo_weights = (_DONOR_WEIGHTS[:, None] * class_mix).ravel()
    n_combos = combo_weights.size
    drawn = rng.choice(n_combos, n_cells - n_combos, p=combo_weights / combo_weights.sum())
    combo = np.concatenate([np.arange(n_combos), drawn])
    combo = np.sort(combo, kind="stable")  # cells grouped by donor then class, like the GEO file
    donor, klass = np.divmod(combo, len(CLASSES))
    cum_mix = np.cumsum(_TYPE_MIX, axis=1)
    cum_mix /= cum_mix[:, -1:]
    ctype = (rng.random(n_cells)[:, None] > cum_mix[klass]).sum(axis=1)
    ctype = np.minimum(ctype, len(CELL_TYPES) - 1)
    return donor, klass, ctype


def _region_strength(
    rng: np.random.Generator, donor: np.ndarray, klass: np.ndarray, ctype: np.ndarray,
    shift: _DonorShift,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell strength of each programme (cells x programmes) and which cells are malignant.

    A strength multiplies its programme genes' log fold changes. Most cells of a region carry
    its programme, strongest in the epithelium; Border cells also carry a little of the
    Normal and Tumor programmes. A ``field`` share of a donor's Normal and Border cells lies in
    field-cancerised patches: the cohort's tumour programme on, most of their own lost.
    """
    n = klass.size
    epithelial = ctype == _EPITHELIAL
    normal, border, tumour = (klass == k for k in range(len(CLASSES)))
    u = rng.random((9, n))

    def between(lo: float, hi: float, i: int) -> np.ndarray:
        return lo + (hi - lo) * u[i]

    carries = u[0]  # not every cell of a sample carries its region's programme
    normal_strength = np.where(epithelial, between(0.6, 1.1, 1), between(0.4, 0.9, 1))
    strength = np.zeros((n, _N_PROGRAMMES))
    strength[:, _NORMAL] = np.where(carries < 0.8, normal_strength, between(0.0, 0.2, 2)) * normal
    strength[:, _NORMAL] += between(0.1, 0.4, 2) * border
    border_strength = np.where(carries < 0.85, between(0.5, 1.0, 3), between(0.0, 0.2, 3))
    strength[:, _BORDER] = border_strength * border + between(0.0, 0.3, 4) * tumour
    tumour_strength = np.select(  # not every epithelial cell of a tumour sample is malignant
        [~epithelial, carries < 0.85], [between(0.3, 0.8, 5), between(0.6, 1.2, 5)],
        between(0.0, 0.3, 5),
    )
    t_border = np.where(epithelial & (carries < 0.5), between(0.2, 0.6, 6), between(0.0, 0.15, 6))
    strength[:, _TUMOUR] = tumour_strength * tumour + t_border * border
    malignant = epithelial & (strength[:, _TUMOUR] > 0.3)
    # Field effect: patches of the donor's Normal and Border mucosa carry the tumour programme.
    patch = ~tumour & (u[7] < shift.field[donor])
    strength[:, _FIELD] = np.where(epithelial, between(0.6, 1.2, 8), between(0.3, 0.8, 8)) * patch
    strength[patch, :_TUMOUR] *= 1.0 - _FIELD_LOSS
    return strength, malignant


def _library_for_detected(
    profile: np.ndarray, inv_dispersion: np.ndarray, group: np.ndarray, target: np.ndarray
) -> np.ndarray:
    """Library size per cell whose expected number of detected genes is ``target``.

    Expected detected genes of a profile at library L is sum_g 1 - P(NB(L p_g, r_g) = 0), which
    rises with L: tabulate it on a log grid per profile and interpolate.
    """
    grid = np.logspace(0, 8, 41)
    library = np.empty(target.size)
    for g in np.unique(group):
        mu = grid[:, None] * profile[g][None, :]
        expected = (1.0 - np.exp(-inv_dispersion * np.log1p(mu / inv_dispersion))).sum(axis=1)
        cells = group == g
        library[cells] = np.exp(np.interp(target[cells], expected, np.log(grid)))
    return library


def _annotation(
    rng: np.random.Generator, donor: np.ndarray, klass: np.ndarray, ctype: np.ndarray,
    malignant: np.ndarray,
) -> pd.DataFrame:
    n = donor.size
    donors = np.asarray(DONORS, dtype=object)[donor]
    classes = np.asarray(CLASSES, dtype=object)[klass]
    samples = donors + "-" + np.asarray([_SAMPLE_LETTER[c] for c in CLASSES], dtype=object)[klass]
    codes = rng.choice(4**16, n, replace=False).astype(np.uint64)
    shifts = np.arange(30, -1, -2, dtype=np.uint64)
    two_bits = ((codes[:, None] >> shifts) & np.uint64(3)).astype(np.intp)
    letters = np.frombuffer(b"ACGT", np.uint8)[two_bits]
    barcodes = letters.view("S16").ravel().astype(str).astype(object)
    subtype = np.empty(n, dtype=object)
    pick = rng.random(n)
    for t, name in enumerate(CELL_TYPES):
        cells = ctype == t
        if name == "Epithelial cells":
            tumour_like = cells & malignant
            subtype[tumour_like] = _pick(_TUMOUR_SUBTYPES, pick[tumour_like])
            cells &= ~tumour_like
        subtype[cells] = _pick(_SUBTYPES[name], pick[cells])
    return pd.DataFrame(
        {
            "Index": samples + "_" + barcodes,
            "Patient": donors,
            "Class": classes,
            "Sample": samples,
            "Cell_type": np.asarray(CELL_TYPES, dtype=object)[ctype],
            "Cell_subtype": subtype,
        }
    )


def _pick(options: tuple[str, ...], u: np.ndarray) -> np.ndarray:
    return np.asarray(options, dtype=object)[(u * len(options)).astype(np.intp)]


# ---------------------------------------------------------------- the GEO files


def write_synthetic_kul3(
    out_dir: str | Path, n_cells: int = 3000, n_genes: int = 2000, seed: int = 0, *,
    donor_shift: float = 1.0, donor_effects: tuple[str, ...] = DONOR_EFFECTS,
) -> dict[str, Path]:
    """Write a synthetic cohort as the two GEO files plus a symbol -> Ensembl id table.

    ``donor_shift`` and ``donor_effects`` are :func:`generate_counts`'s. Returns the paths under the keys
    ``matrix``, ``annotation`` and ``gene_table``.
    """
    cohort = generate_counts(n_cells, n_genes, seed, donor_shift=donor_shift, donor_effects=donor_effects)
    paths = {**write_kul3(out_dir, cohort.counts, cohort.symbols, cohort.annotation),
             "gene_table": Path(out_dir) / GENE_TABLE_FILE}
    with atomic_path(paths["gene_table"]) as tmp:
        rows = [f"{s}\t{e}\n" for s, e in zip(cohort.symbols, cohort.ensembl_ids) if e]
        tmp.write_text("symbol\tensembl_id\n" + "".join(rows))
    return paths
