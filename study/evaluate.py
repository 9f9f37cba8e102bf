"""``ssl-study evaluate``: the best trials' exported backbones, frozen, evaluated once more, properly.

The per-epoch kNN that a study searches on is cheap on purpose (a bank subset, a test subset). Here the ``top``
best completed trials (study/best.py's rule) are evaluated by one protocol:

- ``linear``: the paper's linear probe (trainers/linear_probe.py: frozen backbone in eval mode, SGD momentum 0.9,
  cosine per epoch, lr = base_lr x batch / 256, the check that no backbone weight moved); top-1 and top-5;
- ``knn``: weighted kNN (k 20 and 200, T 0.07, trainers/knn.py) of the whole test split against the training
  split (or ``train_subset`` of it); top-1 and top-5, a row per k.

Each trial's evaluation is one Ray task on the cluster Ray is connected to (the one that ran the study, or the
local Ray), with the resources of one of the study's trials: its workers' CPUs (at most a node's), and a GPU (or
the fraction each worker had) where its workers had GPUs. One process evaluates what several workers trained: a
probe of a frozen backbone costs a forward per image and epoch, no backward through it.

Rows go to ``<study_dir>/results/evaluations.parquet`` (schema: study/results/schema.py ``EVALUATIONS_SCHEMA``),
rewritten whole (``files.write_atomic``) as each evaluation ends, so an interrupted run loses only the
evaluations in flight. An evaluation whose rows are in the table (key: trial_id, protocol, settings) is not run
again: a second run evaluates only what the first did not finish.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

from data import store
from study import results
from study.best import ranked
from study.console import err, say
from study.errors import SpecError
from study.results.files import write_atomic
from study.results.schema import EVALUATIONS_SCHEMA, with_version
from study.spec import Evaluate, StudySpec

TABLE = "evaluations"
KS = (20, 200)  # the per-epoch kNN's k (trainers/config.py knn_k) and Wu et al.'s 200
KNN_T = 0.07  # the per-epoch kNN's temperature (trainers/config.py knn_t)
SEED = 0  # the probe head's init and the loader's order; fixed, so that a trial's evaluations compare
KEY = ("trial_id", "protocol", "settings")
SHOWN = ("protocol", "epochs", "k", "lr", "top1", "top5", "seconds", "evaluated_at")  # what the terminal shows


@dataclass(frozen=True)
class Job:
    """One trial's evaluation: what a Ray task runs, and the settings of each row it writes."""

    trial_id: str
    backbone: str  # backbone.safetensors: a path or an object-storage URI
    protocol: str
    settings: tuple[dict, ...]  # one per row: the linear probe's one, or one per k

    def keys(self) -> list[tuple[str, str, str]]:
        return [(self.trial_id, self.protocol, settings_key(s)) for s in self.settings]


def settings_key(settings: dict) -> str:
    """An evaluation's settings as the evaluations table keys its rows (the ``settings`` column)."""
    return json.dumps(settings, sort_keys=True)


def settings(ev: Evaluate, backbone: str) -> tuple[dict, ...]:
    """The settings of the rows an evaluation by ``ev`` of a ``backbone`` (its name) writes."""
    from trainers.registry import RESNETS

    if ev.protocol == "knn":
        return tuple({"k": k, "temperature": KNN_T, "train_subset": ev.train_subset} for k in KS)
    base_lr = ev.base_lr if ev.base_lr is not None else 0.1 if backbone in RESNETS else 3.0  # recipe.md
    return ({"epochs": ev.epochs, "batch_size": ev.batch_size, "base_lr": base_lr,
             "lr": base_lr * ev.batch_size / 256, "train_subset": ev.train_subset, "seed": SEED},)


# ------------------------------------------------------------------------------------------------ the plan


def read_rows(study_dir) -> list[dict]:
    """The study's evaluations table as rows ([] before the first evaluation)."""
    try:
        return results.open(study_dir).table(TABLE).to_pylist()
    except FileNotFoundError:
        return []


def plan(spec: StudySpec, ev: Evaluate, *, strict: bool = True) -> list[Job]:
    """The evaluations of the study's ``ev.top`` best completed trials, best first. Bad input is a SpecError
    before anything runs: a study that exported no backbone, fewer completed trials than ``ev.top``. Without
    ``strict`` (the evaluation at the end of a study) those that exist are planned and the rest is said."""
    if not spec.train_config().export:
        raise SpecError(f"{spec.name}: its trials ran with train.export: false, so none exported a backbone to "
                        f"evaluate; run a study with train.export: true")
    try:
        trials = results.open(spec.study_dir).table("trials").to_pylist()
    except FileNotFoundError:
        trials = []
    metric = spec.search.metric
    done = [r for r in ranked(trials, metric, spec.search.mode) if r["status"] == "completed"]
    if len(done) < ev.top:
        flag, plural = "--top" if strict else "evaluate.top", "s" * (len(done) != 1)
        why = (f"{flag} {ev.top}: the study has {len(done)} completed trial{plural} with a finite {metric}"
               + (f"; give --top {len(done)} or less" if done and strict else ""))
        if strict or not done:
            raise SpecError(why)
        say(f"evaluate: {why}; evaluating those")
    jobs = []
    for row in done[:ev.top]:
        path = store.location(row["checkpoint"]) / "backbone.safetensors" if row["checkpoint"] else None
        if path is None or not path.exists():
            raise SpecError(f"{spec.name}: trial {row['trial_id']} has no exported backbone ({path or 'no checkpoint'}"
                            f"); its study ran with train.export: false or its checkpoint was removed")
        backbone = row.get("backbone") or spec.train_config().backbone  # a column where it was searched
        jobs.append(Job(row["trial_id"], str(path), ev.protocol, settings(ev, backbone)))
    return jobs


def pending(spec: StudySpec, jobs: list[Job]) -> list[Job]:
    """The ``jobs`` whose rows are not all in the table yet."""
    have = {tuple(r[k] for k in KEY) for r in read_rows(spec.study_dir)}
    return [j for j in jobs if not set(j.keys()) <= have]


# ------------------------------------------------------------------------------------------------ one task


def _local(backbone: str, tmp: Path) -> Path:
    """``backbone`` (and its JSON sidecar) on this node's disk: itself when local, else a copy in ``tmp``."""
    path = store.location(backbone)
    if isinstance(path, Path):
        return path
    for part in (path, path.parent / "backbone.json"):
        part.download(tmp / part.name)
    return tmp / path.name


def evaluate_backbone(job: Job, data_paths: dict[str, str], cpus: float, gpu: bool, module=None) -> list[dict]:
    """Run ``job`` in this process (a Ray task's, or any) on ``cpus`` CPUs and a GPU if ``gpu``: its rows, without
    the study column. ``module``: a frozen ``nn.Module`` evaluated in place of the job's exported backbone (a
    baseline such as raw pixels, ``nn.Flatten()``: bench/evaluate_vs_init.py)."""
    import tempfile

    import torch

    from data.convert import read_metadata
    from data.loaders import eval_loader
    from data.remote import local_beton
    from trainers.evaluation import extract
    from trainers.export import load_exported
    from trainers.knn import knn_topk_correct
    from trainers.linear_probe import linear_probe
    from trainers.trainer import DATA_SEED, subset

    threads = max(1, int(cpus))  # what Ray gave this task: a 0.9-CPU trial still needs one thread
    torch.set_num_threads(threads)
    device = torch.device("cuda" if gpu else "cpu")  # Ray shows a task the GPUs it was given
    tic = time.perf_counter()
    if module is None:
        with tempfile.TemporaryDirectory() as tmp:
            backbone = load_exported(_local(job.backbone, Path(tmp))).to(device)
    else:
        backbone = module.to(device)
    train, test = Path(local_beton(data_paths["train_path"])), Path(local_beton(data_paths["test_path"]))
    meta = read_metadata(train)
    # the same fixed subset as the per-epoch kNN's bank (trainers/trainer.py) when the sizes agree
    indices = subset(job.settings[0]["train_subset"], meta["count"], DATA_SEED + 1)
    if job.protocol == "linear":
        s = job.settings[0]
        out = linear_probe(backbone, train, test, epochs=s["epochs"], batch_size=s["batch_size"],
                           base_lr=s["base_lr"], num_workers=threads, seed=s["seed"], device=device,
                           train_indices=indices)
        scores = [(out["top1"], out["top5"])]
    else:
        backbone.eval()
        loader = {"batch_size": 256, "crop_ratio": 1.0, "num_workers": threads, "device": device}  # as the
        bank, bank_labels = extract(backbone, eval_loader(train, indices=indices, **loader), gather=False)
        feats, labels = extract(backbone, eval_loader(test, **loader), gather=False)  # per-epoch kNN's
        counts = knn_topk_correct(feats, labels, bank, bank_labels, meta["num_classes"],
                                  [s["k"] for s in job.settings], temperature=KNN_T)
        scores = [(top1 / len(labels), top5 / len(labels))
                  for top1, top5 in (counts[min(s["k"], len(bank))] for s in job.settings)]
    seconds = time.perf_counter() - tic
    now = datetime.now(UTC).replace(microsecond=0)
    return [{"trial_id": job.trial_id, "protocol": job.protocol, "settings": settings_key(s), "epochs": s.get("epochs"),
             "k": s.get("k"), "lr": s.get("lr"), "top1": top1, "top5": top5, "seconds": seconds,
             "evaluated_at": now}
            for s, (top1, top5) in zip(job.settings, scores, strict=True)]


# ------------------------------------------------------------------------------------------------ on Ray


def task_resources(spec: StudySpec, nodes: list[dict[str, float]]) -> dict[str, float]:
    """One trial's resources for one process: its workers' CPUs (at most the largest of ``nodes``'s, where a
    trial's workers spread over nodes), and one GPU where its workers had one each (the fraction where its one
    worker had a fraction)."""
    r = spec.resources
    largest = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    return {"num_cpus": min(r.workers * r.cpus_per_worker, max(largest, r.cpus_per_worker)),
            "num_gpus": min(1.0, r.gpus_per_worker)}


def write(spec: StudySpec, rows: list[dict]) -> None:
    """Add ``rows`` to the evaluations table (a row of the same key replaced), rewritten atomically."""
    merged = {tuple(r[k] for k in KEY): r for r in [*read_rows(spec.study_dir), *rows]}
    table = pa.Table.from_pylist([{**r, "study": spec.name} for r in merged.values()],
                                 schema=with_version(EVALUATIONS_SCHEMA, TABLE))
    write_atomic(table, spec.study_dir / "results" / f"{TABLE}.parquet")


def run(spec: StudySpec, jobs: list[Job], data_paths: dict[str, str]) -> list[str]:
    """Run ``jobs`` as Ray tasks on the connected cluster, as many at once as it holds; each one's rows are
    written as it ends. Returns the trial ids whose evaluation failed (each said on stderr, its traceback in
    ``logs/<trial_id>-evaluate.log``)."""
    import ray

    from study.cluster import cluster_nodes

    resources = task_resources(spec, cluster_nodes())
    task = ray.remote(evaluate_backbone)
    futures = {task.options(name=f"evaluate {job.protocol} {job.trial_id}", max_retries=spec.resources.retries,
                            **resources).remote(job, data_paths, resources["num_cpus"], resources["num_gpus"] > 0): job
               for job in jobs}
    failed = []
    while futures:
        [ready], _ = ray.wait(list(futures), num_returns=1)
        job = futures.pop(ready)
        try:
            rows = ray.get(ready)
        except ray.exceptions.RayError as e:  # the task raised (its error is the last line), or was lost
            log = spec.study_dir / "logs" / f"{job.trial_id}-evaluate.log"
            store.append_text(log, f"{job.protocol} evaluation of trial {job.trial_id} failed\n\n"
                                   f"{traceback.format_exc()}\n")
            print(f"ssl-study: error: {job.protocol} evaluation of trial {job.trial_id} failed: "
                  f"{(str(e).strip().splitlines() or [type(e).__name__])[-1]} (full log: {log})", file=err())
            failed.append(job.trial_id)
            continue
        write(spec, rows)
        say(f"evaluated trial {job.trial_id}: " + describe(rows))
    return failed


# ------------------------------------------------------------------------------------------------ shown


def describe(rows: list[dict]) -> str:
    """One trial's evaluation rows in a line: ``linear 90 epochs: top-1 0.7123, top-5 0.9811 (35 s); ...``."""
    def what(r: dict) -> str:
        return f"{r['protocol']} {r['epochs']} epochs" if r["protocol"] == "linear" else f"{r['protocol']} k {r['k']}"

    return "; ".join(f"{what(r)}: top-1 {r['top1']:.4f}, top-5 {r['top5']:.4f} ({r['seconds']:.0f} s)"
                     for r in rows)


def of_trial(rows: list[dict], trial_id: str) -> list[dict]:
    return [r for r in rows if r["trial_id"] == trial_id]


def table_of(spec: StudySpec, jobs: list[Job]) -> pa.Table:
    """The evaluations table's rows of ``jobs``' trials (every protocol), in the jobs' order."""
    order = {j.trial_id: i for i, j in enumerate(jobs)}
    rows = sorted((r for r in read_rows(spec.study_dir) if r["trial_id"] in order),
                  key=lambda r: order[r["trial_id"]])
    return pa.Table.from_pylist(rows, schema=EVALUATIONS_SCHEMA)
