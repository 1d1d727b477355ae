"""GMT gene sets (gmt.py): MSigDB's format read, and what happens to an empty set, a gene named twice and a gene
outside the vocabulary, each said in one warning naming the file, line and set."""

from __future__ import annotations

import logging

import pytest

from geneformer_colon.common.errors import InputError
from geneformer_colon.data.gmt import gene_sets_of, read_gmt

VOCABULARY = {"G1", "G2", "G3", "G4"}


def test_sets_and_their_warnings(tmp_path, caplog):
    path = tmp_path / "sets.gmt"
    path.write_text("HALLMARK_A\thttp://msigdb/A\tG1\tG2\tG2\t\n"
                    "# a comment\n"
                    "EMPTY\tno genes\n"
                    "\n"
                    "OUTSIDE\t-\tG3\tNOPE1\tNOPE2\n"
                    "ALL_OUTSIDE\t-\tNOPE3\n")
    sets, warnings = read_gmt(path)
    assert [(s.name, s.description, s.genes, s.line) for s in sets] == [
        ("HALLMARK_A", "http://msigdb/A", ("G1", "G2"), 1), ("OUTSIDE", "-", ("G3", "NOPE1", "NOPE2"), 5),
        ("ALL_OUTSIDE", "-", ("NOPE3",), 6)]
    assert warnings == [f"{path} line 1: set 'HALLMARK_A' names G2 more than once; kept once",
                        f"{path} line 3: set 'EMPTY' has no gene; skipped"]
    with caplog.at_level(logging.WARNING):
        kept = gene_sets_of(path, VOCABULARY.__contains__)
    assert [(s.name, s.genes) for s in kept] == [("HALLMARK_A", ("G1", "G2")), ("OUTSIDE", ("G3",))]
    assert caplog.messages == warnings + [
        f"{path} line 5: set 'OUTSIDE': 2 of its 3 genes not in the model's vocabulary (NOPE1, NOPE2); perturbed "
        "without them",
        f"{path} line 6: set 'ALL_OUTSIDE': none of its 1 genes is in the model's vocabulary; skipped"]


@pytest.mark.parametrize("text, shown", [
    ("ONLY_A_NAME\n", "line 1: expected NAME<TAB>DESCRIPTION<TAB>GENE...; found 'ONLY_A_NAME'"),
    ("A\t-\tG1\nA\t-\tG2\n", "line 2: set 'A' is also on line 1; give each set a name of its own"),
    ("A\t-\tNOPE\n", "no gene set with a gene of the model's vocabulary"),
    ("A G1 G2\n", "(GMT fields are separated by tabs)"),
])
def test_unusable_files_are_one_line(tmp_path, text, shown):
    path = tmp_path / "sets.gmt"
    path.write_text(text)
    with pytest.raises(InputError, match="^" + str(path)) as raised:
        gene_sets_of(path, VOCABULARY.__contains__)
    assert shown in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(InputError, match="no such file"):
        read_gmt(tmp_path / "absent.gmt")
