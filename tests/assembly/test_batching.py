"""The verbs' batches (batching.py): by padded tokens or by cells alike, on the device asked for, halved on a GPU's
out-of-memory."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from geneformer_colon.assembly.batching import OomHalving, resolve_device, token_budget
from geneformer_colon.assembly.builders import build_datamodule
from geneformer_colon.assembly.trained_classifier import TrainedClassifier
from geneformer_colon.cli.verbs import build_parser, main
from geneformer_colon.common.errors import InputError
from geneformer_colon.data.store import TokenStore
from geneformer_colon.jobs.evaluate import run_config
from geneformer_colon.runs.layout import RunLayout


def run_cells(run_dir) -> TokenStore:
    """The token store the tiny run was trained from."""
    return build_datamodule(run_config(RunLayout(run_dir))).store


def test_token_budgets_give_the_predictions_of_cell_counts(trained_runs):
    model = TrainedClassifier.load(trained_runs[0])
    cells = run_cells(trained_runs[0])
    rows = np.arange(min(len(cells), 150))
    by_count = model.apply(cells, rows, batch_size=7)
    budget = 700
    seen = []
    infer = model.module.infer
    model.module.infer = lambda ids, mask: seen.append(ids.shape) or infer(ids, mask)
    by_tokens = model.apply(cells, rows, max_tokens=budget)
    assert all(n * length <= budget for n, length in seen) and len({n for n, _ in seen}) > 1
    for got, expected in zip(by_tokens, by_count):
        np.testing.assert_allclose(got, expected, atol=1e-5)
    assert token_budget(None, None, 2048) == (64, 64 * 2048)  # the default: 64 cells of the input size
    assert token_budget(8, None, 2048) == (8, None) and token_budget(None, 500, 2048) == (64, 500)
    assert token_budget(*token_budget(None, None, 4096, 16), 4096, 16) == (16, 16 * 4096)


def test_a_gpu_out_of_memory_halves_the_batch_and_completes(trained_runs, caplog):
    model = TrainedClassifier.load(trained_runs[0])
    cells = run_cells(trained_runs[0])
    rows = np.arange(40)
    expected = model.apply(cells, rows, batch_size=16)
    infer, sizes = model.module.infer, []

    def tight_memory(ids: torch.Tensor, mask: torch.Tensor):
        sizes.append(len(ids))
        if len(ids) > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (a test's)")
        return infer(ids, mask)

    model.module.infer = tight_memory
    with caplog.at_level(logging.WARNING, logger="geneformer_colon.assembly.batching"):
        got = model.apply(cells, rows, batch_size=16)
    for column, reference in zip(got, expected):
        np.testing.assert_allclose(column, reference, atol=1e-5)
    lines = [record.getMessage() for record in caplog.records if "out of GPU memory" in record.getMessage()]
    assert lines == ["out of GPU memory on a batch of 16 cells: retrying in batches of 8 (every later batch too)"]
    assert sizes[0] == 16 and max(sizes[1:]) <= 8  # every later batch cut to the size that fitted
    with pytest.raises(InputError, match="out of GPU memory on one cell alone"):
        OomHalving()(lambda rows: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("oom")), 1)


def test_the_verbs_take_a_token_budget_or_a_cell_count_and_auto_is_the_cpu_here(capsys):
    parser = build_parser()
    args = parser.parse_args(["explain", "run", "--max-tokens", "4096"])
    assert (args.max_tokens, args.batch_size, args.device) == (4096, None, resolve_device("auto")) == (4096, None,
                                                                                                      "cpu")
    assert parser.parse_args(["embed", "run", "--batch-size", "8", "--device", "cpu"]).batch_size == 8
    for bad, said in ((["--max-tokens", "0"], "--max-tokens is 0; give an integer >= 1"),
                      (["--max-tokens", "100", "--batch-size", "4"], "--batch-size 4 and --max-tokens 100: give one")):
        with pytest.raises(SystemExit) as exit:
            main(["explain", "no-such-run", *bad])
        error = capsys.readouterr().err
        assert exit.value.code == 2 and error.count("\n") == 1 and said in error
