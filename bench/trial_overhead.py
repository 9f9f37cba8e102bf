"""What a trial costs besides its training: a real study of tiny one-epoch trials, one at a time, on a local Ray,
and the time of each trial outside its epochs, with this project's local-Ray settings against Ray's defaults.
Not a test: run it by hand.

    .venv/bin/python bench/trial_overhead.py               # 3 trials each way, then the worker's start-up parts
    .venv/bin/python bench/trial_overhead.py --trials 2 --only ours

Per trial: ``wall`` is Tune's trial start to its completion (seen by a Tune callback on the driver), ``epochs``
the worker's own epoch times (training and the epoch's kNN, from epochs.parquet), and ``overhead`` the rest:
Tune's trial actor, Ray Train's controller and worker group, the worker's imports, FFCV's loaders and their
numba compilation, the at-init kNN, the checkpoint and the shut-down. The baseline is the same study with Ray
Train's defaults for the settings ``study.cluster.LOCAL_ENV`` changes. The start-up parts are then timed in
one fresh process (imports, loaders, the first batch of each loader).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray
import yaml
from ray.tune import Callback

import trainers  # noqa: F401  (torchvision shim)
from study import cluster, runner
from study.results.writer import ResultsWriter
from study.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
STUDY = {
    "dataset": "fashion_mnist", "data_dir": str(ROOT / "datasets"),
    "train": {"backbone": "vit_test_patch4_32", "epochs": 1, "batch_size": 64, "mlp_dim": 64, "dim": 32,
              "warmup_epochs": 0.5, "train_subset": 256, "knn_bank_subset": 256, "knn_eval_subset": 128},
    "resources": {"workers": 1, "cpus_per_worker": 1, "driver_cpus": 0.1},
    "search": {"space": {"base_lr": {"log": [1.0e-4, 1.0e-3]}}, "max_concurrent": 1, "seed": 0},
    "scheduler": {"type": "fifo"},
}
RAY_DEFAULTS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}
STARTUP = r"""
import time; t0 = time.perf_counter(); last = t0
def lap(name):
    global last; now = time.perf_counter(); print(f"{name}\t{now - last:.2f}"); last = now
import trainers, torch, timm; lap("import torch, timm")
import ray.train.torch; lap("import ray.train")
import data, ffcv; lap("import ffcv (through data/ffcv_import.py)")
from trainers.config import TrainConfig
from trainers.build import build_trainer
from trainers.trainer import ffcv_loaders
cfg = TrainConfig(**{**TRAIN, "train_path": DATA + "/fashion_mnist_train.beton",
                     "test_path": DATA + "/fashion_mnist_test.beton"})
loaders = ffcv_loaders(cfg, torch.device("cpu")); lap("build the loaders")
trainer = build_trainer(cfg, "cpu", loaders=loaders); lap("build the model")
next(iter(loaders.train)); lap("first two-view batch (numba compile)")
next(iter(loaders.bank)); next(iter(loaders.test)); lap("first kNN batches (numba compile)")
"""


class Clock(Callback):
    """Tune's trial start and completion times on the driver."""

    def __init__(self) -> None:
        self.start: dict[str, float] = {}
        self.end: dict[str, float] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.start[trial.trial_id] = time.monotonic()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.end[trial.trial_id] = time.monotonic()


def run(name: str, trials: int, env: dict[str, str], root: Path) -> list[tuple[float, float]]:
    """(wall, epochs) per trial of a fresh study under ``root``, on a local Ray whose workers get ``env``."""
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**STUDY, "name": name, "storage": str(root / "runs"),
                                    "search": {**STUDY["search"], "num_samples": trials}}))
    spec = load_spec(path)
    saved = dict(cluster.LOCAL_ENV)
    cluster.LOCAL_ENV.update(env)
    clock = Clock()
    try:
        cluster.start_ray(None, num_cpus=2, object_store_memory=256 * 2**20)
        runner.build_tuner(spec, runner.prepare_data(spec), callbacks=[ResultsWriter(spec), clock]).fit()
    finally:
        ray.shutdown()
        cluster.LOCAL_ENV.clear()
        cluster.LOCAL_ENV.update(saved)
    epochs = pq.read_table(spec.study_dir / "results" / "epochs.parquet").to_pylist()
    return [(clock.end[t] - clock.start[t], sum(e["epoch_time_s"] for e in epochs if e["trial_id"] == t))
            for t in clock.end]


def report(name: str, rows: list[tuple[float, float]]) -> float:
    overheads = [wall - inside for wall, inside in rows]
    print(f"{name:>12}: " + "  ".join(f"wall {w:5.1f} s, epochs {e:4.1f} s" for w, e in rows))
    median = statistics.median(overheads)
    print(f"{'':>12}  overhead per trial: median {median:.1f} s (each: {', '.join(f'{o:.1f}' for o in overheads)})")
    return median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--only", choices=("ours", "defaults"), help="measure one side only")
    args = ap.parse_args()
    medians = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, env in (("ours", {}), ("defaults", RAY_DEFAULTS)):
            if args.only in (None, name):
                medians[name] = report(name, run(name, args.trials, env, Path(tmp)))
    if len(medians) == 2:
        print(f"Ray's defaults / ours: {medians['defaults'] / medians['ours']:.2f}x the overhead per trial")
    print("\nThe worker's start-up, in one fresh process:")
    code = f"TRAIN = {STUDY['train']!r}\nDATA = {STUDY['data_dir']!r}\n{STARTUP}"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        part, seconds = line.split("\t")
        print(f"  {part:<40} {float(seconds):5.2f} s")


if __name__ == "__main__":
    main()
