"""Helpers for the tests that run real studies: a study file written to a temporary root, and a local Ray."""

from pathlib import Path

import ray
import yaml

from study import cluster, results, runner
from study.spec import StudySpec, load_spec


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
        return results.read_table(spec.study_dir, table).to_pylist()
    except FileNotFoundError:
        return []


def run_studies(*specs: StudySpec) -> None:
    """Run each study to the end on a 2-CPU local Ray, shut down afterwards."""
    cluster.start_ray(None, num_cpus=2, object_store_memory=256 * 2**20)
    try:
        for spec in specs:
            runner.run_study(spec)
    finally:
        ray.shutdown()
