"""Helpers for the tests that run real studies: a study file written to a temporary root, a local Ray, and the
stopping studies that several modules read (run once per session by ``conftest.stopping_studies``)."""

from collections.abc import Iterator
from contextlib import contextmanager
from math import prod
from pathlib import Path

import ray
import yaml

from study import cluster, results, runner
from study.spec import StudySpec, load_spec

ROOT = Path(__file__).resolve().parents[1]


def write_study(root: Path, study: dict, data_dir: Path | None = None) -> StudySpec:
    """``study`` (a study-file mapping with a name) as ``root/<name>.yaml``, results under ``root/runs`` and FFCV
    files in ``data_dir`` (default ``root/data``), loaded and validated."""
    path = root / f"{study['name']}.yaml"
    path.write_text(yaml.safe_dump({**study, "storage": str(root / "runs"),
                                    "data_dir": str(data_dir or root / "data")}))
    return load_spec(path)


def rows(spec: StudySpec, table: str) -> list[dict]:
    """The study's ``table`` (trials, epochs, events) as it stands, parts included: [] before its first write."""
    try:
        return results.open(spec.study_dir).table(table).to_pylist()
    except FileNotFoundError:
        return []


HEALTHY, DIVERGING = 1.5e-4, 1.0e4  # base_lr: AdamW makes the loss non-finite within a few steps at 1e4
STOPPING_TRAIN = {"backbone": "vit_test_patch4_32", "epochs": 2, "batch_size": 64, "mlp_dim": 64, "dim": 32,
                  "warmup_epochs": 0.0, "train_subset": 512, "knn_bank_subset": 256, "knn_eval_subset": 256,
                  "monitor_every": 4, "monitor_bank": 128}  # <= 4 monitor points an epoch: never "> 3 dips"


def stopping_study(root: Path, name: str, space: dict, mode: str) -> StudySpec:
    """A grid over ``space`` (name -> choices) of 2-worker 2-epoch trials, FIFO, stopping in ``mode``."""
    return write_study(root, {
        "name": name, "train": STOPPING_TRAIN,
        "resources": {"workers": 2, "cpus_per_worker": 0.45, "driver_cpus": 0.1},
        "search": {"space": {k: {"choice": v} for k, v in space.items()}, "sampler": "grid",
                   "num_samples": prod(len(v) for v in space.values()), "max_concurrent": 2},
        "scheduler": {"type": "fifo"},
        "stopping": {"mode": mode},
    }, data_dir=ROOT / "datasets")


LR_RANGE = (1.0e-5, 1.0e-2)  # three decades: the report's scatter needs its log axis to tell the trials apart


def lr_study(root: Path) -> StudySpec:
    """The bundled study's shape at test size: base_lr searched on a log range, 2 one-epoch 1-worker trials at
    once, its Optuna study in a journal file (the stopping studies keep the SQLite default)."""
    return write_study(root, {
        "name": "lr-range",
        "train": {**STOPPING_TRAIN, "epochs": 1, "train_subset": 256, "knn_bank_subset": 128,
                  "knn_eval_subset": 128, "monitor_every": 2},
        "resources": {"workers": 1, "cpus_per_worker": 0.9, "driver_cpus": 0.1},
        "search": {"space": {"base_lr": {"log": list(LR_RANGE)}}, "num_samples": 2, "max_concurrent": 2,
                   "seed": 0, "storage": "journal"},
        "scheduler": {"type": "fifo"},
    }, data_dir=ROOT / "datasets")


@contextmanager
def local_ray() -> Iterator[None]:
    """A 2-CPU local Ray for the block, shut down at its end."""
    cluster.start_ray(None, num_cpus=2, object_store_memory=256 * 2**20)
    try:
        yield
    finally:
        ray.shutdown()


def run_studies(*specs: StudySpec) -> None:
    """Run each study to the end on a 2-CPU local Ray, shut down afterwards."""
    with local_ray():
        for spec in specs:
            runner.run_study(spec)
