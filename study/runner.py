"""Run a study: Ray Tune + Optuna over trials, each trial a Ray Train TorchTrainer (Train V2 pattern).

Layout under ``storage/name``: ``study.yaml`` (the resolved study, what ``resume`` / ``extend`` / ``status``
read), ``tune/`` (Tune's experiment; ``tune-2/``, ... for each ``extend``), ``train/<trial_id>/`` (each trial's
Train run and checkpoints, named by trial id so a restarted trial finds its own checkpoint), ``optuna.db`` (the
Optuna study, readable by optuna-dashboard, unless ``search.storage`` names another database) and
``results/*.parquet`` (study/results.py).
"""

from __future__ import annotations

import math
import os
import socket
from functools import partial
from pathlib import Path

import optuna
import pyarrow as pa
import ray
import yaml
from ray import tune
from ray.train import CheckpointConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from data.datasets import prepare
from search_spaces import define_by_run
from study import results
from study.progress import ProgressLine
from study.search import StudySearch, close_orphans, sampler
from study.spec import Resources, SpecError, StudySpec, load_spec, snapshot
from trainers.config import TrainConfig
from trainers.loop import train_loop_per_worker

SPEC_FILE = "study.yaml"
# Idle OpenMP threads of torch otherwise spin and starve FFCV's numba threads on small CPU workers.
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def prepare_data(spec: StudySpec) -> dict[str, str]:
    """Convert the study's dataset to FFCV files (a no-op when they are up to date)."""
    paths = prepare(spec.dataset, Path(spec.data_dir).resolve())
    return {"train_path": str(paths["train"]), "test_path": str(paths["test"])}


def run_trial(config: dict, *, base: dict, resources: Resources, train_dir: str) -> None:
    """Tune function trainable: drive one trial's TorchTrainer and relay its reports to Tune."""
    trial_id = tune.get_context().get_trial_id()
    options = {k: v for k, v in config.items() if k in TrainConfig.field_names()}  # not Optuna's "1-moco_m"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**base, **options},
        scaling_config=ScalingConfig(
            num_workers=resources.workers,
            use_gpu=resources.gpus_per_worker > 0,
            resources_per_worker={"CPU": resources.cpus_per_worker, "GPU": resources.gpus_per_worker},
        ),
        # The name is the trial id: a restarted trial reuses it and so restores its own latest checkpoint.
        run_config=RunConfig(name=trial_id, storage_path=train_dir, callbacks=[TuneReportCallback()],
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    trainer.fit()


# --------------------------------------------------------------------------------------------- the cluster


def local_nodes() -> list[dict[str, float]]:
    """What the local Ray that :func:`start_ray` starts will have, known without starting it."""
    import torch

    return [{"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]


def cluster_nodes() -> list[dict[str, float]]:
    return [n["Resources"] for n in ray.nodes() if n["Alive"]]


def check_fits(spec: StudySpec, nodes: list[dict[str, float]], where: str) -> None:
    """Refuse a trial the nodes can never hold: a worker larger than every node, or a trial larger than all."""
    res = spec.resources
    if not res.check:
        return
    src = spec.source
    for kind, per_worker in (("CPU", res.cpus_per_worker), ("GPU", res.gpus_per_worker)):
        largest = max((n.get(kind, 0.0) for n in nodes), default=0.0)
        total = sum(n.get(kind, 0.0) for n in nodes)
        need = res.per_trial()[kind]
        if per_worker > largest:
            raise SpecError(f"{src}: resources.{kind.lower()}s_per_worker: {per_worker:g} {kind} per worker, but the "
                            f"largest node of {where} has {largest:g}; accepted: at most {largest:g}")
        if need > total:
            driver = f" + {res.driver_cpus:g} driver" if kind == "CPU" else ""
            parts = f"{res.workers} workers x {per_worker:g}{driver}"
            raise SpecError(f"{src}: resources: a trial needs {need:g} {kind} ({parts}) but {where} has {total:g} "
                            f"in all; accepted: at most {total:g}; lower resources.workers or the per-worker request")


def concurrency(spec: StudySpec, nodes: list[dict[str, float]]) -> int:
    """``search.max_concurrent``, or as many trials as the cluster holds at once (at least 1)."""
    if spec.search.max_concurrent is not None:
        return spec.search.max_concurrent
    need = spec.resources.per_trial()
    fits = [sum(n.get(k, 0.0) for n in nodes) / v for k, v in need.items() if v > 0]
    return max(1, min(spec.search.num_samples, math.floor(min(fits) + 1e-9)))


def is_shared(path: str) -> bool:
    """Whether every node can reach ``path``: a URL (s3://, gs://, ...) or a path on a network file system."""
    if "://" in path:
        return True
    path = os.path.realpath(path)
    best, fstype = "", ""
    with open("/proc/mounts") as mounts:
        for line in mounts:
            _, point, kind, *_ = line.split()
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
                best, fstype = point, kind
    return fstype.startswith(("nfs", "cifs", "smb", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "fuse."))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ray(address: str | None, num_cpus: int | None = None, object_store_memory: int = 512 * 2**20) -> None:
    """Join the cluster at ``address``, or start a local Ray in this process (all cores by default)."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, runtime_env={"env_vars": WORKER_ENV})
        return
    # The dashboard serves the State API, which Ray Train's placement-group cleaner needs: without it the
    # worker placement groups of finished trials are never released and later trials wait forever. The
    # cleaner finds the API by looking for "the" local Ray, which fails when another Ray runs on the machine:
    # a dashboard port of our own, named in every worker's environment, makes it find this one.
    port = free_port()
    env = {**WORKER_ENV, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=True, dashboard_port=port,
             object_store_memory=object_store_memory, configure_logging=False, runtime_env={"env_vars": env})


def connect(spec: StudySpec, address: str | None) -> int:
    """Check the study against the cluster, start or join Ray, and return the trial concurrency.

    A local cluster is checked before Ray starts; a remote one right after joining, before any trial.
    """
    if not address:
        check_fits(spec, local_nodes(), "this machine")
    start_ray(address)
    nodes = cluster_nodes()
    if address:
        check_fits(spec, nodes, f"the cluster at {address}")
    if len(nodes) > 1 and not is_shared(spec.storage):
        raise SpecError(f"{spec.source}: storage: {spec.storage!r} is a local path, but the cluster has "
                        f"{len(nodes)} nodes and every node writes checkpoints there; use shared storage "
                        f"(an NFS mount present on every node, s3://... or gs://...)")
    return concurrency(spec, nodes)


# -------------------------------------------------------------------------------------------------- Tune


def trainable(spec: StudySpec, data_paths: dict[str, str]):
    base = {**spec.train_config().as_dict(), **data_paths}
    run = partial(run_trial, resources=spec.resources, train_dir=str(spec.study_dir / "train"))
    return tune.with_resources(tune.with_parameters(run, base=base), {"CPU": spec.resources.driver_cpus})


def build_search(spec: StudySpec, storage: optuna.storages.BaseStorage | None = None) -> StudySearch:
    """The study's Optuna searcher (its sampler, metric and space), on ``storage`` (default: the study's RDB)."""
    # A define-by-run space creates the Optuna study at once, so metric and mode go here as well.
    return StudySearch(space=define_by_run(spec.params), metric=spec.search.metric, mode=spec.search.mode,
                       sampler=sampler(spec), study_name=spec.name,
                       storage=storage or optuna.storages.RDBStorage(spec.optuna_url),
                       epochs=spec.train_config().epochs, constraints=spec.search.constraints,
                       rerun_duplicates=spec.search.rerun_duplicates)


def build_scheduler(spec: StudySpec):
    if spec.scheduler.type == "asha":
        return ASHAScheduler(time_attr="epoch", max_t=spec.train_config().epochs,
                             grace_period=spec.scheduler.grace_period,
                             reduction_factor=spec.scheduler.reduction_factor)
    return FIFOScheduler()


def build_tuner(spec: StudySpec, data_paths: dict[str, str] | None = None, experiment: str = "tune",
                max_concurrent: int | None = None, *, run=None, search: StudySearch | None = None,
                callbacks: list | None = None, stop=None, reuse_actors: bool = False) -> tune.Tuner:
    """The study's Tune experiment: its searcher, scheduler and trainable (default: the real trainer; a replay
    passes its own ``run``, ``search`` on an in-memory Optuna storage, ``callbacks`` and a budget ``stop``)."""
    return tune.Tuner(
        run or trainable(spec, data_paths),
        tune_config=tune.TuneConfig(metric=spec.search.metric, mode=spec.search.mode,
                                    search_alg=search or build_search(spec), scheduler=build_scheduler(spec),
                                    num_samples=spec.search.num_samples,
                                    max_concurrent_trials=max_concurrent or spec.search.max_concurrent or 1,
                                    reuse_actors=reuse_actors),
        run_config=tune.RunConfig(name=experiment, storage_path=str(spec.study_dir), verbose=0, stop=stop,
                                  callbacks=callbacks if callbacks is not None else
                                  [results.ResultsWriter(spec), ProgressLine(spec)]),
    )


def experiments(study_dir: Path) -> list[Path]:
    """The study's Tune experiments in the order they ran (``tune``, ``tune-2``, ...)."""
    found = [p for p in study_dir.glob("tune*") if p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.partition("-")[2] or 1))


def open_study(name_or_dir: str, storage: str = "runs") -> StudySpec:
    """The resolved study saved by ``launch``: ``name_or_dir`` is a study directory or a name under storage."""
    candidates = [Path(name_or_dir), Path(storage) / name_or_dir]
    for study_dir in candidates:
        if (study_dir / SPEC_FILE).is_file():
            return load_spec(study_dir / SPEC_FILE)
    raise SpecError(f"{name_or_dir}: no study found (looked for {' and '.join(str(c / SPEC_FILE) for c in candidates)}"
                    f"); give a study directory or a name under --storage")


def save_spec(spec: StudySpec) -> None:
    spec.study_dir.mkdir(parents=True, exist_ok=True)
    tmp = spec.study_dir / f".{SPEC_FILE}.tmp"
    tmp.write_text(yaml.safe_dump(snapshot(spec), sort_keys=False))
    os.replace(tmp, spec.study_dir / SPEC_FILE)


def run_study(spec: StudySpec, address: str | None = None) -> pa.Table:
    """Run a new study ``spec`` to the end; returns the trials table."""
    if experiments(spec.study_dir):
        raise SpecError(f"{spec.source}: name: study {spec.name!r} already exists in {spec.study_dir}; "
                        f"`ssl-study resume {spec.name}` continues it, `ssl-study extend {spec.name} --trials N` "
                        f"adds trials, or choose another name")
    max_concurrent = connect(spec, address)  # checks the resources before Ray starts or any file is written
    data_paths = prepare_data(spec)
    save_spec(spec)
    build_tuner(spec, data_paths, max_concurrent=max_concurrent).fit()
    return results.read(spec.study_dir)


def resume_study(spec: StudySpec, address: str | None = None) -> pa.Table:
    """Continue an interrupted study: ended trials stay as they are, the others go on from their checkpoints."""
    found = experiments(spec.study_dir)
    if not found or not tune.Tuner.can_restore(str(found[-1])):
        raise SpecError(f"{spec.study_dir}: nothing to resume (no Tune experiment state); launch the study instead")
    connect(spec, address)
    data_paths = prepare_data(spec)
    tune.Tuner.restore(str(found[-1]), trainable(spec, data_paths), resume_unfinished=True,
                       resume_errored=True).fit()
    close_orphans(spec.optuna_url, spec.name)
    return results.read(spec.study_dir)


def extend_study(spec: StudySpec, trials: int, address: str | None = None) -> pa.Table:
    """Add ``trials`` trials to a study; the sampler starts from every trial the Optuna storage holds."""
    if trials < 1:
        raise SpecError(f"--trials: must be >= 1, got {trials}")
    found = experiments(spec.study_dir)
    spec.search.num_samples = trials
    # A sampler seeded as the first one would replay its first random draws (TPE samples at random for its
    # first trials, whatever the storage holds): seed the extension by how many trials the study has.
    spec.search.seed += len(optuna.load_study(study_name=spec.name, storage=spec.optuna_url).trials)
    max_concurrent = connect(spec, address)
    data_paths = prepare_data(spec)
    build_tuner(spec, data_paths, experiment=f"tune-{len(found) + 1}", max_concurrent=max_concurrent).fit()
    return results.read(spec.study_dir)
