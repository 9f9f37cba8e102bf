"""End to end on a real local Ray: Tune + OptunaSearch + ASHA over 2-worker Ray Train trials, real FFCV
files of Fashion-MNIST, results in Parquet and the Optuna study in SQLite. A grid over the three methods
runs each of them through the real training loop."""

import math

import optuna
import pyarrow.parquet as pq
import pytest
from studies import ROOT, run_studies, write_study

from study import results

STUDY = {
    "name": "tiny",
    "train": {"backbone": "vit_test_patch4_32", "epochs": 2, "batch_size": 64, "mlp_dim": 64, "dim": 32,
              "warmup_epochs": 0.5, "train_subset": 512, "knn_bank_subset": 512, "knn_eval_subset": 256},
    "resources": {"workers": 2, "cpus_per_worker": 0.45, "driver_cpus": 0.1},
    "search": {"space": {"method": {"choice": ["moco_v3", "byol", "simclr"]}}, "sampler": "grid",
               "num_samples": 3, "max_concurrent": 2, "seed": 3},
    "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    spec = write_study(tmp_path_factory.mktemp("study"), STUDY, data_dir=ROOT / "datasets")  # converted once
    run_studies(spec)
    return spec, pq.read_table(spec.study_dir / "results" / "trials.parquet")


def test_every_trial_is_in_the_parquet_table(finished):
    spec, trials = finished
    table = pq.read_table(spec.study_dir / "results" / "trials.parquet")
    key = ["trial_id", "status", "knn_top1"]
    assert table.num_rows == 3 and table.select(key).equals(trials.select(key))
    rows = table.to_pylist()
    assert {r["status"] for r in rows} <= {"completed", "pruned"}, [r["error"] for r in rows]
    assert any(r["status"] == "completed" for r in rows)
    for r in rows:
        assert 0.0 <= r["knn_top1"] <= 1.0 and 0.0 <= r["knn_top1_init"] <= 1.0
        assert math.isfinite(r["loss"]) and r["epochs_done"] in (1, 2)
        assert r["status"] != "completed" or r["checkpoint"]
    assert sorted(r["method"] for r in rows) == ["byol", "moco_v3", "simclr"]


def test_epoch_table_has_one_row_per_reported_epoch(finished):
    spec, trials = finished
    epochs = results.open(spec.study_dir).table("epochs").to_pylist()
    done = {r["trial_id"]: r["epochs_done"] for r in trials.to_pylist()}
    for trial_id, n in done.items():
        assert sorted(r["epoch"] for r in epochs if r["trial_id"] == trial_id) == list(range(1, n + 1))
    assert all(r["images_per_s"] > 0 and 0 < r["moco_m"] <= 1 for r in epochs)
    assert all(0 <= r["dense_knn_min"] <= r["dense_knn_last"] <= 1 or math.isnan(r["dense_knn_last"])
               for r in epochs)
    # the instability summary of every epoch reaches the table
    assert all(r["spike_count"] >= 0 and r["nonfinite"] == 0 and 0 < r["collapse_std_min"] < 1 for r in epochs)


def test_optuna_storage_agrees_with_results(finished):
    spec, trials = finished
    study = optuna.load_study(study_name=spec.name, storage=f"sqlite:///{spec.study_dir / 'optuna.db'}")
    assert len(study.trials) == 3
    assert sorted(t.params["method"] for t in study.trials) == sorted(trials.column("method").to_pylist())
    assert all(t.value is not None and math.isfinite(t.value) for t in study.trials)


def test_completed_trials_export_a_backbone_timm_loads(finished):
    from pathlib import Path

    import torch

    from trainers.export import load_exported

    _, trials = finished
    done = [r for r in trials.to_pylist() if r["status"] == "completed"]
    backbone = load_exported(Path(done[0]["checkpoint"]) / "backbone.safetensors")
    assert backbone(torch.zeros(2, 3, 32, 32)).shape == (2, 64)
