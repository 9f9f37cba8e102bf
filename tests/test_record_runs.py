"""The run-at-a-time recorder (bench/record_runs.py): a missing run is recorded, a recorded one is not run again,
and the folder reads as a record (real one-trial studies on a real local Ray, tiny runs)."""

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import record_runs  # noqa: E402

from study.replay import load_record  # noqa: E402

GRID = {
    "name": "tiny-record", "dataset": "fashion_mnist", "data_dir": str(ROOT / "datasets"),
    "train": {"backbone": "vit_test_patch4_32", "epochs": 1, "batch_size": 64, "mlp_dim": 64, "dim": 32,
              "warmup_epochs": 0.5, "train_subset": 256, "knn_bank_subset": 128, "knn_eval_subset": 128,
              "monitor_every": 2, "monitor_bank": 128, "trace": True, "export": False},
    "resources": {"workers": 1, "cpus_per_worker": 0.9, "driver_cpus": 0.05},
    "search": {"space": {"base_lr": {"choice": [1.0e-4, 3.0e-4]}, "seed": {"choice": [0]}}, "sampler": "grid",
               "num_samples": 2, "seed": 0},
    "scheduler": {"type": "fifo"},
    "stopping": {"mode": "observe"},
}


def test_a_missing_run_is_recorded_and_a_recorded_one_is_not_run_again(tmp_path):
    folder = tmp_path / "tiny-record"
    folder.mkdir()
    (folder / "grid.yaml").write_text(yaml.safe_dump(GRID))
    storage = tmp_path / "runs"
    (storage / "tiny-record-0000" / "tune").mkdir(parents=True)  # what a stopped sitting leaves of a run
    first = record_runs.record(folder, limit=1, storage=storage)
    assert first == [record_runs.run_key({"base_lr": 1.0e-4, "seed": 0})]  # seed-major, in grid order
    second = record_runs.record(folder, storage=storage)  # a later sitting: only the missing run
    assert second == [record_runs.run_key({"base_lr": 3.0e-4, "seed": 0})]
    assert record_runs.record(folder, storage=storage) == []  # nothing left
    trials = pq.read_table(folder / "trials.parquet").to_pylist()
    assert sorted(t["base_lr"] for t in trials) == [1.0e-4, 3.0e-4] and len({t["study"] for t in trials}) == 2
    traces = {p.stem: pq.read_table(p) for p in (folder / "traces").glob("*.parquet")}  # a file per run
    assert {s: set(t.column("trial_id").to_pylist()) for s, t in traces.items()} == {
        t["study"]: {t["trial_id"]} for t in trials}
    assert sorted(p.name for p in storage.glob("tiny-record-*.yaml")) == ["tiny-record-0000.yaml",
                                                                        "tiny-record-0001.yaml"]
    record = load_record(str(folder))  # what replay and bench/search.py read
    assert record.traced and sorted(record.runs) == [(1.0e-4,), (3.0e-4,)]

    # A run that failed (as Ray's memory monitor leaves one it killed) is run again, and its rows replaced.
    failed = next(t for t in trials if t["base_lr"] == 3.0e-4)
    pq.write_table(pa.Table.from_pylist([{**t, "status": "failed"} if t is failed else t for t in trials],
                                        schema=pq.read_schema(folder / "trials.parquet")), folder / "trials.parquet")
    assert record_runs.record(folder, storage=storage) == [record_runs.run_key({"base_lr": 3.0e-4, "seed": 0})]
    again = pq.read_table(folder / "trials.parquet").to_pylist()
    assert sorted((t["base_lr"], t["status"]) for t in again) == [(1.0e-4, "completed"), (3.0e-4, "completed")]
    rerun = next(t["trial_id"] for t in again if t["base_lr"] == 3.0e-4)
    assert rerun != failed["trial_id"]
    epochs = pq.read_table(folder / "epochs.parquet").to_pylist()
    assert failed["trial_id"] not in {e["trial_id"] for e in epochs} and rerun in {e["trial_id"] for e in epochs}


def test_extra_seeds_add_runs_to_named_cells_after_the_grid_and_a_foreign_cell_is_one_line():
    grid = {**GRID, "search": {**GRID["search"], "space": {"base_lr": {"choice": [1.0e-4, 3.0e-4]},
                                                           "temperature": {"choice": [0.1, 0.5]},
                                                           "seed": {"choice": [0, 1]}}},
            "extra_seeds": {"seeds": [2, 3], "cells": [{"base_lr": 3.0e-4, "temperature": 0.1}]}}
    runs = record_runs.grid_runs(grid)
    assert len(runs) == 2 * 2 * 2 + 2 and runs[-2:] == [{"base_lr": 3.0e-4, "temperature": 0.1, "seed": 2},
                                                        {"base_lr": 3.0e-4, "temperature": 0.1, "seed": 3}]
    assert "extra_seeds" not in record_runs.run_study(grid, runs[-1], 9, Path("runs"))
    grid["extra_seeds"]["cells"] = [{"base_lr": 1.0e-3, "temperature": 0.1}]
    try:
        record_runs.grid_runs(grid)
    except SystemExit as e:
        assert "extra_seeds.cells" in str(e) and "base_lr" in str(e)
    else:
        raise AssertionError("a cell outside the grid was accepted")


def test_rows_of_a_new_schema_append_to_a_record_of_an_older_one(tmp_path):
    old = pa.table({"study": ["r-0000"], "trial_id": ["a"], "knn_dips": [1.0]})  # schema 2's name
    pq.write_table(old, tmp_path / "trials.parquet")
    record_runs.append(tmp_path, {"trials": pa.table({"study": ["r-0001"], "trial_id": ["b"], "knn_dip_count": [2.0]})})
    table = pq.read_table(tmp_path / "trials.parquet")
    assert table.column_names == ["study", "trial_id", "knn_dip_count"]
    assert table.column("knn_dip_count").to_pylist() == [1.0, 2.0]


def test_a_single_traces_table_is_split_into_a_file_per_run_once(tmp_path):
    legacy = pa.table({"study": ["r-0000", "r-0000", "r-0001"], "trial_id": ["a", "a", "b"], "step": [1, 2, 1]})
    pq.write_table(legacy, tmp_path / "traces.parquet")
    new = pa.table({"study": ["r-0002"], "trial_id": ["c"], "step": [1]})
    record_runs.append(tmp_path, {"traces": new})
    assert not (tmp_path / "traces.parquet").exists()
    split = {p.stem: pq.read_table(p).column("step").to_pylist() for p in (tmp_path / "traces").glob("*.parquet")}
    assert split == {"r-0000": [1, 2], "r-0001": [1], "r-0002": [1]}
