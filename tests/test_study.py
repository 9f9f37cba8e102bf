"""End to end on a real local Ray: Tune + OptunaSearch + ASHA over 2-worker Ray Train trials, real FFCV
files of Fashion-MNIST, results in Parquet and the Optuna study in SQLite."""

import math

import optuna
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from study import runner
from study.spec import load_spec

STUDY = {
    "name": "tiny",
    "train": {"backbone": "vit_test_patch4_32", "epochs": 2, "batch_size": 64, "mlp_dim": 64, "dim": 32,
              "warmup_epochs": 0.5, "train_subset": 512, "knn_bank_subset": 512, "knn_eval_subset": 256},
    "resources": {"workers": 2, "cpus_per_worker": 0.45, "driver_cpus": 0.1},
    "search": {"space": {"base_lr": {"log": [1e-4, 1e-2]}}, "num_samples": 3, "max_concurrent": 2,
               "seed": 3},
    "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump({**STUDY, "storage": str(root / "runs"), "data_dir": str(root / "data")}))
    spec = load_spec(path)
    ray.init(num_cpus=2, include_dashboard=True, object_store_memory=256 * 2**20, configure_logging=False,
             runtime_env={"env_vars": runner.WORKER_ENV})
    try:
        trials = runner.run_study(spec)
    finally:
        ray.shutdown()
    return spec, trials


def test_every_trial_is_in_the_parquet_table(finished):
    spec, trials = finished
    table = pq.read_table(spec.study_dir / "results" / "trials.parquet")
    assert table.num_rows == 3 and table.equals(trials)
    rows = table.to_pylist()
    assert {r["status"] for r in rows} <= {"completed", "pruned"}, [r["error"] for r in rows]
    assert any(r["status"] == "completed" for r in rows)
    for r in rows:
        assert 1e-4 <= r["base_lr"] <= 1e-2
        assert 0.0 <= r["knn_top1"] <= 1.0 and 0.0 <= r["knn_top1_init"] <= 1.0
        assert math.isfinite(r["loss"]) and r["epochs_done"] in (1, 2)
        assert r["status"] != "completed" or r["checkpoint"]
    assert len({r["base_lr"] for r in rows}) == 3


def test_epoch_table_has_one_row_per_reported_epoch(finished):
    spec, trials = finished
    epochs = pq.read_table(spec.study_dir / "results" / "epochs.parquet").to_pylist()
    done = {r["trial_id"]: r["epochs_done"] for r in trials.to_pylist()}
    for trial_id, n in done.items():
        assert sorted(r["epoch"] for r in epochs if r["trial_id"] == trial_id) == list(range(1, n + 1))
    assert all(r["images_per_s"] > 0 and 0 < r["moco_m"] <= 1 for r in epochs)


def test_optuna_storage_agrees_with_results(finished):
    spec, trials = finished
    study = optuna.load_study(study_name=spec.name, storage=f"sqlite:///{spec.study_dir / 'optuna.db'}")
    assert len(study.trials) == 3
    assert sorted(t.params["base_lr"] for t in study.trials) == sorted(trials.column("base_lr").to_pylist())
    assert all(t.value is not None and math.isfinite(t.value) for t in study.trials)
