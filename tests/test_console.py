"""What `ssl-study launch` shows on the terminal: by default only its own lines (where the logs are, a progress
line per change, one line per failed trial, the final table), Ray's output in ``<study>/logs/ray.log``; with
``--verbose``, Ray's output on the terminal as before.

Real studies through the real command in a subprocess: 32 px, vit_test, 1 epoch of 256 images. A trial fails in
its worker, not in validation, with ``resume_from`` naming a checkpoint that does not exist.
"""

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from studies import write_study

from study.progress import ProgressLine

ROOT = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent/checkpoint"
STUDY = {
    "name": "console",
    "dataset": "fashion_mnist",
    "train": {"backbone": "vit_test_patch4_32", "epochs": 1, "batch_size": 64, "mlp_dim": 64, "dim": 32,
              "warmup_epochs": 0.5, "train_subset": 256, "knn_bank_subset": 256, "knn_eval_subset": 128,
              "monitor_every": 2, "monitor_bank": 128},
    "resources": {"workers": 1, "cpus_per_worker": 0.9, "driver_cpus": 0.1},
    "search": {"space": {"resume_from": {"choice": ["", MISSING]}}, "sampler": "grid", "num_samples": 2,
               "max_concurrent": 2, "seed": 0},
    "scheduler": {"type": "fifo"},
}
# What Ray, Tune and Optuna print on their own; none of it may reach the terminal by default.
RAY_MARKERS = ("pid=", "placement group", "TensorBoard", "Trial status", "ray.tune", "INFO worker.py",
               "Token authentication", "Configuration for experiment", "View detailed results", "Traceback",
               "A new study created", "TrainController", "\x1b[")
PROGRESS = re.compile(r"\[\s*\d+m\d\ds\] (console|verbose): .+ of [12]( \| best knn_top1 \S+ \([0-9a-f]{8}\))? "
                      r"\| eta (\?|\d+m\d\ds)")
FAILED = re.compile(r"trial ([0-9a-f]{8}) failed: FileNotFoundError: .*nonexistent/checkpoint.* \(full log: (\S+)\)")


def launch(tmp_path: Path, study: dict, *flags: str) -> tuple[object, subprocess.CompletedProcess]:
    spec = write_study(tmp_path, study, data_dir=ROOT / "datasets")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of its own
    done = subprocess.run([str(Path(sys.executable).with_name("ssl-study")), "launch", str(spec.source), *flags],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return spec, done


@pytest.fixture(scope="module")
def quiet(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("console"), STUDY)


def test_the_terminal_shows_only_ssl_studys_lines(quiet):
    spec, done = quiet
    for marker in RAY_MARKERS:
        assert marker not in done.stdout + done.stderr, marker
    lines = done.stdout.splitlines()
    log = spec.study_dir / "logs" / "ray.log"
    assert lines[0].startswith(f"logs: {log} (") and "Ray's session logs: /" in lines[0]
    table = lines.index("") + 1  # the progress lines, then a blank line and the final table
    progress = lines[1:table - 1]
    assert progress and all(PROGRESS.fullmatch(line) for line in progress), progress
    assert progress[0].endswith("eta ?") and re.search(r"eta \d+m\d\ds$", progress[-1])
    assert re.search(r": (1 completed, 1 failed|1 failed, 1 completed) of 2 \| best knn_top1", progress[-1])
    assert lines[table].split()[:3] == ["trial_id", "status", "resume_from"]
    assert sorted(line.split()[1] for line in lines[table + 1:table + 3]) == ["completed", "failed"]
    assert lines[table + 3:] == ["", f"Parquet results: {spec.study_dir / 'results'} (trials, epochs, events)",
                                 f"Optuna storage:  {spec.optuna_url}"]


def test_ray_and_the_workers_write_to_the_study_log(quiet):
    spec, _ = quiet
    text = (spec.study_dir / "logs" / "ray.log").read_text()
    assert "View detailed results" in text
    assert "FileNotFoundError" in text  # the worker's own traceback
    assert "\n(RayTrainWorker pid=" in text  # the workers' lines without colour codes (a file is no terminal)


def test_a_failed_trial_is_one_line_naming_its_log(quiet):
    spec, done = quiet
    [line] = done.stderr.splitlines()
    trial_id, log = FAILED.fullmatch(line).groups()
    assert Path(log) == spec.study_dir / "logs" / f"{trial_id}.log"
    text = Path(log).read_text()
    assert "FileNotFoundError" in text and str(spec.study_dir / "logs" / "ray.log") in text
    assert any(row.split()[:2] == [trial_id, "failed"] for row in done.stdout.splitlines())


def test_verbose_shows_rays_output_again(tmp_path):
    study = {**STUDY, "name": "verbose", "search": {**STUDY["search"], "space": {"resume_from": {"choice": [MISSING]}},
                                                    "num_samples": 1, "max_concurrent": 1}}
    spec, done = launch(tmp_path, study, "--verbose")
    out = done.stdout + done.stderr
    assert "(RayTrainWorker pid=" in out and "Traceback" in out
    assert any(FAILED.fullmatch(line) for line in done.stderr.splitlines())  # the one line as well
    assert any(PROGRESS.fullmatch(line) for line in done.stdout.splitlines())
    assert not (spec.study_dir / "logs" / "ray.log").exists()


def test_the_estimate_is_the_mean_epoch_time_times_the_epochs_left_over_the_concurrency(tmp_path, capsys):
    spec = write_study(tmp_path, {**STUDY, "train": {**STUDY["train"], "epochs": 4},
                                  "search": {**STUDY["search"], "num_samples": 3}}, data_dir=ROOT / "datasets")
    line = ProgressLine(spec, concurrency=2)
    a, b = SimpleNamespace(trial_id="a"), SimpleNamespace(trial_id="b")
    line.on_trial_start(0, [], a)
    line.on_trial_start(0, [], b)
    line.on_trial_result(0, [], a, {"epoch": 1, "time_total_s": 30.0, "knn_top1": 0.5})
    line.on_trial_result(0, [], b, {"epoch": 2, "time_total_s": 60.0, "knn_top1": 0.4})
    first, *_, last = capsys.readouterr().out.splitlines()
    assert first.endswith("eta ?")
    # 30 s per epoch; 3 + 2 epochs left of the running trials and 4 of the one not started, 2 at a time
    assert last.endswith("best knn_top1 0.5 (a) | eta 2m15s")
