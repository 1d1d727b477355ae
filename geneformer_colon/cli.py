"""The `geneformer-colon` command: utilities around runs and data."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from geneformer_colon.errors import InputError


def _synth(args: argparse.Namespace) -> None:
    from geneformer_colon.data.synthetic import write_synthetic_kul3

    paths = write_synthetic_kul3(args.out_dir, n_cells=args.cells, n_genes=args.genes, seed=args.seed)
    for path in paths.values():
        print(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geneformer-colon", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser(
        "synth", help="write a synthetic KUL3 look-alike in the GEO file format (27414 x 33694 is full size)"
    )
    synth.add_argument("out_dir")
    synth.add_argument("--cells", type=int, default=3000)
    synth.add_argument("--genes", type=int, default=2000)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(run=_synth)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
