"""A study across two Ray nodes on this machine (a head and a second node joined with `ray start --address`, 1
CPU each, token authentication on), whose second node is lost mid-study (its raylet killed): the trials ran on
both nodes, the one that lost its worker restarted on the head from its checkpoint, and the results,
checkpoints and Optuna study are complete. Then `ssl-study evaluate --address` runs the best trial's kNN
evaluation as a task on the cluster. The storage is a local path: shared, since both nodes are this
machine.

3 trials, 2 at a time (one per node), 1 worker each, 3 epochs of 256 images of a tiny MoCo v3 (vit_test, 32 px).
"""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import optuna
import pytest
import requests
from servers import alive_nodes, pids_naming, ray_head, ray_worker_node
from studies import rows, write_study

pytestmark = pytest.mark.cluster

STUDY = {
    "name": "nodes",
    "train": {"backbone": "vit_test_patch4_32", "epochs": 3, "batch_size": 64, "mlp_dim": 64, "dim": 32,
              "warmup_epochs": 0.5, "train_subset": 256, "knn_bank_subset": 128, "knn_eval_subset": 128,
              "monitor_every": 0, "export": True},
    # After the node is lost, a retried trial's driver and a new one's both wait on the head: 2 x 0.05 beside
    # one 0.9 worker fit its 1 CPU (2 x 0.1 would not, and neither worker could start).
    "resources": {"workers": 1, "cpus_per_worker": 0.9, "driver_cpus": 0.05},
    "search": {"space": {"base_lr": {"choice": [1.0e-4, 2.0e-4, 4.0e-4]}}, "sampler": "grid", "num_samples": 3,
               "max_concurrent": 2, "seed": 0},
    "scheduler": {"type": "fifo"},
}


def train_workers(head) -> list[dict]:
    """Every Ray Train worker actor the cluster has had (alive or dead), from the head's State API."""
    answer = requests.get(f"{head.address}/api/v0/actors?detail=1&limit=10000", timeout=10,
                          headers={"Authorization": f"Bearer {head.token_file.read_text()}"})
    answer.raise_for_status()
    return [a for a in answer.json()["data"]["result"]["result"] if a["class_name"] == "RayTrainWorker"]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    root = tmp_path_factory.mktemp("nodes")
    spec = write_study(root, STUDY)
    with ray_head(num_cpus=1) as head, ray_worker_node(head, num_cpus=1) as second:
        second_id = next(n["node_id"] for n in alive_nodes(head) if not n["is_head_node"])
        killed = {}

        def kill_second_node_mid_trial():  # once a worker there has reported an epoch
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and not killed:
                with_epochs = {e["trial_id"] for e in rows(spec, "epochs")}
                with contextlib.suppress(requests.RequestException):
                    there = [a for a in train_workers(head) if a["node_id"] == second_id and a["state"] == "ALIVE"]
                    if there and with_epochs:
                        for pid in pids_naming(f"--node_manager_port={second.node_manager_port}"):
                            os.kill(pid, signal.SIGKILL)
                        killed["epochs"] = {t: len([e for e in rows(spec, "epochs") if e["trial_id"] == t])
                                            for t in with_epochs}
                time.sleep(0.5)

        killer = threading.Thread(target=kill_second_node_mid_trial, daemon=True)
        killer.start()
        # The study's driver in its own process, as `ssl-study launch --address` on the head would run.
        done = subprocess.run([sys.executable, "-m", "study", "launch", spec.source, "--address", head.gcs],
                              cwd=root, env=head.env, capture_output=True, text=True, timeout=900)
        code = (done.returncode, done.stdout[-3000:] + done.stderr[-3000:])
        killer.join(timeout=5)
        workers = train_workers(head)
        evaluated = subprocess.run([sys.executable, "-m", "study", "evaluate", str(spec.study_dir), "--top", "1",
                                    "--protocol", "knn", "--train-subset", "128", "--address", head.gcs],
                                   cwd=root, env=head.env, capture_output=True, text=True, timeout=600)
        code = {"launch": code, "evaluate": (evaluated.returncode, evaluated.stdout[-3000:] + evaluated.stderr[-3000:])}
        tasks = [t for t in cluster_tasks(head) if t["name"].startswith("evaluate ")]
    return spec, code, killed, workers, second_id, tasks


def cluster_tasks(head) -> list[dict]:
    """Every task the cluster has run, from the head's State API."""
    answer = requests.get(f"{head.address}/api/v0/tasks?detail=1&limit=10000", timeout=10,
                          headers={"Authorization": f"Bearer {head.token_file.read_text()}"})
    answer.raise_for_status()
    return answer.json()["data"]["result"]["result"]


def test_the_study_ends_well_after_losing_a_node(two_nodes):
    _, code, killed, _, _, _ = two_nodes
    assert killed, "the second node was never killed"
    assert code["launch"][0] == 0, code["launch"][1]


def test_trials_ran_on_both_nodes_and_one_restarted_on_the_head(two_nodes):
    _, _, _, workers, second_id, _ = two_nodes
    nodes = {w["node_id"] for w in workers}
    assert second_id in nodes and len(nodes) == 2, workers
    assert len(workers) >= 4  # 3 trials, one of them again after its node was lost


def test_results_checkpoints_and_optuna_are_complete(two_nodes):
    spec, _, _, _, _, _ = two_nodes
    trials = rows(spec, "trials")
    assert len(trials) == 3 and all((t["status"], t["epochs_done"]) == ("completed", 3) for t in trials), trials
    for t in trials:
        assert sorted(e["epoch"] for e in rows(spec, "epochs") if e["trial_id"] == t["trial_id"]) == [1, 2, 3]
        assert (spec.study_dir / "train" / t["trial_id"]).is_dir() and t["checkpoint"]
    study = optuna.load_study(study_name=spec.name, storage=spec.optuna_url)
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE"] * 3


def test_evaluate_runs_on_the_cluster(two_nodes):
    spec, code, _, _, _, tasks = two_nodes
    assert code["evaluate"][0] == 0, code["evaluate"][1]
    [best] = sorted(rows(spec, "trials"), key=lambda t: -t["knn_top1"])[:1]
    evaluations = rows(spec, "evaluations")
    assert sorted((e["trial_id"], e["protocol"], e["k"]) for e in evaluations) == \
        [(best["trial_id"], "knn", 20), (best["trial_id"], "knn", 200)], evaluations
    assert all(0.1 < e["top1"] <= 1 for e in evaluations), evaluations  # 10 classes: above chance
    assert [t["state"] for t in tasks] == ["FINISHED"], tasks  # one task, run by the cluster
