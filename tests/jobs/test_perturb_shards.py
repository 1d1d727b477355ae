"""perturb in pieces (perturb_shards.py): shards merged, a stopped run resumed, several worker processes, each equal
to one process left alone byte for byte (settings.json apart from its timing fields)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import signal
import subprocess
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from helpers.paths import HELPERS
from helpers.processes import run_script, wait_for

from geneformer_colon.cli import verbs as cli
from geneformer_colon.common.errors import InputError, Interrupted
from geneformer_colon.common.output_folder import output_folder
from geneformer_colon.jobs import perturb as perturb_module
from geneformer_colon.jobs import perturb_shards
from geneformer_colon.jobs.perturb import TIMING, merge_perturb, perturb
from geneformer_colon.jobs.perturb_shards import parse_shard, shard_dir, share

CHOSEN = {"goal": "Normal", "where": ["label=Tumor"], "max_cells": 7, "min_cells": 3, "progress": False,
          "chunk_cells": 2, "batch_size": 16}
ARGUMENTS = ["--goal", "Normal", "--where", "label=Tumor", "--max-cells", "7", "--min-cells", "3", "--chunk-cells",
             "2", "--batch-size", "16"]


def outputs(folder: Path) -> dict[str, object]:
    """Every output file's bytes (sha256) but shifts.h5ad, read as contents, and settings.json, without timing."""
    hashes = {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
              for path in sorted(folder.rglob("*")) if path.is_file()
              and path.name not in ("shifts.h5ad", "settings.json", ".written.json")}
    shifts = ad.read_h5ad(folder / "shifts.h5ad")
    settings = json.loads((folder / "settings.json").read_text())
    return {**hashes, "X": shifts.X.toarray().tobytes(), "layers": {k: v.toarray().tobytes() for k, v in
                                                                    shifts.layers.items()},
            "obs": shifts.obs.to_csv(), "var": shifts.var.to_csv(), "uns": dict(shifts.uns),
            "settings": {key: value for key, value in settings.items() if key not in TIMING}}


@pytest.fixture(scope="module")
def one_process(trained_runs, tmp_path_factory) -> Path:
    return perturb(trained_runs[0], out_dir=tmp_path_factory.mktemp("one") / "out", **CHOSEN)


@pytest.fixture(scope="module")
def three_shards(trained_runs, tmp_path_factory) -> list[Path]:
    """The three shards of CHOSEN, not merged (a test that changes them works on a copy)."""
    out = tmp_path_factory.mktemp("three") / "out"
    return [perturb(trained_runs[0], out_dir=out, shard=(index, 3), merge_when_done=False, **CHOSEN)
            for index in range(3)]


def test_three_shards_merged_equal_one_process_byte_for_byte(three_shards, one_process):
    folders = three_shards
    out = folders[0].with_name("out")
    assert folders == [shard_dir(out, index, 3) for index in range(3)] and not out.exists()
    cells = [set(json.loads((folder / "plan.json").read_text())["cells"]) for folder in folders]
    assert all(cells) and set.union(*cells) == set(range(7)) and sum(map(len, cells)) == 7  # each cell once
    merge_perturb(folders[::-1])  # any order; the output folder the shards name
    assert outputs(out) == outputs(one_process)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["shards"] == 3 and settings["devices"] == ["cpu"] * 3
    assert "seconds" not in (out / "genes.md").read_text()  # timing in settings.json alone
    assert settings["device_type"] == "cpu" and settings["precision"] == "fp32"


def test_a_finished_shard_merges_only_its_own_jobs_shards_and_leaves_a_merge_under_way(
        trained_runs, three_shards, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="geneformer_colon.jobs")
    folders = [Path(shutil.copytree(folder, tmp_path / folder.name)) for folder in three_shards]
    out = tmp_path / "out"
    monkeypatch.setattr(perturb_module, "compute_shard", lambda *args, **kwargs: folders[2])  # shard 2 just ended
    plan = json.loads((folders[1] / "plan.json").read_text())

    def sibling_of(**identity: str) -> None:
        (folders[1] / "plan.json").write_text(json.dumps({**plan, "identity": {**plan["identity"], **identity}}))

    sibling_of(goal="Border")  # shard 1 of an earlier command toward another goal, complete
    assert perturb(trained_runs[0], out_dir=out, shard=(2, 3), **CHOSEN) == folders[2] and not out.exists()
    assert "the shards are not merged: --merge:" in caplog.text and "differs in goal" in caplog.text
    sibling_of()
    with output_folder(out, "perturb"):  # another shard, finishing at the same time, is merging
        assert perturb(trained_runs[0], out_dir=out, shard=(2, 3), **CHOSEN) == folders[2]
    assert "being merged by another shard" in caplog.text
    sibling_of(device_type="cuda", precision="bf16")
    with pytest.raises(InputError, match=r"^--merge: .*out.shard-1-of-3 was computed on cuda bf16, .*out.shard-0-of-3 "
                                         r"on cpu fp32: together they give numbers no single process gives"):
        merge_perturb(folders)


@pytest.mark.slow
def test_the_last_shard_to_finish_merges(trained_runs, one_process, tmp_path):
    out = tmp_path / "out"
    assert perturb(trained_runs[0], out_dir=out, shard=(1, 2), **CHOSEN) == shard_dir(out, 1, 2)
    assert perturb(trained_runs[0], out_dir=out, shard=(0, 2), **CHOSEN) == out
    assert outputs(out) == outputs(one_process)


def test_a_run_stopped_between_chunks_resumes_to_the_run_left_alone(trained_runs, one_process, tmp_path, monkeypatch,
                                                                    caplog):
    caplog.set_level(logging.INFO, logger="geneformer_colon.jobs")
    out = tmp_path / "out"
    written = []
    real = perturb_shards.write_chunk

    def stop_after_two(path, arrays):
        real(path, arrays)
        written.append(path)
        if len(written) == 2:
            raise Interrupted(signal.SIGTERM, "stopped")

    monkeypatch.setattr(perturb_shards, "write_chunk", stop_after_two)
    with pytest.raises(Interrupted, match=r"2 of 4 chunks of cells kept in .*out.shard-0-of-1: continue with the same "
                                          r"command and --resume"):
        perturb(trained_runs[0], out_dir=out, **CHOSEN)
    assert not out.exists() and len(list((shard_dir(out, 0, 1) / "chunks").glob("*.npz"))) == 2
    with pytest.raises(InputError, match="holds 2 finished chunks of an interrupted perturb; add --resume"):
        perturb(trained_runs[0], out_dir=out, **CHOSEN)
    with pytest.raises(InputError, match=r"holds chunks of another perturb \(it differs in perturb\)"):
        perturb(trained_runs[0], out_dir=out, resume=True, **{**CHOSEN, "kind": "overexpress"})
    rewritten = []
    monkeypatch.setattr(perturb_shards, "write_chunk", lambda path, arrays: (rewritten.append(path.name),
                                                                           real(path, arrays)))
    perturb(trained_runs[0], out_dir=out, resume=True, **{**CHOSEN, "chunk_cells": 3})  # cut as the stopped run
    assert rewritten == ["00002.npz", "00003.npz"]  # the two chunks kept were read back, not done again
    assert "--chunk-cells 2, as the stopped run cut its chunks (not 3)" in caplog.text
    assert outputs(out) == outputs(one_process)
    assert not shard_dir(out, 0, 1).exists()  # the work folder goes with the output written


@pytest.mark.slow
def test_a_half_written_chunk_is_done_again(trained_runs, one_process, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def stop(path, arrays):
        raise Interrupted(signal.SIGTERM, "stopped")

    real = perturb_shards.write_chunk
    monkeypatch.setattr(perturb_shards, "write_chunk", lambda path, arrays: (real(path, arrays), stop(path, arrays)))
    with pytest.raises(Interrupted):
        perturb(trained_runs[0], out_dir=out, **CHOSEN)
    monkeypatch.setattr(perturb_shards, "write_chunk", real)
    chunk = shard_dir(out, 0, 1) / "chunks" / "00000.npz"
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])  # a chunk cut short
    perturb(trained_runs[0], out_dir=out, resume=True, **CHOSEN)
    assert outputs(out) == outputs(one_process)


def test_shares_are_balanced_by_work_and_each_cell_in_one():
    costs = np.array([100, 1, 1, 50, 50, 1, 1, 3])
    shares = [share(costs, index, 2) for index in range(2)]
    assert sorted(np.concatenate(shares).tolist()) == list(range(8))
    assert [int(costs[part].sum()) for part in shares] == [104, 103]
    assert shares[0].tolist() == [0, 7, 6] and shares[1].tolist() == [3, 4, 1, 2, 5]  # largest first
    assert parse_shard("2/3") == (2, 3)


@pytest.mark.parametrize("arguments, shown", [
    (["--shard", "3/2"], "--shard 3/2: give I/N with N >= 1 shards and I from 0 to N-1"),
    (["--shard", "0/0"], "--shard 0/0: give I/N"),
    (["--combos", "3"], "--combos 3: needs a list of genes to combine"),
    (["--anchor-gene", "ENSG00000000000"], "--anchor-gene ENSG00000000000: gene 'ENSG00000000000' is not in the "
                                           "model's vocabulary"),
    (["--devices", "cpu,", ], "--devices cpu,: give devices separated by commas"),
])
def test_bad_inputs_are_one_line_exit_2_nothing_written(trained_runs, tmp_path, capsys, arguments, shown):
    with pytest.raises(SystemExit) as raised:
        cli.main(["perturb", str(trained_runs[0]), "--out", str(tmp_path / "out"), *ARGUMENTS, *arguments])
    assert raised.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and shown in error, error
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_merging_shards_of_different_jobs_is_refused(trained_runs, tmp_path, capsys):
    out = tmp_path / "out"
    first = perturb(trained_runs[0], out_dir=out, shard=(0, 2), **CHOSEN)
    other_goal = perturb(trained_runs[0], out_dir=tmp_path / "b", shard=(1, 2), **{**CHOSEN, "goal": "Border"})
    other_run = perturb(trained_runs[1], out_dir=tmp_path / "c", shard=(1, 2), **CHOSEN)
    for second, shown in ((other_goal, "differs in centroid_digest, goal, goal_centroid"),
                          (other_run, "differs in centroid_digest, model"),
                          (first, "shard 1 missing; shard 0 given twice")):
        before = sorted(path.name for path in tmp_path.iterdir())
        with pytest.raises(SystemExit) as raised:
            cli.main(["perturb", "--merge", str(first), str(second)])
        assert raised.value.code == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("error: --merge") and "\n" not in error and shown in error, error
        assert sorted(path.name for path in tmp_path.iterdir()) == before


@pytest.mark.slow
def test_two_worker_processes_equal_one_process(trained_runs, one_process, tmp_path):
    out = tmp_path / "out"
    cli.main(["perturb", str(trained_runs[0]), "--out", str(out), *ARGUMENTS, "--devices", "cpu,cpu"])
    assert outputs(out) == outputs(one_process)
    assert json.loads((out / "settings.json").read_text())["devices"] == ["cpu", "cpu"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


@pytest.mark.slow
def test_sigterm_between_chunks_then_resume_equals_the_run_left_alone(trained_runs, one_process, tmp_path):
    out = tmp_path / "out"
    marker = tmp_path / "paused"
    process = run_script(str(HELPERS / "pause_chunks.py"), str(marker), "perturb", str(trained_runs[0]), "--out",
                         str(out), *ARGUMENTS, wait=False, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(marker, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert "1 of 4 chunks of cells kept in" in last and "--resume" in last and "Traceback" not in stderr
    cli.main(["perturb", str(trained_runs[0]), "--out", str(out), *ARGUMENTS, "--resume"])
    assert outputs(out) == outputs(one_process)
