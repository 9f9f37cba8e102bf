"""A worker group that can never start ends its trial ``failed`` after ``resources.retries`` attempts, with a
one-line reason in its row, and the study ends (Ray Train V2's controller alone would retry it forever).

A real study on a real local Ray of 2 CPUs whose worker asks for 3 (``resources.check: false``, as on a cluster
that autoscales from zero and never gets the node); Ray Train's start timeout is cut to 5 s for the test.
"""

import os
import subprocess
import sys
import time

import pytest
from studies import rows, write_study

pytestmark = pytest.mark.cluster

STUDY = {
    "name": "unstartable",
    "train": {"backbone": "vit_test_patch4_32", "epochs": 1, "batch_size": 64, "mlp_dim": 64, "dim": 32,
              "train_subset": 128, "knn_bank_subset": 128, "knn_eval_subset": 128, "monitor_every": 0},
    "resources": {"workers": 1, "cpus_per_worker": 3, "driver_cpus": 0.1, "check": False, "retries": 1},
    "search": {"space": {"base_lr": {"choice": [1.0e-4]}}, "sampler": "grid", "num_samples": 1, "seed": 0},
    "scheduler": {"type": "fifo"},
}


def test_a_worker_group_that_never_starts_fails_its_trial_after_the_retries(tmp_path):
    spec = write_study(tmp_path, STUDY)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "5"
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "study", "launch", str(spec.source)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    took = time.monotonic() - start
    (trial,) = rows(spec, "trials")
    assert trial["status"] == "failed", (out.stdout[-2000:], out.stderr[-2000:])
    assert "WorkerGroupStartupTimeoutError" in trial["error"] and "gave up after 2 attempts" in trial["error"]
    assert "\n" not in trial["error"].split(" (full log:")[0]
    assert took < 300, took  # two 5 s start timeouts and the study's own start and end, not a retry loop
