"""A run resumed from its epoch-1 checkpoint continues the same schedule (Ray Train, real FFCV data)."""

import math
from pathlib import Path

import pytest
import ray
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from data.convert import convert_fashion_mnist
from study import cluster
from trainers.config import TrainConfig
from trainers.worker import train_loop_per_worker


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    paths = convert_fashion_mnist(root / "data")
    cfg = dict(backbone="vit_test_patch4_32", epochs=2, batch_size=64, mlp_dim=64, dim=32, warmup_epochs=0.5,
                      train_subset=256, knn_bank_subset=256, knn_eval_subset=128, checkpoint_every=1,
                      monitor_every=2, monitor_bank=128, online_probe=True, train_path=str(paths["train"]),
                      test_path=str(paths["test"]))
    cluster.start_ray(None, num_cpus=2)
    try:
        def run(name, **options):
            config = TrainConfig(**cfg, **options).as_dict()
            return TorchTrainer(train_loop_per_worker, train_loop_config=config,
                                scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                                run_config=RunConfig(name=name, storage_path=str(root / "runs"))).fit()

        full = run("full")
        first = next(c for c, m in full.best_checkpoints if m["epoch"] == 1)
        resumed = run("resumed", resume_from=first.path)
    finally:
        ray.shutdown()
    states = [torch.load(Path(r.checkpoint.path) / "state.pt", weights_only=False) for r in (full, resumed)]
    return full.metrics_dataframe.to_dict("records"), resumed.metrics_dataframe.to_dict("records"), states


def test_resumed_run_trains_only_the_remaining_epoch(runs):
    full, resumed, _ = runs
    assert [r["epoch"] for r in full] == [1, 2]
    assert [r["epoch"] for r in resumed] == [2]


def test_resumed_run_continues_the_same_schedule_and_state(runs):
    full, resumed, (full_state, resumed_state) = runs
    a, b = full[1], resumed[0]
    assert b["lr"] == a["lr"] and b["moco_m"] == a["moco_m"]  # same step counter, same schedules
    assert b["knn_top1_init"] == a["knn_top1_init"]  # carried by the checkpoint, not recomputed
    assert all(0 <= r["online_probe_top1"] <= 1 and 0 <= r["knn_top1_k200"] <= 1 for r in full + resumed)
    # Augmentations are drawn by FFCV's numba generators, seeded from OS entropy: the losses agree only
    # as well as two runs of the same epoch do. A restart from scratch would show the first epoch's loss.
    assert math.isclose(b["loss"], a["loss"], rel_tol=0.05), (a["loss"], b["loss"], full[0]["loss"])
    # The optimiser state came back: AdamW's step count runs on from the checkpoint (8, not a fresh 4).
    steps = [next(iter(s["optimizer"]["state"].values()))["step"].item() for s in (full_state, resumed_state)]
    assert steps[0] == steps[1] == full_state["step"] + 1 == 8
    assert [h[0] for h in resumed_state["monitor"]["history"]] == [h[0] for h in full_state["monitor"]["history"]]
