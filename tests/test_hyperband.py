"""Hyperband on real trials (scheduler.type: hyperband): a trial waits paused at its rung until its bracket is full,
then is pruned or resumes from its checkpoint, and the study ends with every trial's epochs recorded once."""

from collections import Counter

import pytest
import ray
from studies import ROOT, rows, write_study

from study import cluster, runner

pytestmark = pytest.mark.cluster  # 5 real trials, paused and resumed: about 4 min on 2 cores

TRAIN = {"backbone": "vit_test_patch4_32", "epochs": 3, "batch_size": 64, "mlp_dim": 64, "dim": 32,
         "warmup_epochs": 0.0, "train_subset": 256, "knn_bank_subset": 256, "knn_eval_subset": 256,
         "monitor_every": 2, "monitor_bank": 128}


def test_hyperband_prunes_at_a_rung_and_resumes_the_best_from_its_checkpoint(tmp_path):
    # 3 epochs at reduction factor 3: a bracket of 2 trials run to the end, then one of 3 trials from 1 epoch
    spec = write_study(tmp_path, {
        "name": "hb", "train": TRAIN, "resources": {"workers": 1, "cpus_per_worker": 0.45, "driver_cpus": 0.05},
        "search": {"space": {"base_lr": {"log": [1.0e-4, 1.0e-2]}}, "sampler": "random", "num_samples": 5},
        "scheduler": {"type": "hyperband", "reduction_factor": 3}, "stopping": {"mode": "observe"},
    }, data_dir=ROOT / "datasets")
    cluster.start_ray(None, num_cpus=2, object_store_memory=256 * 2**20)
    try:
        runner.run_study(spec)
    finally:
        ray.shutdown()
    trials = rows(spec, "trials")
    ended = Counter((t["status"], t["epochs_done"]) for t in trials)
    assert len(trials) == 5 and ended[("pruned", 1)] >= 1 and ended[("completed", 3)] >= 3, ended
    epochs = Counter((e["trial_id"], e["epoch"]) for e in rows(spec, "epochs"))
    assert set(epochs.values()) == {1}  # a resumed trial's epochs are reported once each
    for t in trials:
        assert sorted(e for (tid, e) in epochs if tid == t["trial_id"]) == list(range(1, t["epochs_done"] + 1))
