"""Run a study: Ray Tune + OptunaSearch over trials, each trial a Ray Train TorchTrainer (Train V2 pattern).

Layout under ``storage/name``: ``tune/`` (Tune's experiment), ``train/<trial_id>/`` (each trial's Train run
and checkpoints, named deterministically so a restarted trial finds its checkpoint), ``optuna.db`` (the
Optuna study, readable by optuna-dashboard) and ``results/*.parquet``.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import optuna
import pyarrow as pa
import ray
from ray import tune
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from data.convert import convert_fashion_mnist
from search_spaces import define_by_run
from study import results
from study.spec import Resources, StudySpec
from trainers.loop import train_loop_per_worker


def prepare_data(spec: StudySpec) -> dict[str, str]:
    """Convert the study's dataset to FFCV files (a no-op when they are up to date)."""
    paths = convert_fashion_mnist(Path(spec.data_dir).resolve())
    return {"train_path": str(paths["train"]), "test_path": str(paths["test"])}


def run_trial(config: dict, *, base: dict, resources: Resources, train_dir: str) -> None:
    """Tune function trainable: drive one trial's TorchTrainer and relay its reports to Tune."""
    trial_id = tune.get_context().get_trial_id()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**base, **config},
        scaling_config=ScalingConfig(
            num_workers=resources.workers,
            use_gpu=resources.gpus_per_worker > 0,
            resources_per_worker={"CPU": resources.cpus_per_worker, "GPU": resources.gpus_per_worker},
        ),
        # The name is the trial id: a resumed trial reuses it and so restores its own checkpoint.
        run_config=RunConfig(name=trial_id, storage_path=train_dir, callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


def sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    s = spec.search
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.sampler == "grid":  # ablations: every combination of the choice lists, in a seeded order
        return optuna.samplers.GridSampler({p.name: list(p.args) for p in spec.params}, seed=s.seed)
    # Optuna 5's defaults change with releases: say every setting that matters.
    return optuna.samplers.TPESampler(seed=s.seed, multivariate=True, constant_liar=True)


def build_tuner(spec: StudySpec, data_paths: dict[str, str]) -> tune.Tuner:
    study_dir = spec.study_dir
    study_dir.mkdir(parents=True, exist_ok=True)
    base = {**spec.train_config().as_dict(), **data_paths}
    res = spec.resources
    trainable = tune.with_resources(
        tune.with_parameters(partial(run_trial, resources=res, train_dir=str(study_dir / "train")), base=base),
        {"CPU": res.driver_cpus},
    )
    storage = optuna.storages.RDBStorage(f"sqlite:///{study_dir / 'optuna.db'}")
    # A define-by-run space creates the Optuna study at once, so metric and mode go here as well.
    search = OptunaSearch(space=define_by_run(spec.params), metric=spec.search.metric, mode=spec.search.mode,
                          sampler=sampler(spec), study_name=spec.name, storage=storage)
    if spec.scheduler.type == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=base["epochs"],
                                  grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=spec.search.metric, mode=spec.search.mode, search_alg=search,
                                    scheduler=scheduler, num_samples=spec.search.num_samples,
                                    max_concurrent_trials=spec.search.max_concurrent),
        run_config=tune.RunConfig(name="tune", storage_path=str(study_dir), verbose=1),
    )


# Idle OpenMP threads of torch otherwise spin and starve FFCV's numba threads on small CPU workers.
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def start_ray(address: str | None) -> None:
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": WORKER_ENV}
    if address:
        ray.init(address=address, runtime_env=runtime_env)
    else:
        # The dashboard serves the State API, which Ray Train's placement-group cleaner needs: without it
        # the worker placement groups of finished trials are never released and later trials wait forever.
        ray.init(num_cpus=os.cpu_count(), include_dashboard=True, object_store_memory=512 * 2**20,
                 configure_logging=False, runtime_env=runtime_env)


def run_study(spec: StudySpec, address: str | None = None) -> pa.Table:
    """Run ``spec`` to the end and write its results tables; returns the trials table."""
    data_paths = prepare_data(spec)
    start_ray(address)
    grid = build_tuner(spec, data_paths).fit()
    return results.write(spec, grid)
