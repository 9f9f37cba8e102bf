"""Run a study: Ray Tune + Optuna over trials, each trial a Ray Train TorchTrainer (Train V2 pattern).

Layout under ``storage/name`` (a folder, or a prefix in object storage: data/store.py): ``study.yaml`` (the
resolved study, what ``resume`` / ``extend`` / ``status`` read), ``tune/`` (Tune's experiment; ``tune-2/``, ...
for each ``extend``), ``train/<trial_id>/`` (each trial's Train run and checkpoints, named by trial id so a
restarted trial finds its own checkpoint), ``optuna.db`` (the Optuna study, readable by optuna-dashboard;
``optuna.journal`` for a study on NFS, or the database that ``search.storage`` names: study/optuna_storage.py;
in object storage, a copy of the driver's file: study/mirror.py), ``logs/`` (each failed trial's log) and
``results/*.parquet`` (study/results/).
"""

from __future__ import annotations

import math
import traceback
from dataclasses import replace
from functools import partial
from pathlib import Path

import optuna
import pyarrow as pa
import ray
import yaml
from ray import tune
from ray.exceptions import RayActorError, RayTaskError
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.exceptions import (
    WorkerGroupStartupFailedError,
    WorkerGroupStartupTimeoutError,
    WorkerHealthCheckFailedError,
)
from ray.train.v2.api.exceptions import ControllerError, PreemptionError, WorkerGroupError
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandForBOHB

from data import store
from data.datasets import prepare
from data.store import ObjectPath, check_writable, is_remote, location
from search_spaces import define_by_run, size
from study import evaluate, results
from study.cluster import connect, ray_logs_dir
from study.console import say
from study.mirror import Mirror, pull
from study.optuna_storage import check_storage, open_storage
from study.progress import ProgressLine
from study.results.writer import ResultsWriter
from study.search import StudySearch, close_orphans, sampler
from study.spec import Evaluate, SpecError, StudySpec, load_spec, snapshot, with_default_storage
from trainers.config import TrainConfig
from trainers.worker import train_loop_per_worker

SPEC_FILE = "study.yaml"


def prepare_data(spec: StudySpec) -> dict[str, str]:
    """Convert the study's dataset to FFCV files (a no-op when they are up to date); a ``data_dir`` in object
    storage gets them from this machine's cache, and each worker copies them to its node (data/remote.py)."""
    if is_remote(spec.data_dir):
        from data.remote import prepare_remote

        paths = prepare_remote(spec.dataset, spec.data_dir)
    else:
        paths = prepare(spec.dataset, Path(spec.data_dir).resolve())
    return {"train_path": str(paths["train"]), "test_path": str(paths["test"])}


def check_locations(spec: StudySpec) -> None:
    """Refuse, in one line naming the setting, a ``storage`` or ``data_dir`` in object storage that cannot be
    written (an unreachable endpoint, a missing bucket, refused credentials), before Ray starts."""
    for key, where in (("storage", spec.study_dir), ("data_dir", spec.data_dir)):
        if why := check_writable(location(where), f"{spec.source}: {key}"):
            raise SpecError(why)


def lost_process(error: BaseException) -> bool:
    """Whether a failed run lost a process (a killed or OOM-killed worker, a lost node) rather than raised: only
    that is worth a restart, since an exception of the training code would raise again. When one rank dies the
    others fail with collateral errors (a broken collective), so any dead worker counts, as in Ray's own
    preemption rule."""
    if isinstance(error, PreemptionError):
        return True
    if isinstance(error, ControllerError):
        return isinstance(error.controller_failure, (WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError))
    return isinstance(error, WorkerGroupError) and any(map(_died, error.worker_failures.values()))


def _reason(error: BaseException, attempts: int) -> str:
    """One line for a trial whose processes were lost on every attempt."""
    cause = getattr(error, "controller_failure", None) or error
    first = (str(cause).strip().splitlines() or [""])[0][:300]
    return f"{type(cause).__name__}: {first} (gave up after {attempts} attempts: resources.retries)"


def _died(error: BaseException) -> bool:
    """A worker's failure that is its process's death, however Ray Train wraps it (a failed health check)."""
    if isinstance(error, WorkerHealthCheckFailedError):
        error = error.health_check_failure
    if isinstance(error, RayTaskError):
        error = error.as_instanceof_cause()
    return isinstance(error, RayActorError)


def stopped_by_tune() -> bool:
    """Whether Tune is stopping this trial (Hyperband pausing it at a rung, a scheduler or the study ending it):
    Tune removes the trial's placement group, which kills its Train controller, so ``fit`` raises here."""
    group = ray.util.get_current_placement_group()
    return group is not None and ray.util.placement_group_table(group).get("state") == "REMOVED"


def failed_marker(logs_dir: str, trial_id: str) -> Path | ObjectPath:
    """Where a trial that raised says so: a retry of its driver (on any node) then fails at once instead of
    training into the same exception again (``resume`` removes the markers: it retries failed trials on purpose)."""
    return location(logs_dir) / f".{trial_id}.failed"


def run_trial(config: dict, *, spec: StudySpec, data_paths: dict[str, str], train_dir: str, logs_dir: str) -> None:
    """Tune function trainable: drive one trial's TorchTrainer and relay its reports to Tune.

    A lost worker restarts the worker group from the trial's latest checkpoint, up to ``resources.retries``
    times; a lost trial driver (this function's process) is retried as often by Tune, and its new TorchTrainer
    restores the same checkpoint (the run's name is the trial id). A trial that raises leaves its traceback
    (with Ray Train's excerpt of each failed worker's) and where the workers' whole output is in
    ``logs_dir/<trial_id>.log``, the file the console's one-line error names."""
    trial_id = tune.get_context().get_trial_id()
    marker = failed_marker(logs_dir, trial_id)
    if marker.exists():
        # The error's last line is what the trials table and the console show (study/status.failure): the same
        # line as the first time.
        raise RuntimeError(f"trial {trial_id} raised before, so Tune's retry stops here:\n{marker.read_text()}")
    options = {k: v for k, v in config.items() if k in TrainConfig.field_names()}  # not Optuna's "1-moco_m"
    resources = spec.resources

    def trainer() -> TorchTrainer:
        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config={**spec.train_config(options).as_dict(), **data_paths},
            scaling_config=ScalingConfig(
                num_workers=resources.workers,
                use_gpu=resources.gpus_per_worker > 0,
                resources_per_worker={"CPU": resources.cpus_per_worker, "GPU": resources.gpus_per_worker},
                # One trial's workers on as few nodes as fit (Ray's default, said here on purpose): NCCL within
                # a node runs over NVLink, between nodes over the network.
                placement_strategy="PACK",
            ),
            # The name is the trial id: a restarted run reuses it and so restores its own latest checkpoint.
            # Ray Train's own restarts would also retry an exception of ours (max_failures counts both).
            # controller_failure_limit=0: Ray Train V2 retries a worker group that cannot start (resources that
            # never come, a worker that cannot import) forever by default; this loop retries it, a bounded number.
            run_config=RunConfig(name=trial_id, storage_path=train_dir, callbacks=[TuneReportCallback()],
                                 failure_config=FailureConfig(max_failures=0, controller_failure_limit=0),
                                 checkpoint_config=CheckpointConfig(num_to_keep=1)),
        )

    log = location(logs_dir) / f"{trial_id}.log"
    for attempt in range(resources.retries + 1):
        try:
            trainer().fit()
            return
        except Exception as e:
            if stopped_by_tune():  # a pause (Hyperband) or a stop: not a failure; a resumed trial restores
                raise
            lost = lost_process(e)
            if lost and attempt < resources.retries:
                store.append_text(log, f"trial {trial_id}: a process was lost ({type(e).__name__}); restart "
                                       f"{attempt + 1} of {resources.retries} from the latest checkpoint\n")
                continue
            # Tune's error file holds this too, but in the middle of the experiment's files; the workers' own
            # tracebacks, which Ray Train cuts to 1000 characters here, are whole in their output.
            store.append_text(log, f"trial {trial_id} failed\n\n{traceback.format_exc()}\nEach worker's whole "
                                   f"output: {location(logs_dir) / 'ray.log'} (lines marked with its pid; the "
                                   f"terminal with --verbose) and Ray's session logs ({ray_logs_dir()}, worker-*)\n")
            # Final either way: an exception of the training code, or a lost process (a worker group that never
            # started) after every retry. Tune's own retry of this function would only repeat it.
            if not lost:
                marker.write_text(traceback.format_exc().strip().splitlines()[-1])
                raise
            marker.write_text(f"RuntimeError: {_reason(e, attempt + 1)}")
            raise RuntimeError(_reason(e, attempt + 1)) from e


# -------------------------------------------------------------------------------------------------- Tune


def trainable(spec: StudySpec, data_paths: dict[str, str]):
    run = partial(run_trial, train_dir=str(spec.study_dir / "train"), logs_dir=str(spec.study_dir / "logs"))
    return tune.with_resources(tune.with_parameters(run, spec=spec, data_paths=data_paths),
                               {"CPU": spec.resources.driver_cpus})


def build_search(spec: StudySpec, storage: optuna.storages.BaseStorage | None = None) -> StudySearch:
    """The study's Optuna searcher (its sampler, metric and space), on ``storage`` (default: the study's own)."""
    # A define-by-run space creates the Optuna study at once, so metric and mode go here as well.
    return StudySearch(space=define_by_run(spec.params), metric=spec.search.metric, mode=spec.search.mode,
                       sampler=sampler(spec), study_name=spec.name,
                       storage=storage or open_storage(spec),
                       epochs=spec.train_config().epochs, constraints=spec.search.constraints,
                       rerun_duplicates=spec.search.rerun_duplicates, space_size=size(spec.params),
                       spec=None if storage else spec)


def build_scheduler(spec: StudySpec):
    if spec.scheduler.type == "asha":
        return ASHAScheduler(time_attr="epoch", max_t=spec.train_config().epochs,
                             grace_period=spec.scheduler.grace_period,
                             reduction_factor=spec.scheduler.reduction_factor)
    if spec.scheduler.type == "hyperband":
        # Hyperband (Li et al. 2018): brackets of ever fewer, longer trials. Tune's HyperBandScheduler halves a
        # bracket once the trials *added so far* reach a rung, so with trials suggested one at a time (a searcher,
        # a concurrency limit) it never halves; its BOHB variant pauses a trial at a rung until the bracket is full
        # (the trial resumes from that epoch's checkpoint). The survivors of a bracket's last rung train to the
        # end (rungs are max_t / eta^k rounded down: 1, 3, 9 of 10 epochs at eta 3). grace_period does not apply.
        return HyperBandForBOHB(time_attr="epoch", max_t=spec.train_config().epochs,
                                reduction_factor=spec.scheduler.reduction_factor, stop_last_trials=False)
    return FIFOScheduler()


def largest_bracket(max_t: int, eta: int) -> int:
    """Trials in Hyperband's most aggressive bracket, as Tune's HyperBandScheduler sizes it: ceil(eta^(s_max))
    with s_max = round(log_eta max_t) (9 at 10 epochs and eta 3)."""
    return math.ceil(eta ** round(math.log(max_t) / math.log(eta)))


def build_tuner(spec: StudySpec, data_paths: dict[str, str] | None = None, experiment: str = "tune",
                max_concurrent: int | None = None, *, run=None, search: StudySearch | None = None,
                callbacks: list | None = None, stop=None, reuse_actors: bool = False) -> tune.Tuner:
    """The study's Tune experiment: its searcher, scheduler and trainable (default: the real trainer; a replay
    passes its own ``run``, ``search`` on an in-memory Optuna storage, ``callbacks`` and a budget ``stop``)."""
    max_concurrent = max_concurrent or spec.search.max_concurrent or 1
    scheduler = build_scheduler(spec)
    if spec.scheduler.type == "hyperband":  # a bracket halves once full: its trials must be out at once
        # (paused ones give their resources back; the others wait for them as pending trials)
        max_concurrent = max(max_concurrent, largest_bracket(spec.train_config().epochs,
                                                             spec.scheduler.reduction_factor))
    return tune.Tuner(
        run or trainable(spec, data_paths),
        tune_config=tune.TuneConfig(metric=spec.search.metric, mode=spec.search.mode,
                                    search_alg=search or build_search(spec), scheduler=scheduler,
                                    num_samples=spec.search.num_samples,
                                    max_concurrent_trials=max_concurrent,
                                    reuse_actors=reuse_actors),
        run_config=tune.RunConfig(name=experiment, storage_path=str(spec.study_dir), verbose=0, stop=stop,
                                  failure_config=tune.FailureConfig(max_failures=spec.resources.retries),
                                  callbacks=callbacks if callbacks is not None else
                                  [ResultsWriter(spec), ProgressLine(spec, max_concurrent), Mirror(spec)]),
    )


def experiments(study_dir: Path | ObjectPath) -> list[Path | ObjectPath]:
    """The study's Tune experiments in the order they ran (``tune``, ``tune-2``, ...)."""
    found = [p for p in study_dir.glob("tune*") if p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.partition("-")[2] or 1))


def open_study(name_or_dir: str, storage: str = "runs") -> StudySpec:
    """The resolved study saved by ``launch``: ``name_or_dir`` is a study directory (a path or an object-storage
    URI) or a name under ``storage``."""
    candidates = [location(name_or_dir)] + ([] if "://" in name_or_dir else [location(storage) / name_or_dir])
    for study_dir in candidates:
        try:
            found = (study_dir / SPEC_FILE).is_file()
        except OSError as e:  # object storage that cannot be read: a missing bucket, refused credentials, ...
            raise SpecError(store.problem(study_dir, name_or_dir, e)) from None
        if found:
            spec = load_spec(study_dir / SPEC_FILE)
            pull(spec)  # a study in object storage: its Optuna file, when this machine has none or an older one
            return spec
    raise SpecError(f"{name_or_dir}: no study found (looked for {' and '.join(str(c / SPEC_FILE) for c in candidates)}"
                    f"); give a study directory or a name under --storage")


def save_spec(spec: StudySpec) -> None:
    spec.study_dir.mkdir(parents=True, exist_ok=True)
    store.write_text(spec.study_dir / SPEC_FILE, yaml.safe_dump(snapshot(spec), sort_keys=False))


def run_study(spec: StudySpec, address: str | None = None, verbose: bool = True) -> pa.Table:
    """Run a new study ``spec`` to the end; returns the trials table. Without ``verbose``, the terminal shows
    only the progress lines (Ray's output goes to ``<study_dir>/logs/ray.log``)."""
    check_locations(spec)  # an unreachable bucket is one line here, before Ray starts
    if experiments(spec.study_dir):
        raise SpecError(f"{spec.source}: name: study {spec.name!r} already exists in {spec.study_dir}; "
                        f"`ssl-study resume {spec.name}` continues it, `ssl-study extend {spec.name} --trials N` "
                        f"adds trials, or choose another name")
    spec = with_default_storage(spec)  # journal instead of SQLite for a study directory on NFS
    check_storage(spec)  # an unreachable database is one line here, before Ray starts
    with connect(spec, address, verbose) as max_concurrent:
        data_paths = prepare_data(spec)
        save_spec(spec)
        build_tuner(spec, data_paths, max_concurrent=max_concurrent).fit()
        evaluate_at_end(spec, data_paths)
    return results.open(spec.study_dir).table()


def resume_study(spec: StudySpec, address: str | None = None, verbose: bool = True) -> pa.Table:
    """Continue an interrupted study: ended trials stay as they are, the others go on from their checkpoints."""
    check_locations(spec)
    found = experiments(spec.study_dir)
    if not found or not tune.Tuner.can_restore(str(found[-1])):
        raise SpecError(f"{spec.study_dir}: nothing to resume (no Tune experiment state); launch the study instead")
    pull(spec)
    check_storage(spec)
    for marker in (spec.study_dir / "logs").glob(".*.failed"):  # resume retries failed trials: all of them
        marker.unlink()
    with connect(spec, address, verbose):
        data_paths = prepare_data(spec)
        tune.Tuner.restore(str(found[-1]), trainable(spec, data_paths), resume_unfinished=True,
                           resume_errored=True).fit()
        evaluate_at_end(spec, data_paths)
    close_orphans(spec, spec.name)
    return results.open(spec.study_dir).table()


def extend_study(spec: StudySpec, trials: int, address: str | None = None, verbose: bool = True) -> pa.Table:
    """Add ``trials`` trials to a study; the sampler starts from every trial the Optuna storage holds."""
    if trials < 1:
        raise SpecError(f"--trials: must be >= 1, got {trials}")
    check_locations(spec)
    found = experiments(spec.study_dir)
    # A sampler seeded as the first one would replay its first random draws (TPE samples at random for its
    # first trials, whatever the storage holds): seed the extension by how many trials the study has.
    pull(spec)
    check_storage(spec)
    had = len(optuna.load_study(study_name=spec.name, storage=open_storage(spec)).trials)
    spec = replace(spec, search=replace(spec.search, num_samples=trials, seed=spec.search.seed + had))
    with connect(spec, address, verbose) as max_concurrent:
        data_paths = prepare_data(spec)
        build_tuner(spec, data_paths, experiment=f"tune-{len(found) + 1}", max_concurrent=max_concurrent).fit()
        evaluate_at_end(spec, data_paths)
    return results.open(spec.study_dir).table()


def evaluate_at_end(spec: StudySpec, data_paths: dict[str, str]) -> None:
    """The study file's ``evaluate:`` on the Ray the study ran on, when its trials ended: what the table lacks of
    the best completed trials (fewer than ``evaluate.top``: those there are; none: said, and nothing run)."""
    if spec.evaluate is None:
        return
    try:
        jobs = evaluate.pending(spec, evaluate.plan(spec, spec.evaluate, strict=False))
    except SpecError as e:  # the study ran: say why nothing is evaluated rather than fail it
        say(f"evaluate: nothing evaluated: {e}")
        return
    evaluate.run(spec, jobs, data_paths)


def evaluate_study(spec: StudySpec, ev: Evaluate, address: str | None = None,
                   verbose: bool = True) -> tuple[list[evaluate.Job], list[str]]:
    """``ssl-study evaluate``: the evaluations of the ``ev.top`` best trials that the table lacks, run on a local
    Ray or the cluster at ``address``; returns every planned job and the trial ids that failed. Bad input is a
    SpecError before Ray starts, and nothing starts when every evaluation is in the table already."""
    jobs = evaluate.plan(spec, ev)
    todo = evaluate.pending(spec, jobs)
    say(f"evaluate {spec.name}: {ev.protocol} on the {len(jobs)} best trial{'s' * (len(jobs) != 1)}; "
        + (f"{len(jobs) - len(todo)} already in {spec.study_dir / 'results' / 'evaluations.parquet'}"
           if len(todo) < len(jobs) else "none evaluated yet"))
    if not todo:
        return jobs, []
    check_locations(spec)
    with connect(spec, address, verbose):
        return jobs, evaluate.run(spec, todo, prepare_data(spec))
