"""The `geneformer-colon` command: utilities around runs and data."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from geneformer_colon.console import report_input_errors


def _synth(args: argparse.Namespace) -> None:
    from geneformer_colon.data.synthetic import write_synthetic_kul3

    paths = write_synthetic_kul3(args.out_dir, n_cells=args.cells, n_genes=args.genes, seed=args.seed,
                                 donor_shift=args.donor_shift)
    for path in paths.values():
        print(path)


def _compare(args: argparse.Namespace) -> None:
    from geneformer_colon.report.compare import compare_runs, print_comparison

    print_comparison(*compare_runs(args.paths, args.out))


def _history(args: argparse.Namespace) -> None:
    from geneformer_colon.report.history import append_history, run_history

    entry = run_history(args.run_dir)
    print(entry)
    if args.append:
        print(f"appended to {append_history(entry, args.append)}")


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
    synth.add_argument("--donor-shift", type=float, default=1.0,
                       help="0: no donor-specific shift; 1: the default story (KUL19 hardest); more: harsher")
    synth.set_defaults(run=_synth)

    compare = commands.add_parser(
        "compare", help="runs side by side (run directories or sweep roots): table, comparison.md, plots"
    )
    compare.add_argument("paths", nargs="+", metavar="PATH", help="a run directory or a folder holding runs")
    compare.add_argument("--out", help="where comparison.md and the plots go (default: the folder holding the runs)")
    compare.set_defaults(run=_compare)

    history = commands.add_parser("history", help="a run as a markdown entry of the training log")
    history.add_argument("run_dir")
    history.add_argument("--append", metavar="FILE", help="also append the entry to FILE (e.g. TRAINING_HISTORY.md)")
    history.set_defaults(run=_history)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    report_input_errors(args.run)(args)


if __name__ == "__main__":
    main()
