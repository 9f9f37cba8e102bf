"""A study's life on a real local Ray: launched from the CLI in its own process, the driver killed mid-study,
resumed, extended with more trials, then inspected with status / best / results.

4 trials, 2 at a time, of a tiny MoCo v3 (vit_test, 2 epochs of 256 images, a checkpoint every epoch).
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import ray
from studies import write_study

from study import cluster, results
from study.cli import main

pytestmark = pytest.mark.cluster

STUDY = {
    "name": "life",
    "train": {"backbone": "vit_test_patch4_32", "epochs": 2, "batch_size": 64, "mlp_dim": 64, "dim": 32,
              "warmup_epochs": 0.5, "train_subset": 256, "knn_bank_subset": 256, "knn_eval_subset": 128,
              "checkpoint_every": 1, "monitor_every": 2, "monitor_bank": 128},
    "resources": {"workers": 1, "cpus_per_worker": 0.9, "driver_cpus": 0.1},
    "search": {"space": {"base_lr": {"log": [1.0e-4, 1.0e-3]}}, "num_samples": 4, "max_concurrent": 2, "seed": 1},
    "scheduler": {"type": "fifo"},
}


def trials_table(spec):
    try:  # read as the CLI reads it: pq.read_table(path) can catch the file being replaced (it opens it twice)
        return results.open(spec.study_dir).table().to_pylist()
    except FileNotFoundError:
        return []


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory):
    root = tmp_path_factory.mktemp("life")
    spec = write_study(root, STUDY)
    path = spec.source
    # The driver in its own process group, so that killing it takes its local Ray down too, as a crash would.
    driver = subprocess.Popen([sys.executable, "-m", "study", "launch", str(path)], cwd=root,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # kill once a trial has ended and another is half way
        rows = trials_table(spec)
        if any(r["status"] == "completed" for r in rows) and any(
                r["status"] == "running" and r["epochs_done"] >= 1 for r in rows):
            break
        assert driver.poll() is None, "the study ended before the driver could be killed"
        time.sleep(0.5)
    else:
        pytest.fail("no trial finished within 10 minutes")
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    before = {r["trial_id"]: r for r in trials_table(spec)}
    before_epochs = {t: [e["loss"] for e in sorted(results.open(spec.study_dir).table("epochs")
                                                     .to_pylist(), key=lambda e: e["epoch"]) if e["trial_id"] == t]
                     for t, r in before.items() if r["status"] == "completed"}
    train_files = {t: sorted(p.name for p in (spec.study_dir / "train" / t).rglob("*")) for t, r in before.items()
                   if r["status"] == "completed"}
    time.sleep(2)  # let the killed session's processes go

    cluster.start_ray(None, num_cpus=2, object_store_memory=256 * 2**20)
    try:
        assert main(["resume", "life", "--storage", str(root / "runs")]) == 0
        resumed = trials_table(spec)
        assert main(["extend", str(spec.study_dir), "--trials", "2"]) == 0
    finally:
        ray.shutdown()
    return spec, before_epochs, train_files, resumed, trials_table(spec), root


def test_resume_finishes_the_study_without_rerunning_finished_trials(lifecycle):
    spec, before_epochs, train_files, resumed, _, _ = lifecycle
    assert len(resumed) == 4 and all(r["status"] == "completed" for r in resumed), resumed
    epochs = results.open(spec.study_dir).table("epochs").to_pylist()
    for trial_id, files in train_files.items():  # the finished trials did not train again
        # Tune saves its experiment state every 10 s or so: a trial that ended just before the kill may be
        # started again, but it finds its final checkpoint, trains nothing and only reports its last epoch again.
        assert {p.name for p in (spec.study_dir / "train" / trial_id).glob("checkpoint_*")} <= set(files)
        rows = sorted((e for e in epochs if e["trial_id"] == trial_id), key=lambda e: e["epoch"])
        assert [r["loss"] for r in rows] == before_epochs[trial_id]
    for r in resumed:  # nothing reported was lost, nothing counted twice
        assert sorted(e["epoch"] for e in epochs if e["trial_id"] == r["trial_id"]) == [1, 2]


def test_extend_adds_trials_and_the_sampler_sees_the_old_ones(lifecycle):
    spec, _, _, resumed, final, _ = lifecycle
    assert len(final) == 6 and {r["trial_id"] for r in resumed} < {r["trial_id"] for r in final}
    study = optuna.load_study(study_name="life", storage=f"sqlite:///{spec.study_dir / 'optuna.db'}")
    # A trial Optuna handed out just before the kill, which no Tune trial got, is closed as FAIL on resume.
    by_state = {s: [t for t in study.trials if t.state == s] for s in optuna.trial.TrialState}
    assert not by_state[optuna.trial.TrialState.RUNNING] and len(study.trials) - len(by_state[
        optuna.trial.TrialState.FAIL]) == 6
    complete = by_state[optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 6 and all(math.isfinite(t.value) for t in complete)
    # the added trials continue the same study: Optuna numbered them after every earlier one
    old = {round(r["base_lr"], 12) for r in resumed}
    assert len({round(r["base_lr"], 12) for r in final} - old) == 2  # new draws, not a replay of the first ones
    numbers = {round(t.params["base_lr"], 12): t.number for t in complete}
    assert min(n for lr, n in numbers.items() if lr not in old) > max(n for lr, n in numbers.items() if lr in old)
    # results and Optuna agree on every trial
    assert sorted(round(t.params["base_lr"], 12) for t in complete) == sorted(round(r["base_lr"], 12) for r in final)
    by_lr = {round(r["base_lr"], 12): r for r in final}
    for t in complete:
        assert t.value == pytest.approx(by_lr[round(t.params["base_lr"], 12)]["knn_top1"])


def test_status_best_and_results_commands(lifecycle, capsys):
    _, _, _, _, final, root = lifecycle
    storage = str(root / "runs")
    assert main(["status", "life", "--storage", storage]) == 0
    assert "6 completed" in capsys.readouterr().out
    assert main(["best", "life", "--storage", storage]) == 0
    best = json.loads(capsys.readouterr().out)
    assert best["metrics"]["knn_top1"] == max(r["knn_top1"] for r in final)
    assert best["backbone"] and best["backbone"].endswith("backbone.safetensors")
    assert best["config"]["base_lr"] == best["params"]["base_lr"]  # the trial's config: its searched values
    assert main(["results", "life", "--storage", storage, "--where", "knn_top1 > 0 and status == 'completed'",
                 "--sort=-knn_top1", "--columns", "trial_id", "knn_top1", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["knn_top1"] for r in rows] == sorted((r["knn_top1"] for r in final), reverse=True)
    assert main(["results", "life", "--storage", storage, "--where", "nope > 1"]) == 2
    assert "unknown column 'nope'" in capsys.readouterr().err


def test_launching_an_existing_study_again_is_refused(lifecycle, capsys):
    spec, *_ = lifecycle
    assert main(["launch", spec.source]) == 2
    assert "already exists" in capsys.readouterr().err
