"""Lost processes survived, on a real local Ray with real kills (kill -9): a Train worker of the first trial
killed after its first epoch, then the trial driver (Tune's function actor) of the second. Both trials restart
from their latest checkpoint (one every epoch by default) and complete; the epochs table has every epoch once.

2 trials one after the other, 2 workers each, 4 epochs of 256 images of a tiny MoCo v3 (vit_test, 32 px).
"""

import os
import signal
import subprocess
import sys
import time

import pytest
from servers import pids_naming
from studies import rows, write_study

pytestmark = pytest.mark.cluster

STUDY = {
    "name": "faults",
    "train": {"backbone": "vit_test_patch4_32", "epochs": 4, "batch_size": 64, "mlp_dim": 64, "dim": 32,
              "warmup_epochs": 0.5, "train_subset": 256, "knn_bank_subset": 128, "knn_eval_subset": 128,
              "monitor_every": 0},
    "resources": {"workers": 2, "cpus_per_worker": 0.45, "driver_cpus": 0.1},
    "search": {"space": {"base_lr": {"choice": [1.0e-4, 2.0e-4]}}, "sampler": "grid", "num_samples": 2,
               "max_concurrent": 1, "seed": 0},
    "scheduler": {"type": "fifo"},
}


@pytest.fixture(scope="module")
def survived(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    spec = write_study(root, STUDY)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of its own
    driver = subprocess.Popen([sys.executable, "-m", "study", "launch", str(spec.source)], cwd=root, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    kills = []  # (what, trial_id, epochs done when killed)
    deadline = time.monotonic() + 900
    try:
        while driver.poll() is None and time.monotonic() < deadline:
            epochs = rows(spec, "epochs")
            trials = list(dict.fromkeys(e["trial_id"] for e in epochs))  # in the order they reported
            done = {t: max(e["epoch"] for e in epochs if e["trial_id"] == t) for t in trials}
            # Kill once a trial's first epochs are in the table (the writer flushes every few seconds) and some
            # are still to come.
            if not kills and trials and done[trials[0]] < 4 and pids_naming("ray::RayTrainWorker"):
                os.kill(pids_naming("ray::RayTrainWorker")[-1], signal.SIGKILL)
                kills.append(("worker", trials[0], done[trials[0]]))
            elif len(kills) == 1 and len(trials) == 2 and done[trials[1]] < 4 and pids_naming("ray::ImplicitFunc"):
                os.kill(pids_naming("ray::ImplicitFunc")[0], signal.SIGKILL)
                kills.append(("trial driver", trials[1], done[trials[1]]))
            time.sleep(0.2)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            pytest.fail(f"the study did not end within 15 minutes; kills so far: {kills}")
    return spec, driver.returncode, kills


def test_both_kills_happened_and_the_study_ended_well(survived):
    _, returncode, kills = survived
    assert [k[0] for k in kills] == ["worker", "trial driver"], kills
    assert returncode == 0


def test_every_trial_completes_with_every_epoch_once(survived):
    spec, _, kills = survived
    trials = {t["trial_id"]: t for t in rows(spec, "trials")}
    assert {k[1] for k in kills} == set(trials)
    for trial_id, row in trials.items():
        assert (row["status"], row["epochs_done"]) == ("completed", 4), row
        epochs = sorted(e["epoch"] for e in rows(spec, "epochs") if e["trial_id"] == trial_id)
        assert epochs == [1, 2, 3, 4], (trial_id, epochs)


def test_the_lost_worker_restarted_the_worker_group_and_the_lost_driver_the_trial(survived):
    spec, _, kills = survived
    (_, worker_trial, _), (_, driver_trial, _) = kills
    log = (spec.study_dir / "logs" / f"{worker_trial}.log").read_text()
    assert "a process was lost" in log and "restart 1 of 3 from the latest checkpoint" in log, log
    assert "failed" not in log  # it did not end as a failure
    # Tune retried the killed driver's trial once: its experiment state counts the failure.
    state = "\n".join(p.read_text() for p in (spec.study_dir / "tune").glob("experiment_state-*.json"))
    assert driver_trial in state and '\\"num_failures\\": 1' in state.replace(" ", " "), driver_trial
