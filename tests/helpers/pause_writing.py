"""``python pause_writing.py MARKER geneformer-colon-arguments...``: the `geneformer-colon` command, standing still
between two of its output files (before settings.json of perturb/explain): it writes MARKER and sleeps, so a
test can signal it half-way through writing."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import geneformer_colon.report.gene_effects as gene_effects
from geneformer_colon.cli import verbs


def pause_then_write(path, content) -> None:
    Path(sys.argv[1]).write_text("writing")
    time.sleep(120)


if __name__ == "__main__":
    gene_effects.write_json = pause_then_write
    verbs.main(sys.argv[2:])
