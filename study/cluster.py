"""The Ray cluster a study runs on: start or join it, check that a trial fits, how many run at once, and whether
the study's storage is shared by every node."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray

from data.store import is_shared
from study.console import console, say
from study.spec import SpecError, StudySpec

# Idle OpenMP threads of torch otherwise spin and starve FFCV's numba threads on small CPU workers. A trial's
# worker group may wait for workers another trial holds (a cluster that lost a node runs the same trials on fewer
# CPUs): 10 minutes per start attempt instead of Ray Train's 60 s, and resources.retries attempts (study/runner.py)
# before the trial fails, where Ray Train alone retried forever. The user's own setting wins.
START_TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE", START_TIMEOUT: os.environ.get(START_TIMEOUT, "600")}
# A local Ray only: nothing preempts this machine, and Ray Train's preemption watcher is one more actor (a
# Python process importing Ray: about 2 s of a core) per trial; the controller polls its workers every 0.5 s
# instead of 2 s, so a trial's end is seen up to 1.5 s sooner (bench/trial_overhead.py measures both).
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


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
    """``search.max_concurrent``, or as many trials as the cluster holds at once (at least 1). With
    ``resources.check: false`` (an autoscaling cluster) every trial at once: the nodes up now (maybe none with a
    GPU yet) say nothing of what the autoscaler will bring, and pending trials are what make it scale."""
    if spec.search.max_concurrent is not None:
        return spec.search.max_concurrent
    if not spec.resources.check:
        return spec.search.num_samples
    need = spec.resources.per_trial()
    fits = [sum(n.get(k, 0.0) for n in nodes) / v for k, v in need.items() if v > 0]
    return max(1, min(spec.search.num_samples, math.floor(min(fits) + 1e-9)))


def one_machine(nodes: list[dict]) -> bool:
    """Whether Ray's ``nodes`` (``ray.nodes()``, alive ones) are all on this machine: several raylets of one host
    share its disk, so a local path is shared storage for them."""
    here = {socket.gethostname()}
    return {n["NodeManagerHostname"] for n in nodes} <= here and len({n["NodeManagerAddress"] for n in nodes}) == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ray(address: str | None, num_cpus: int | None = None, object_store_memory: int = 512 * 2**20) -> bool:
    """Join the cluster at ``address``, or start a local Ray in this process (all cores by default); False if
    Ray was up already."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, runtime_env={"env_vars": WORKER_ENV})
        return True
    # The dashboard serves the State API, which Ray Train's placement-group cleaner needs: without it the
    # worker placement groups of finished trials are never released and later trials wait forever. The
    # cleaner finds the API by looking for "the" local Ray, which fails when another Ray runs on the machine:
    # a dashboard port of our own, named in every worker's environment, makes it find this one.
    port = free_port()
    env = {**WORKER_ENV, **LOCAL_ENV, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=True, dashboard_port=port,
             object_store_memory=object_store_memory, configure_logging=False, runtime_env={"env_vars": env})
    return True


def ray_logs_dir() -> str:
    """Ray's session log folder on this node (only Ray's private API knows it)."""
    return ray._private.worker._global_node.get_logs_dir_path()


@contextmanager
def ray_session(log: Path | None, address: str | None = None, **start) -> Iterator[None]:
    """Start or join Ray (:func:`start_ray`) for the block and shut down at its end the Ray it started. With
    ``log``, Ray's, Tune's and the workers' output goes to that file instead of the terminal
    (:func:`study.console.console`), and the terminal is told once where it and Ray's session logs are."""
    with console(log):
        started = start_ray(address, **start)
        try:
            if log:
                say(f"logs: {log} (Ray, Tune and the workers; --verbose shows them here), Ray's session logs: "
                    f"{ray_logs_dir()}")
            yield
        finally:
            if started:  # inside the redirection: what Ray prints while it stops belongs to the log too
                ray.shutdown()


@contextmanager
def connect(spec: StudySpec, address: str | None, verbose: bool = True) -> Iterator[int]:
    """Check the study against the cluster, start or join Ray for the block and give the trial concurrency.

    A local cluster is checked before Ray starts or anything is written; a remote one right after joining,
    before any trial. Without ``verbose``, Ray's output goes to ``logs/ray.log`` in the study's folder on this
    machine (:func:`ray_session`; ``spec.local_dir``: for a study in object storage, study/mirror.py copies it there).
    """
    if not address:
        check_fits(spec, local_nodes(), "this machine")
    with ray_session(None if verbose else spec.local_dir / "logs" / "ray.log", address):
        nodes = cluster_nodes()
        if address:
            check_fits(spec, nodes, f"the cluster at {address}")
        if len(nodes) > 1 and not is_shared(spec.storage) and not one_machine([n for n in ray.nodes() if n["Alive"]]):
            raise SpecError(f"{spec.source}: storage: {spec.storage!r} is a local path, but the cluster has "
                            f"{len(nodes)} nodes and every node writes checkpoints there; use shared storage "
                            f"(an NFS mount present on every node, s3://... or gs://...)")
        yield concurrency(spec, nodes)
