"""The `geneformer-colon` command: utilities around runs and data."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from geneformer_colon.common.console import report_input_errors
from geneformer_colon.common.errors import InputError, Interrupted

if TYPE_CHECKING:
    from geneformer_colon.jobs.predict import GeneIds

SYNTHETIC_H5AD = "cells.h5ad"


def _synth(args: argparse.Namespace) -> None:
    from geneformer_colon.data.synthetic import write_synthetic_kul3

    paths = write_synthetic_kul3(args.out_dir, n_cells=args.cells, n_genes=args.genes, seed=args.seed,
                                 donor_shift=args.donor_shift)
    if args.h5ad:
        from geneformer_colon.common.io import atomic_path
        from geneformer_colon.data.sources import KUL3Source

        paths["h5ad"] = Path(args.out_dir) / SYNTHETIC_H5AD
        with atomic_path(paths["h5ad"]) as tmp:
            KUL3Source(args.out_dir, gene_map=str(paths["gene_table"])).write_canonical(tmp)
    for path in paths.values():
        print(path)


def _compare(args: argparse.Namespace) -> None:
    from geneformer_colon.report.compare import compare_runs, print_comparison

    print_comparison(compare_runs(args.paths, args.out))


def _history(args: argparse.Namespace) -> None:
    from geneformer_colon.report.history import append_history, run_history

    entry = run_history(args.run_dir)
    print(entry)
    if args.append:
        print(f"appended to {append_history(entry, args.append)}")


def _genes(args: argparse.Namespace) -> GeneIds:
    from geneformer_colon.jobs.predict import GeneIds

    return GeneIds(ensembl_key=args.ensembl_key, gene_names=args.gene_names, symbol_key=args.symbol_key)


def _device(text: str) -> str:
    """``auto``: the GPU when there is one (batching.resolve_device)."""
    from geneformer_colon.assembly.batching import resolve_device

    return resolve_device(text)


def _positive(args: argparse.Namespace, *names: str) -> None:
    """Counts (cells a chunk, a batch, tokens a batch) are integers >= 1, and a batch is counted in cells or in
    tokens: one line otherwise."""
    for name in (*names, "max_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} is {getattr(args, name)}; give an integer >= 1")
    if args.batch_size is not None and args.max_tokens is not None:
        raise InputError(f"--batch-size {args.batch_size} and --max-tokens {args.max_tokens}: give one of them (cells "
                         "a batch, or padded tokens a batch)")


def _predict(args: argparse.Namespace) -> None:
    from geneformer_colon.assembly.trained_classifier import TrainedClassifier
    from geneformer_colon.assembly.trust import UNKNOWN, TrustAsked
    from geneformer_colon.jobs.predict import metrics_dir, predict_h5ad

    _positive(args, "chunk_cells", "batch_size")
    asked = TrustAsked(args.uncertainty, args.abstain, args.conformal)
    added = predict_h5ad(TrainedClassifier.load(args.model, args.fold), args.input, args.out, prefix=args.prefix,
                         layer=args.layer, genes=_genes(args), label_key=args.label_key, donor_key=args.donor_key,
                         cell_type_key=args.cell_type_key, chunk_cells=args.chunk_cells, batch_size=args.batch_size,
                         max_tokens=args.max_tokens,
                         device=args.device, asked=asked)
    counts = added[f"{args.prefix}_label"].value_counts()
    print(f"{args.out}: {len(added)} cells; predicted " + ", ".join(f"{name} {n}" for name, n in counts.items()))
    if args.abstain is not None:
        unknown = int(counts.get(UNKNOWN, 0))
        answered = int(counts.drop([UNKNOWN, ""], errors="ignore").sum())
        print(f"abstained ({UNKNOWN}) on {unknown} cells: coverage reached {answered / max(answered + unknown, 1):.3f} "
              f"(asked {args.abstain}, the share of the validation donors' cells answered)")
    if args.label_key:
        print(f"metrics: {metrics_dir(args.out).root}")


def _embed(args: argparse.Namespace) -> None:
    from geneformer_colon.jobs.embed import embed

    _positive(args, "batch_size")
    scores = embed(args.model, args.input, args.out, colours=args.color.split(",") if args.color else None,
                   genes=_genes(args), layer=args.layer, batch_size=args.batch_size, device=args.device,
                   max_tokens=args.max_tokens,
                   fold=args.fold, label_key=args.label_key, donor_key=args.donor_key,
                   cell_type_key=args.cell_type_key)
    print(f"{scores['cells']} cells; silhouette " + ", ".join(
        f"by {key} {value:.3f}" if value is not None else f"by {key} -" for key, value in scores["silhouette"].items()))


def _perturb(args: argparse.Namespace) -> None:
    from geneformer_colon.jobs.perturb import merge_perturb, perturb
    from geneformer_colon.jobs.perturb_shards import parse_shard

    if args.merge:
        print(f"{merge_perturb(args.merge, args.out)}: genes.csv, genes.md, shifts.h5ad, plots/")
        return
    if args.model is None or args.goal is None:
        raise InputError("perturb: give RUN_DIR and --goal CLASS (or --merge SHARD_DIR... to merge shards)")
    shard = parse_shard(args.shard) if args.shard is not None else None
    devices = [device.strip() for device in args.devices.split(",")] if args.devices else None
    if devices is not None and (shard is not None or not all(devices)):
        raise InputError(f"--devices {args.devices}: give devices separated by commas (e.g. cuda:0,cuda:1), "
                         "without --shard (each device runs one shard)")
    genes = args.genes if args.genes is not None else (None if args.gene_set or args.gene_sets else "all")
    out = perturb(args.model, args.goal, args.input, kind=args.perturb, where=args.where, genes=genes,
                  gene_sets=args.gene_set, min_cells=args.min_cells, max_cells=args.max_cells, seed=args.seed,
                  out_dir=args.out, name=args.name, label_key=args.label_key, gene_ids=_genes(args), layer=args.layer,
                  batch_size=args.batch_size, device=args.device, progress=sys.stderr.isatty(), fold=args.fold,
                  gmt=args.gene_sets, combos=args.combos, anchor_gene=args.anchor_gene, shard=shard,
                  resume=args.resume, chunk_cells=args.chunk_cells, devices=devices, emb_mode=args.emb_mode,
                  top_k=args.top_k, max_tokens=args.max_tokens)
    if out.name.rsplit(".shard-", 1)[0] != out.name:
        print(f"{out}: this shard's chunks; merge with perturb --merge once every shard is done")
    else:
        print(f"{out}: genes.csv, genes.md, shifts.h5ad, plots/")


def _explain(args: argparse.Namespace) -> None:
    from geneformer_colon.jobs.explain import explain

    _positive(args)
    out, completeness = explain(args.model, args.input, target=args.target, where=args.where, genes=args.genes,
                                min_cells=args.min_cells, max_cells=args.max_cells, seed=args.seed, steps=args.steps,
                                baseline=args.baseline, out_dir=args.out, name=args.name, gene_ids=_genes(args),
                                layer=args.layer, batch_size=args.batch_size, device=args.device, fold=args.fold,
                                max_tokens=args.max_tokens)
    print(f"{out}: genes.csv, genes.md, attributions.h5ad, plots/; completeness: mean |sum - logit difference| "
          f"{completeness['mean_abs_delta']:.3g} (relative {completeness['relative_mean_abs_delta']:.3g})")


def _cell_options(parser: argparse.ArgumentParser, model_needed: bool = True) -> None:
    parser.add_argument("model", nargs=None if model_needed else "?", help="a run directory or an export")
    parser.add_argument("input", nargs="?", help="an .h5ad of raw counts, read as predict reads it (default: the "
                                                 "run's validation and test cells)")
    parser.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                        help="keep cells whose obs COLUMN is VALUE (repeat: one column's values are alternatives, "
                             "columns must all match), e.g. --where label=Tumor --where donor=KUL01")
    parser.add_argument("--max-cells", type=int, help="at most this many of the chosen cells, drawn with --seed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--genes", help="'all' (every gene expressed in --min-cells of the chosen cells), a "
                                        "comma-separated list or a file of Ensembl ids or symbols (default all)")
    parser.add_argument("--min-cells", type=int, default=10, help="with --genes all (default 10)")
    parser.add_argument("--out", help="the output folder (default <run dir>/<verb>/<name>, or beside INPUT.h5ad)")
    parser.add_argument("--name", help="the output folder's name under the default place")
    _gene_options(parser)


def _cv(args: argparse.Namespace) -> None:
    from geneformer_colon.report.cv_summary import gather

    summary = gather(args.run_dir)
    test = summary["aggregate"]["test"]["macro_f1"]
    print(f"{len(summary['folds'])} of {len(summary['donors'])} folds; test macro F1 mean {test['mean']:.3f} "
          f"(sd {test['sd'] if test['sd'] is not None else float('nan'):.3f}); {args.run_dir}/cv.md")


def _export(args: argparse.Namespace) -> None:
    from geneformer_colon.jobs.export import export_run

    print(export_run(args.run_dir, args.out_dir, args.fold, overwrite=args.overwrite))


def _gene_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layer", help="counts from layers[LAYER] (default: X)")
    parser.add_argument("--ensembl-key", help="the var column of Ensembl ids (default: the var index)")
    parser.add_argument("--gene-names", help="map gene symbols to Ensembl ids with this gene_name_id_dict .pkl or "
                                             "symbol/id .tsv")
    parser.add_argument("--symbol-key", help="with --gene-names: the var column of symbols (default: the var index)")
    parser.add_argument("--max-tokens", type=int, help="padded tokens (cells x longest cell) a forward pass "
                                                       "(default: 64 cells of the model's input size, explain 16)")
    parser.add_argument("--batch-size", type=int, help="cells a forward pass instead of --max-tokens")
    parser.add_argument("--device", default="auto", type=_device,
                        help="auto (the GPU when there is one), cpu, cuda, cuda:1, ... (default auto)")
    _fold_option(parser)


def _fold_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fold", metavar="DONOR", help="a cv=lodo run: use its fold of this test donor (default: "
                                                        "the ensemble of its finished folds)")


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
    synth.add_argument("--h5ad", action="store_true",
                       help=f"also write the cells as {SYNTHETIC_H5AD} (raw counts, Ensembl ids, obs donor/label/"
                            "cell_type), an input for predict, embed and data=h5ad")
    synth.set_defaults(run=_synth)

    compare = commands.add_parser(
        "compare", help="runs side by side (run directories or sweep roots): table, comparison.md, plots"
    )
    compare.add_argument("paths", nargs="+", metavar="PATH", help="a run directory or a folder holding runs")
    compare.add_argument("--out", help="where comparison.md and the plots go (default: a new folder beside the "
                                       "runs, comparison_<a>_vs_<b>; an earlier comparison is never replaced)")
    compare.set_defaults(run=_compare)

    history = commands.add_parser("history", help="a run as a markdown entry of the training log")
    history.add_argument("run_dir")
    history.add_argument("--append", metavar="FILE", help="also append the entry to FILE (e.g. TRAINING_HISTORY.md)")
    history.set_defaults(run=_history)

    predict = commands.add_parser("predict", help="classify the cells of any h5ad of raw counts into a copy of it")
    predict.add_argument("model", help="a run directory (its best checkpoint) or an export (geneformer-colon export)")
    predict.add_argument("input", help="an .h5ad of raw counts (never written to)")
    predict.add_argument("--out", required=True, help="the .h5ad to write: the input with predictions and embeddings")
    predict.add_argument("--prefix", default="gfc", help="names of the new obs/obsm/uns entries (default gfc)")
    predict.add_argument("--label-key", help="obs column of true classes: also write metrics next to --out")
    predict.add_argument("--donor-key", help="with --label-key: obs column of donors (metrics by donor)")
    predict.add_argument("--cell-type-key", help="with --label-key: obs column of cell types (metrics by cell type)")
    predict.add_argument("--chunk-cells", type=int, default=10_000, help="cells read at a time (default 10000)")
    predict.add_argument("--uncertainty", default="max_softmax",
                         help="obs['<prefix>_uncertainty']: max_softmax (default), entropy, energy or knn")
    predict.add_argument("--abstain", type=float, metavar="COVERAGE",
                         help="call 'unknown' every cell less sure than this share (0-1] of the validation donors' "
                              "cells, and report the coverage reached")
    predict.add_argument("--conformal", type=float, metavar="ALPHA",
                         help="write each cell's conformal set at level 1 - ALPHA (0-1) to "
                              "obs['<prefix>_conformal_set']")
    _gene_options(predict)
    predict.set_defaults(run=_predict)

    embed = commands.add_parser("embed", help="UMAPs and silhouette scores of cell embeddings (the donor shift)")
    embed.add_argument("model", help="a run directory or an export")
    embed.add_argument("input", nargs="?", help="an .h5ad of raw counts (default: the run's val and test cells)")
    embed.add_argument("--color", help="obs columns to colour by, comma-separated (default: those of donor, label, "
                                       "predicted, cell_type there are)")
    embed.add_argument("--out", help="folder for the PNGs, silhouette.json and embedding.h5ad")
    for name in ("label", "donor", "cell_type"):
        embed.add_argument(f"--{name.replace('_', '-')}-key",
                           help=f"INPUT's obs column of {name.replace('_', ' ')}s (default: a column named {name})")
    _gene_options(embed)
    embed.set_defaults(run=_embed)

    perturb = commands.add_parser("perturb", help="in-silico perturbation: which genes move cells toward a class")
    _cell_options(perturb, model_needed=False)
    perturb.add_argument("--goal", help="the class the cells should move toward, e.g. Normal (required but with "
                                        "--merge)")
    perturb.add_argument("--perturb", choices=("delete", "overexpress"), default="delete",
                         help="delete the gene's token, or move it to the front (default delete)")
    perturb.add_argument("--gene-set", action="append", default=[], metavar="FILE",
                         help="perturb this file's genes at once, reported as one row (repeatable)")
    perturb.add_argument("--gene-sets", action="append", default=[], metavar="FILE.gmt",
                         help="perturb each set of this GMT file (MSigDB's format) at once, one row a set "
                              "(repeatable)")
    perturb.add_argument("--combos", type=int, metavar="K",
                         help="perturb every K genes of the --genes list at once (2: every pair), one row each")
    perturb.add_argument("--anchor-gene", metavar="GENE",
                         help="perturb GENE together with each other gene (of --genes), one row a pair")
    perturb.add_argument("--label-key", default="label",
                         help="obs column of classes, for the goal centroid (default label)")
    perturb.add_argument("--shard", metavar="I/N",
                         help="perturb the I-th (from 0) of N equal shares of the cells into <out>.shard-I-of-N; "
                              "the last shard to finish merges them")
    perturb.add_argument("--devices", metavar="DEVICE,...",
                         help="one worker process a device (cuda:0,cuda:1 or cpu,cpu), a shard each, then merged")
    perturb.add_argument("--resume", action="store_true",
                         help="continue a stopped perturb (or shard) from its last finished chunk of cells")
    perturb.add_argument("--chunk-cells", type=int, default=16,
                         help="cells a chunk: what --resume keeps of a stopped run (default 16)")
    perturb.add_argument("--emb-mode", choices=("cell", "cell_and_gene"), default="cell",
                         help="cell_and_gene: also how far each perturbation moves every other gene's embedding in "
                              "the cell (gene_shifts.csv, gene_shifts.h5ad)")
    perturb.add_argument("--top-k", type=int, default=20,
                         help="with --emb-mode cell_and_gene: the affected genes kept a perturbed gene (default 20)")
    perturb.add_argument("--merge", nargs="+", metavar="SHARD_DIR",
                         help="merge the shard folders of one perturb into its outputs (--out, default the folder "
                              "the shards name)")
    perturb.set_defaults(run=_perturb)

    explain = commands.add_parser("explain", help="integrated-gradients attributions of genes to a class (captum)")
    _cell_options(explain)
    explain.add_argument("--target", help="the class to explain (default: each cell's predicted class)")
    explain.add_argument("--steps", type=int, default=32, help="integration steps (default 32)")
    explain.add_argument("--baseline", choices=("pad", "mask"), default="pad",
                         help="every gene token replaced by <pad> or <mask> in the baseline (default pad)")
    explain.set_defaults(run=_explain)

    cross = commands.add_parser("cv", help="rewrite a cv=lodo run's cv.json, cv.md and plot from its folds")
    cross.add_argument("run_dir")
    cross.set_defaults(run=_cv)

    export = commands.add_parser("export", help="a run's classifier as a Hugging Face directory with its dictionaries")
    export.add_argument("run_dir")
    export.add_argument("out_dir", help="a new folder, or an earlier export (replaced)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace OUT_DIR even when it holds files an export does not write")
    _fold_option(export)
    export.set_defaults(run=_export)
    return parser


STOPPED = "{command} stopped; its unfinished output was removed, earlier outputs are as they were"


def _stop_on_signal(command: str) -> Callable[[int, FrameType | None], None]:
    """SIGTERM and Ctrl-C unwind the command (what it was writing is removed) and end it in one line."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum, STOPPED.format(command=command))

    return stop


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop_on_signal(args.command))
    try:
        report_input_errors(args.run)(args)
    except BrokenPipeError:  # the reader of a pipe stopped early (`| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit would fail again
        sys.exit(1)


if __name__ == "__main__":
    main()
