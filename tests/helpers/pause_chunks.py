"""``python pause_chunks.py MARKER geneformer-colon-arguments...``: the `geneformer-colon` command, standing still
after perturb's first chunk of cells is written: it writes MARKER and sleeps, so a test can signal it between two
chunks."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from geneformer_colon.cli import verbs
from geneformer_colon.jobs import perturb_shards

write_chunk = perturb_shards.write_chunk


def write_then_pause(path, arrays) -> None:
    write_chunk(path, arrays)
    Path(sys.argv[1]).write_text("paused")
    time.sleep(120)


if __name__ == "__main__":
    perturb_shards.write_chunk = write_then_pause
    verbs.main(sys.argv[2:])
