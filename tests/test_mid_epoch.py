"""Checkpoints inside an epoch (``train.checkpoint_minutes``) survive a real kill: a Train worker killed with
kill -9 after a mid-epoch checkpoint of its second epoch; the restarted worker group resumes from it, the loader
starts at the next batch, every step is trained once and the epoch's metrics equal an uninterrupted run's.

Real local Ray, real FFCV files, 1 worker (so the two runs are bit-for-bit comparable), 2 epochs of 128 steps
(about 10 s each on an idle 2-core machine) with a checkpoint every 1.2 s: from 1.2 s into the second epoch to its
end there is always one mid-epoch checkpoint to kill after.
"""

import math
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from servers import pids_naming
from studies import rows, write_study

pytestmark = pytest.mark.cluster

TRAIN = {"backbone": "vit_test_patch4_32", "epochs": 2, "batch_size": 32, "mlp_dim": 64, "dim": 32,
         "warmup_epochs": 0.5, "train_subset": 4096, "knn_bank_subset": 256, "knn_eval_subset": 256,
         "monitor_every": 4, "monitor_bank": 256, "trace": True, "export": False, "checkpoint_minutes": 0.02}
STEPS = 128  # per epoch


def study(name: str) -> dict:
    return {"name": name, "train": TRAIN,
            "resources": {"workers": 1, "cpus_per_worker": 1, "driver_cpus": 0.1},
            "search": {"space": {"base_lr": {"choice": [1.0e-3]}}, "sampler": "grid", "num_samples": 1, "seed": 0},
            "scheduler": {"type": "fifo"}}


def launch(spec, kill_after_step: int | None = None) -> tuple[int, list[tuple[int, float]]]:
    """Run the study; with ``kill_after_step``, kill -9 the Train worker once a mid-epoch checkpoint past that
    step exists. Returns the exit code and the kills (checkpoint step, seconds since that checkpoint)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen([sys.executable, "-m", "study", "launch", str(spec.source)],
                              cwd=os.path.dirname(spec.source), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    kills, deadline = [], time.monotonic() + 600
    try:
        while driver.poll() is None and time.monotonic() < deadline:
            if kill_after_step is not None and not kills:
                mid = [p for p in spec.study_dir.glob("train/*/mid_epoch/step-*") if p.name[5:].isdigit()]
                steps = [(int(p.name[5:]), p) for p in mid if int(p.name[5:]) > kill_after_step]
                workers = pids_naming("ray::RayTrainWorker")
                if steps and workers:
                    step, path = max(steps)
                    try:
                        since = time.time() - path.stat().st_mtime
                    except FileNotFoundError:  # superseded by the next one (or the epoch's) since the listing
                        continue
                    os.kill(workers[-1], signal.SIGKILL)
                    kills.append((step, since))
            time.sleep(0.05)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            pytest.fail(f"the study did not end within 10 minutes; kills so far: {kills}")
    return driver.returncode, kills


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mid_epoch")
    whole, killed = write_study(root, study("whole")), write_study(root, study("killed"))
    assert launch(whole)[0] == 0
    assert [t["status"] for t in rows(whole, "trials")] == ["completed"]
    code, kills = launch(killed, kill_after_step=STEPS + 4)  # inside the second epoch
    return whole, killed, code, kills


def test_the_worker_was_killed_after_a_mid_epoch_checkpoint_and_the_study_ended_well(runs):
    _, killed, code, kills = runs
    assert code == 0 and len(kills) == 1, kills
    step, since = kills[0]
    assert STEPS < step < 2 * STEPS and since < 60 * TRAIN["checkpoint_minutes"] + 5, kills
    (trial,) = rows(killed, "trials")
    assert (trial["status"], trial["epochs_done"]) == ("completed", 2), trial
    assert "a process was lost" in (killed.study_dir / "logs" / f"{trial['trial_id']}.log").read_text()


def test_every_step_trained_once_and_the_epochs_equal_an_uninterrupted_runs(runs):
    whole, killed, _, _ = runs
    traces = []
    for spec in (whole, killed):
        (trial,) = rows(spec, "trials")
        traces.append(pq.read_table(os.path.join(trial["checkpoint"], "trace.parquet")).to_pylist())
    assert [r["step"] for r in traces[1]] == list(range(2 * STEPS))  # none redone twice, none lost
    assert traces[1] == traces[0] or all(  # the same gradient norms, step by step
        a["step"] == b["step"] and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)
        for a, b in zip(traces[0], traces[1], strict=True))
    epochs = [sorted(rows(spec, "epochs"), key=lambda r: r["epoch"]) for spec in (whole, killed)]
    assert [r["epoch"] for r in epochs[1]] == [1, 2]
    for a, b in zip(*epochs, strict=True):
        for key in ("loss", "lr", "moco_m", "knn_top1", "knn_top1_k200", "dense_knn_last", "dense_knn_min",
                    "spike_count", "knn_dip_count", "worst_knn_dip"):
            assert a[key] == b[key] or (math.isnan(a[key]) and math.isnan(b[key])), (key, a[key], b[key])
