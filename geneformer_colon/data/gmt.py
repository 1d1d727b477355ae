"""Gene sets in MSigDB's GMT format: one set a line, tab-separated ``NAME<TAB>DESCRIPTION<TAB>GENE<TAB>GENE...``.

What a line may hold and what becomes of it (each a warning naming the file, line and set, never a silent change):

- a set with no gene: skipped;
- a gene named twice in one set: kept once;
- a gene outside the model's vocabulary (checked by the caller, :func:`in_vocabulary`): left out of the set; a
  set left with no gene of the vocabulary is skipped.

Refused in one line: a file that is not there, a line without a name and description (fewer than two tab-separated
fields), a set name given twice, a file with no set left.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from geneformer_colon.common.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneSet:
    """One line of a GMT file: the set's name, its description and its genes (each once, in the file's order)."""

    name: str
    description: str
    genes: tuple[str, ...]
    line: int


def read_gmt(path: str | Path) -> tuple[list[GeneSet], list[str]]:
    """The sets of a GMT file and the warnings about it (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; give a gene-set file in MSigDB's GMT format (NAME, DESCRIPTION, "
                         "genes; tab-separated, one set a line)")
    sets: list[GeneSet] = []
    warnings: list[str] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = [field.strip() for field in line.split("\t")]
        if len(fields) < 2 or not fields[0]:
            raise InputError(f"{path} line {number}: expected NAME<TAB>DESCRIPTION<TAB>GENE...; found "
                             f"{line[:60]!r} (GMT fields are separated by tabs)")
        name = fields[0]
        if name in seen:
            raise InputError(f"{path} line {number}: set {name!r} is also on line {seen[name]}; give each set a "
                             "name of its own")
        seen[name] = number
        named = [gene for gene in fields[2:] if gene]
        genes = tuple(dict.fromkeys(named))
        if len(genes) < len(named):
            twice = sorted({gene for gene in named if named.count(gene) > 1})
            warnings.append(f"{path} line {number}: set {name!r} names {', '.join(twice)} more than once; kept once")
        if not genes:
            warnings.append(f"{path} line {number}: set {name!r} has no gene; skipped")
            continue
        sets.append(GeneSet(name, fields[1], genes, number))
    return sets, warnings


def in_vocabulary(sets: list[GeneSet], known: Callable[[str], bool], path: str | Path
                  ) -> tuple[list[GeneSet], list[str]]:
    """The sets without the genes ``known`` refuses, and a warning a set that lost some (or all: skipped)."""
    kept: list[GeneSet] = []
    warnings: list[str] = []
    for gene_set in sets:
        genes = tuple(gene for gene in gene_set.genes if known(gene))
        lost = [gene for gene in gene_set.genes if not known(gene)]
        where = f"{path} line {gene_set.line}: set {gene_set.name!r}"
        if not genes:
            warnings.append(f"{where}: none of its {len(gene_set.genes)} genes is in the model's vocabulary; skipped")
            continue
        if lost:
            shown = ", ".join(lost[:5]) + (f" and {len(lost) - 5} more" if len(lost) > 5 else "")
            warnings.append(f"{where}: {len(lost)} of its {len(gene_set.genes)} genes not in the model's vocabulary "
                            f"({shown}); perturbed without them")
        kept.append(GeneSet(gene_set.name, gene_set.description, genes, gene_set.line))
    return kept, warnings


def gene_sets_of(path: str | Path, known: Callable[[str], bool]) -> list[GeneSet]:
    """A GMT file's sets within the vocabulary, each warning logged; no set left is an input error."""
    sets, warnings = read_gmt(path)
    sets, lost = in_vocabulary(sets, known, path)
    for warning in warnings + lost:
        log.warning(warning)
    if not sets:
        raise InputError(f"{path}: no gene set with a gene of the model's vocabulary; give Ensembl ids or symbols "
                         "of vocabulary genes (symbols need a name map: --gene-names)")
    return sets
