"""The study file: one YAML document that says what to search, on what, with which resources.

Loading validates the whole file before any Ray resource is spent. Every problem is a :class:`SpecError`
whose one-line message names the file, the key and what would be accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data.store import ObjectPath, is_remote, is_shared, location, on_this_machine, uri_problem
from search_spaces import Param, SpaceError, flatten, parse_space
from search_spaces.presets import PRESETS, apply_preset
from study import DEFAULT_STUDY
from study.errors import SpecError
from study.optuna_storage import JOURNAL, url_problem
from trainers.config import TrainConfig, recipe_defaults
from trainers.policy import StopPolicy

METRICS = ("knn_top1", "loss", "rankme")  # rankme: label-free (trainers/rankme.py)
SAMPLERS = ("tpe", "random", "grid")
STARTUPS = ("random", "sobol")
SCHEDULERS = ("asha", "hyperband", "fifo")
PROTOCOLS = ("linear", "knn")  # study/evaluate.py
WANDB_MODES = ("online", "offline")
# Keys that would put a credential in the study file, which is saved with the results (study.yaml): refused with
# where the credential goes instead (trackers and databases read theirs from the environment).
CREDENTIAL_KEYS = ("api_key", "key", "token", "password", "secret", "credentials")


@dataclass(frozen=True)
class Resources:
    workers: int = 2  # Ray Train workers per trial (one DDP process each)
    cpus_per_worker: float = 0.45
    gpus_per_worker: float = 0.0
    driver_cpus: float = 0.1  # the Tune function that drives a trial's TorchTrainer
    check: bool = True  # refuse a trial the cluster's nodes can never hold (turn off for autoscaling clusters)
    # Lost processes survived per trial: its worker group restarts this many times from the last checkpoint
    # after a lost worker (a kill, an OOM, a preempted node), and Tune retries the trial as often after a lost
    # trial driver. Each restart redoes at most the epoch in flight (checkpoint_every: 1 by default).
    retries: int = 3

    def per_trial(self) -> dict[str, float]:
        return {"CPU": self.workers * self.cpus_per_worker + self.driver_cpus,
                "GPU": self.workers * self.gpus_per_worker}


@dataclass(frozen=True)
class Search:
    space: dict = field(default_factory=dict)
    num_samples: int = 4
    max_concurrent: int | None = None  # None: as many trials as the cluster holds at once
    metric: str = "knn_top1"
    mode: str = "max"
    sampler: str = "tpe"
    seed: int = 0
    # The Optuna study (study/optuna_storage.py): None, SQLite in the study dir (a new study on NFS: journal);
    # "journal", a journal file in the study dir (NFS-safe); journal:///abs/path; postgresql://user@host/db
    # (the password from PGPASSWORD or ~/.pgpass, never in the URL: study.yaml keeps the URL); sqlite:///...
    storage: str | None = None
    # Trials the instability policy stopped or flagged (unstable, diverged, collapsed) become constraint
    # violations the sampler models (TPE's feasibility split), instead of only PRUNED trials ranked low.
    constraints: bool = False
    startup_trials: int = 10  # TPE's first trials, before it models (Optuna's default 10)
    # How TPE's first trials are drawn: "sobol", a scrambled Sobol design that spreads them over every axis
    # (study/search.py SobolStart), or "random" (Optuna's). Sobol by default: on the second record's race
    # (docs/search-benchmark.md) it ties the best strategies at 10% and 25% of the grid's compute and leads at 5%
    startup: str = "sobol"
    rerun_duplicates: bool = False  # False: a configuration that already ran is told its outcome, not run again


@dataclass(frozen=True)
class Scheduler:
    type: str = "asha"
    grace_period: int = 1  # epochs
    reduction_factor: int = 2


@dataclass(frozen=True)
class Evaluate:
    """``evaluate:`` (and ``ssl-study evaluate``): the ``top`` best completed trials' exported backbones, frozen,
    evaluated by ``protocol`` (study/evaluate.py) at the end of the study."""

    top: int = 3
    protocol: str = "linear"  # linear: the paper's linear probe; knn: weighted kNN at k 20 and 200
    epochs: int = 90  # the linear probe's (the paper's 90)
    batch_size: int = 1024  # the linear probe's global batch (the official code's); lr = base_lr x batch / 256
    base_lr: float | None = None  # the linear probe's; None: the paper's, 3.0 for a ViT, 0.1 for a ResNet
    # probe training images and kNN bank: a fixed random subset of the train split (None: all of it; the test
    # split is always whole)
    train_subset: int | None = None


@dataclass(frozen=True)
class Wandb:
    project: str | None = None  # None: the study's name
    mode: str = "online"  # online: needs WANDB_API_KEY; offline: run files under the study dir (`wandb sync` later)


@dataclass(frozen=True)
class Tracking:
    """``tracking:``: experiment trackers that get one run per trial (study/tracking/). Credentials come from the
    environment only (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME / _PASSWORD, WANDB_API_KEY)."""

    tensorboard: bool = False  # event files in <study dir>/tensorboard/<trial_id>/
    mlflow: str | None = None  # a tracking URI: http(s)://host:port (a server), sqlite:///abs/path.db, ...
    wandb: Wandb | None = None


@dataclass(frozen=True)
class StudySpec:
    name: str = "study"
    preset: str | None = None  # a paper study from search_spaces/presets.py; this file's keys override it
    preset_scale: float = 1.0  # the preset's batch sizes times this (the paper's are 1k-6k)
    dataset: str = "fashion_mnist"  # fashion_mnist, mnist, or an ImageNet-style image folder (data/datasets.py)
    # Converted FFCV files: a path (relative: to the working directory) or s3:// / gs:// (copied to each node's
    # disk: data/remote.py).
    data_dir: str = "datasets"
    # storage/name holds results, checkpoints, the Optuna database: a path (NFS on clusters) or an object-storage
    # prefix, s3://bucket/prefix or gs://bucket/prefix (data/store.py).
    storage: str = "runs"
    train: dict = field(default_factory=dict)  # overrides of trainers.config.TrainConfig
    resources: Resources = field(default_factory=Resources)
    search: Search = field(default_factory=Search)
    scheduler: Scheduler = field(default_factory=Scheduler)
    stopping: StopPolicy = field(default_factory=StopPolicy)  # instability policy (trainers/policy.py)
    evaluate: Evaluate | None = None  # the best trials evaluated at the end (study/evaluate.py); None: not
    tracking: Tracking = field(default_factory=Tracking)  # TensorBoard, MLflow, W&B runs (study/tracking/)
    source: str = ""  # the file this spec came from (set by the loader)

    @property
    def study_dir(self) -> Path | ObjectPath:
        """Where the study's files are: a folder, or a prefix in object storage (``str()`` of it is what Ray takes)."""
        return location(resolved(self.storage)) / self.name

    @property
    def remote(self) -> bool:
        return is_remote(self.storage)

    @property
    def local_dir(self) -> Path:
        """This machine's folder for what has to be on a disk: the study directory itself, or for a study in object
        storage its mirror in this machine's cache (the driver's Ray log, a report's figures, the default Optuna
        SQLite file, which study/mirror.py copies to and from the study's prefix)."""
        return on_this_machine(self.study_dir, kind="studies")

    @property
    def optuna_url(self) -> str:
        """The Optuna storage URL: search.storage (``journal``: the study's own journal file), else the study's own
        SQLite file. study/optuna_storage.py opens it."""
        if self.search.storage == "journal":
            return f"journal://{self.local_dir / 'optuna.journal'}"
        return self.search.storage or f"sqlite:///{self.local_dir / 'optuna.db'}"

    @property
    def params(self) -> list[Param]:
        try:
            return parse_space(self.search.space, where=f"{self.source}: search.space")
        except SpaceError as e:
            raise SpecError(str(e)) from None

    def train_config(self, params: dict | None = None) -> TrainConfig:
        """A trial's TrainConfig: the file's ``train:`` with the trial's searched ``params`` (none: the file
        alone) over defaults. Unless set, a worker's loader and torch threads are the CPUs it is given (at least
        1: one FFCV thread for a GPU that consumes thousands of images/s starves it), and a ResNet gets the
        paper's ResNet recipe (:func:`trainers.config.recipe_defaults`) instead of the ViT one."""
        chosen = {**self.train, **(params or {})}
        defaults = {"loader_workers": max(1, int(self.resources.cpus_per_worker)),
                    "threads": max(1, int(self.resources.cpus_per_worker)),
                    **recipe_defaults(chosen.get("backbone", TrainConfig.backbone),
                                      chosen.get("method", TrainConfig.method))}
        return TrainConfig(**{**defaults, **chosen}, stopping=self.stopping)

    def trial_config(self, row: dict) -> TrainConfig:
        """The TrainConfig a trials-table ``row`` ran: its searched values (those that are TrainConfig fields,
        not Optuna's derived ones such as ``1-moco_m``) over the file's ``train:``."""
        return self.train_config({p.name: row[p.name] for p in flatten(self.params)
                                  if p.name in TrainConfig.field_names() and row.get(p.name) is not None})


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against a field annotation; ints are accepted where floats are."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        tp = next(t for t in options if t is not type(None))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    ok = (isinstance(value, tp) and not (tp in (int, float) and isinstance(value, bool))) or (
        tp is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise SpecError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return float(value) if tp is float else value


def _unknown(key: str, accepted: typing.Iterable[str], where: str) -> SpecError:
    if key.lower() in CREDENTIAL_KEYS:
        at = f"{where}.{key}" if ": " in where else f"{where}: {key}"
        return SpecError(f"{at}: credentials are never read from the study file (it is saved with the "
                         f"results); set them in the environment, e.g. WANDB_API_KEY, MLFLOW_TRACKING_TOKEN")
    accepted = sorted(accepted)
    close = difflib.get_close_matches(key, accepted, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return SpecError(f"{where}: unknown key '{key}'; {hint}accepted: {', '.join(accepted)}")


def _at(where: str, key: str) -> str:
    """``file: section.key`` from ``file:`` or ``file: section``."""
    return f"{where} {key}" if where.endswith(":") else f"{where}.{key}"


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise SpecError(f"{where.rstrip(':')}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    values = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown(str(key), names, where.rstrip(":"))
        values[key] = _check_type(value, hints[key], _at(where, key))
    try:
        return cls(**values)
    except ValueError as e:  # the dataclass's own checks (e.g. StopPolicy's) name the field
        raise SpecError(f"{where.split(':')[0]}: {e}") from None


def _one_of(value: Any, accepted: typing.Sequence[str], where: str) -> None:
    if value not in accepted:
        raise SpecError(f"{where}: {value!r} is not one of: {', '.join(accepted)}")


def _check_positive(value: float, where: str) -> None:
    if value <= 0:
        raise SpecError(f"{where}: must be > 0, got {value!r}")


def validate(spec: StudySpec) -> StudySpec:
    """Check values against each other and against what exists; returns the final spec (its ``train`` values in
    their declared types). Nothing changes a spec afterwards: the dataclasses are frozen, and a variant of a study
    (its default storage settled, more trials) is a new spec (``dataclasses.replace``)."""
    from trainers.config import PRECISIONS
    from trainers.registry import BACKBONES, METHODS, MLP_NORMS, OPTIMIZERS, POS_EMBEDS

    src = spec.source
    if spec.preset is not None:
        _one_of(spec.preset, tuple(PRESETS), f"{src}: preset")
    _check_positive(spec.preset_scale, f"{src}: preset_scale")
    from data.datasets import DatasetError, check

    for key in ("data_dir", "storage"):
        if why := uri_problem(getattr(spec, key)):
            raise SpecError(f"{src}: {key}: {why}")
    try:  # a data_dir in object storage: the files are converted in this machine's cache, then published
        check(spec.dataset, on_this_machine(location(spec.data_dir), kind="data"))
    except DatasetError as e:
        raise SpecError(f"{src}: dataset: {e}") from None
    train = {}
    for key, value in spec.train.items():
        if key == "stopping":
            raise SpecError(f"{src}: train.stopping: the stopping policy is a top-level section, 'stopping:'")
        if key not in TrainConfig.field_names():
            raise _unknown(key, TrainConfig.field_names(), f"{src}: train")
        train[key] = _check_type(value, typing.get_type_hints(TrainConfig)[key], f"{src}: train.{key}")
    spec = dataclasses.replace(spec, train=train)
    choices = {"method": METHODS, "backbone": BACKBONES, "optimizer": OPTIMIZERS, "precision": PRECISIONS,
               "pos_embed": POS_EMBEDS, "mlp_norm": MLP_NORMS}
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for key, accepted in choices.items():
        _one_of(train.get(key, defaults[key]), accepted, f"{src}: train.{key}")
    try:  # TrainConfig checks its augment overrides against the method's view recipes
        cfg = spec.train_config()
    except ValueError as e:
        raise SpecError(f"{src}: train.augment: {e}") from None
    for key in ("epochs", "batch_size"):
        _check_positive(getattr(cfg, key), f"{src}: train.{key}")
    if not 0 <= cfg.seed < 2**32:  # numpy's seed range: a negative one fails only in the worker
        raise SpecError(f"{src}: train.seed: {cfg.seed} is out of range; accepted: 0 to 2**32 - 1")
    res = spec.resources
    _check_positive(res.workers, f"{src}: resources.workers")
    if cfg.batch_size % res.workers:
        raise SpecError(f"{src}: train.batch_size {cfg.batch_size} does not divide by resources.workers "
                        f"{res.workers}; use a multiple of {res.workers}")
    _check_positive(res.cpus_per_worker, f"{src}: resources.cpus_per_worker")
    if res.gpus_per_worker < 0 or (res.workers > 1 and 0 < res.gpus_per_worker < 1):
        raise SpecError(f"{src}: resources.gpus_per_worker: {res.gpus_per_worker:g} with {res.workers} workers could "
                        f"put two ranks on one GPU, which NCCL refuses; accepted: 0, or 1 or more per worker (a "
                        f"fraction only with workers: 1)")
    _check_positive(res.driver_cpus, f"{src}: resources.driver_cpus")
    if res.retries < 0:
        raise SpecError(f"{src}: resources.retries: must be >= 0 (0: a lost worker fails its trial), got {res.retries}")
    s = spec.search
    _one_of(s.metric, METRICS, f"{src}: search.metric")
    _one_of(s.mode, ("max", "min"), f"{src}: search.mode")
    _one_of(s.sampler, SAMPLERS, f"{src}: search.sampler")
    _one_of(s.startup, STARTUPS, f"{src}: search.startup")
    # the URL only; whether its database answers is checked at launch (check_storage)
    if s.storage is not None and (why := url_problem(s.storage)):
        raise SpecError(f"{src}: search.storage: {why}")
    _check_positive(s.num_samples, f"{src}: search.num_samples")
    _check_positive(s.startup_trials, f"{src}: search.startup_trials")
    if s.max_concurrent is not None:
        _check_positive(s.max_concurrent, f"{src}: search.max_concurrent")
    hints = typing.get_type_hints(TrainConfig)
    for param in flatten(spec.params):
        where = f"{src}: search.space.{param.name}"
        if param.name not in TrainConfig.field_names() or param.name == "stopping":
            raise _unknown(param.name, TrainConfig.field_names(), f"{src}: search.space")
        for value in param.args if param.kind == "choice" else ():
            _check_type(value, hints[param.name], where)
            if param.name in choices:
                _one_of(value, choices[param.name], where)
            if param.name == "batch_size" and value % res.workers:
                raise SpecError(f"{where}: batch size {value} does not divide by resources.workers {res.workers}; "
                                f"use multiples of {res.workers}")
        if param.kind != "choice" and hints[param.name] not in (float, int, float | None, int | None):
            raise SpecError(f"{where}: a {param.kind} range needs a numeric option; use {{choice: [...]}}")
    if s.sampler == "grid":
        for param in spec.params:
            if param.kind != "choice" or param.when:
                raise SpecError(f"{src}: search.space.{param.name}: the grid sampler needs plain choice lists, "
                                f"got {'conditional branches' if param.when else f'a {param.kind} range'}; "
                                f"use {{choice: [...]}} or sampler tpe/random")
    _one_of(spec.scheduler.type, SCHEDULERS, f"{src}: scheduler.type")
    _check_positive(spec.scheduler.grace_period, f"{src}: scheduler.grace_period")
    if spec.scheduler.reduction_factor < 2:
        raise SpecError(f"{src}: scheduler.reduction_factor: must be >= 2 (a rung keeps 1 / reduction_factor of its "
                        f"trials), got {spec.scheduler.reduction_factor}")
    if spec.evaluate is not None:
        ev = spec.evaluate
        _one_of(ev.protocol, PROTOCOLS, f"{src}: evaluate.protocol")
        for key in ("top", "epochs", "batch_size", "base_lr", "train_subset"):
            if getattr(ev, key) is not None:
                _check_positive(getattr(ev, key), f"{src}: evaluate.{key}")
        if not cfg.export:
            raise SpecError(f"{src}: evaluate: needs the trials' exported backbones, but train.export is false; "
                            f"set train.export: true or remove evaluate")
    _check_tracking(spec.tracking, src)
    if not spec.name or "/" in spec.name:
        raise SpecError(f"{src}: name: {spec.name!r} must be a non-empty name without '/'")
    return spec


def _check_tracking(tracking: Tracking, src: str) -> None:
    """The ``tracking:`` values themselves; whether each tracker answers is checked at launch (study/tracking/)."""
    if tracking.mlflow is not None:
        from urllib.parse import urlsplit

        uri = urlsplit(tracking.mlflow)
        if not uri.scheme:
            raise SpecError(f"{src}: tracking.mlflow: {tracking.mlflow!r} is not a tracking URI; accepted: "
                            f"http(s)://HOST:PORT, sqlite:///abs/path.db, or another URI MLflow takes")
        if uri.password is not None:
            raise SpecError(f"{src}: tracking.mlflow: the URI holds a password, and the study file is saved with the "
                            f"results; set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or "
                            f"MLFLOW_TRACKING_TOKEN) in the environment instead")
    if tracking.wandb is not None:
        _one_of(tracking.wandb.mode, WANDB_MODES, f"{src}: tracking.wandb.mode")
        if tracking.wandb.project is not None and not tracking.wandb.project.strip():
            raise SpecError(f"{src}: tracking.wandb.project: must be a non-empty name (or left out: the study's)")


def resolved(where: str) -> str:
    """A location as the saved study names it: an absolute path (``file://`` dropped), or the bare URI."""
    place = location(where)
    return str(place) if isinstance(place, ObjectPath) else str(place.resolve())


def snapshot(spec: StudySpec) -> dict:
    """The resolved study as a study-file mapping (preset applied, paths absolute): saved next to the results."""
    data = dataclasses.asdict(spec)
    del data["source"]
    data.update(preset=None, preset_scale=1.0, storage=resolved(spec.storage), data_dir=resolved(spec.data_dir))
    if Path(spec.dataset).exists():  # an image folder, not a built-in name
        data["dataset"] = str(Path(spec.dataset).resolve())
    return data


def load_spec(path: str | Path | ObjectPath | None = None) -> StudySpec:
    """Read and validate a study file (the bundled default study when ``path`` is None; a saved study may be in
    object storage)."""
    path = location(path) if path is not None else DEFAULT_STUDY
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: study file not found") from None
    except UnicodeDecodeError as e:
        kind = "a binary file" if b"\0" in path.read_bytes()[:4096] else "not UTF-8 text"
        raise SpecError(f"{path}: {kind} (byte {e.start}); a study file is YAML text in UTF-8") from None
    except OSError as e:
        raise SpecError(f"{path}: cannot read the study file ({e.strerror})") from None
    if not text.strip():
        raise SpecError(f"{path}: the study file is empty; start from {DEFAULT_STUDY}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    data = data if data is not None else {}
    if isinstance(data, dict) and data.get("preset") is not None:
        if data["preset"] not in PRESETS:
            raise SpecError(f"{path}: preset: {data['preset']!r} is not one of: {', '.join(PRESETS)}")
        data = apply_preset(data)
    return validate(dataclasses.replace(_build(StudySpec, data, f"{path}:"), source=str(path)))


def with_default_storage(spec: StudySpec) -> StudySpec:
    """A new study that names no Optuna storage, with the one it gets: SQLite in the study directory on a local
    disk, the journal file there when the directory is on a network file system (SQLite's locks are unreliable on
    NFS). Saved into its study.yaml, so that a study keeps the storage it started with wherever its directory is
    later found: call it for a new study only."""
    if spec.search.storage is None and not spec.remote and is_shared(str(spec.study_dir)):
        # (a study in object storage keeps SQLite on the local disk, mirrored: study/mirror.py)
        return dataclasses.replace(spec, search=dataclasses.replace(spec.search, storage=JOURNAL))
    return spec
