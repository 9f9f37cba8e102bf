"""Does the driver keep up with a study of thousands of trials? (issue 15 §5)

Drives the real results writer (study/results/writer.py ``ResultsWriter``, through the Tune callback hooks the driver
calls) and the project's real Optuna sampler (study/search.py ``sampler``: TPE, multivariate, constant liar;
ask / tell on an in-memory or SQLite storage) with a cheap fake trial stream: no Ray cluster, no training.
``--trials`` trials of ``--epochs`` epochs each, ``--concurrent`` running at once; at each step one running trial
(picked at random, as results reach Tune's loop) reports its next epoch, with an instability event now and
then; one trial in 100 is restarted from a checkpoint (it reports an old epoch again), one in 200 fails. A
trial that ends is told to Optuna and a new one is asked for.

The trials are real ``ray.tune.experiment.Trial`` objects (stubs, as Tune's driver holds them) whose folder is
a plain directory (``local_path``: Tune's is under the Ray session's folder, which takes a running Ray), so a
failed trial's error file is written and read as in a study.

Printed: the writer's time per reported epoch (``on_trial_result``) over the first and the last 100 reports,
the writer's time per report over windows of reports with every hook in them (trial ends included), the time
of the trial-end hooks (first / last 100), what was written (rows and files per table, merges), the peak
RSS of this process, Optuna's ask and tell times (first / last 100 trials), the read-back time and the total.

    .venv/bin/python bench/driver_scale.py              # 2,000 trials x 50 epochs
    .venv/bin/python bench/driver_scale.py --quick      # 200 x 10
    .venv/bin/python bench/driver_scale.py --checkpoint-every 1 --epoch-s 12   # a study's pace and checkpoints
    .venv/bin/python bench/driver_scale.py --trials 500 --epochs 20 --optuna sqlite --keep
"""

from __future__ import annotations

import argparse
import math
import random
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import optuna
from ray.tune.experiment import Trial

from search_spaces.space import sample
from study import results
from study.results.writer import ResultsWriter
from study.search import sampler
from study.spec import Resources, Search, StudySpec

SPACE = {"base_lr": {"log": [1.0e-5, 1.0e-2]}, "weight_decay": {"log": [1.0e-3, 0.3]},
         "warmup_epochs": {"int": [0, 10]}, "batch_size": {"choice": [128, 256, 512]},
         "temperature": {"uniform": [0.05, 0.5]}}


class LocalTrial(Trial):
    """A real Tune trial whose folder is a plain directory (see the module docstring)."""

    folder: str | None = None

    @property
    def local_path(self) -> str | None:
        return self.folder


class SimClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def mean_ms(values: list[float]) -> float:
    return 1000 * statistics.fmean(values) if values else math.nan


def curve(config: dict, epoch: int, rng: random.Random) -> dict:
    """A made-up learning curve: better near base_lr 1e-3, noisy."""
    quality = math.exp(-abs(math.log10(config["base_lr"]) + 3.0))
    knn = 0.1 + 0.8 * quality * (1 - math.exp(-epoch / 8)) + rng.gauss(0, 0.01)
    return {"loss": 6.0 - 4.0 * quality * epoch / (epoch + 5) + rng.gauss(0, 0.02), "knn_top1": knn,
            "knn_top1_k200": knn - 0.01, "knn_top1_init": 0.1, "rankme": 50.0 + epoch, "lr": config["base_lr"],
            "images_per_s": 5000.0, "step_time_s": 0.05, "epoch_time_s": 12.0, "spike_count": 0.0,
            "spike_episodes": 0.0, "max_spike_ratio": 1.0, "knn_dip_count": 0.0}


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    root = Path(args.out or tempfile.mkdtemp(prefix="ssl-study-driver-scale-"))
    spec = StudySpec(name="driver-scale", storage=str(root / "runs"), train={"epochs": args.epochs},
                     search=Search(space=SPACE, num_samples=args.trials, max_concurrent=args.concurrent, seed=0),
                     resources=Resources(workers=1, cpus_per_worker=1.0))
    storage = (optuna.storages.InMemoryStorage() if args.optuna == "memory"
               else optuna.storages.RDBStorage(f"sqlite:///{root / 'optuna.db'}"))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=spec.name, storage=storage, sampler=sampler(spec), direction="maximize")
    params = tuple(spec.params)
    # The writer's throttles (a part every 2 s, trials.parquet at most every 1 s) run on its clock: the real one
    # by default (the stream goes as fast as it can: ~10^4 reports/s), or a simulated one that moves
    # epoch_s / concurrent per report (the pace of trials whose epochs take epoch_s seconds).
    sim = SimClock()
    writer = ResultsWriter(spec, **({"clock": sim} if args.epoch_s else {}))
    rng = random.Random(0)

    ask_s, tell_s, report_s, end_s = [], [], [], []
    window_s: list[float] = []  # writer time of each report plus the hooks that came after it
    running: dict[str, tuple[LocalTrial, optuna.Trial, list[int]]] = {}
    asked = reported = 0
    steady = None  # reports done when the last trial was asked for: after it, the running trials drain

    def start_one() -> None:
        nonlocal asked
        t = time.perf_counter()
        ot = study.ask()
        config = sample(ot, params)
        ask_s.append(time.perf_counter() - t)
        tid = f"trial_{asked:05d}"
        trial = LocalTrial("fn", config=config, trial_id=tid, stub=True)
        trial.folder = str(root / "trials" / tid)
        plan = list(range(1, args.epochs + 1))
        if asked % 100 == 50 and args.epochs >= 4:  # restarted from its checkpoint of epoch e - 2
            e = args.epochs // 2
            plan = plan[:e] + list(range(e - 1, args.epochs + 1))
        fails = asked % 200 == 199
        running[tid] = (trial, ot, plan if not fails else [*plan[:max(1, len(plan) // 3)], -1])
        asked += 1

    for _ in range(min(args.concurrent, args.trials)):
        start_one()
    while running:
        tid = rng.choice(list(running))
        trial, ot, plan = running[tid]
        epoch = plan.pop(0)
        hooks = 0.0
        if epoch == -1:  # it raises: Tune calls on_trial_error
            Path(trial.folder).mkdir(parents=True, exist_ok=True)
            trial.handle_error(RuntimeError(f"{tid}: CUDA error: an illegal memory access was encountered"))
            t = time.perf_counter()
            writer.on_trial_error(0, [], trial)
            hooks += time.perf_counter() - t
            end_s.append(hooks)
            t = time.perf_counter()
            study.tell(ot, state=optuna.trial.TrialState.FAIL)
            tell_s.append(time.perf_counter() - t)
            del running[tid]
        else:
            sim.t += args.epoch_s / args.concurrent
            result = {"epoch": epoch, "training_iteration": epoch, "time_total_s": 12.0 * epoch,
                      **curve(trial.config, epoch, rng)}
            if args.checkpoint_every and (epoch % args.checkpoint_every == 0 or epoch == args.epochs):
                result["checkpoint_path"] = f"{root}/train/{tid}/checkpoint_{epoch:06d}"  # as TuneReportCallback
            if rng.random() < 0.02:
                result["events"] = [{"step": epoch * 100 + k, "epoch": epoch, "kind": "loss_spike",
                                     "layer": f"blocks.{k}", "magnitude": 4.0 + k} for k in range(rng.randint(1, 3))]
            trial.update_last_result(result)
            t = time.perf_counter()
            writer.on_trial_result(0, [], trial, result)
            dt = time.perf_counter() - t
            if reported:
                report_s.append(dt)
            else:  # the first hook loads the tables there are (none) and writes the empty compacted files
                first_report_s = dt
            reported += 1
            if not plan:
                t = time.perf_counter()
                writer.on_trial_complete(0, [], trial)
                hooks += time.perf_counter() - t
                end_s.append(hooks)
                t = time.perf_counter()
                study.tell(ot, result["knn_top1"])
                tell_s.append(time.perf_counter() - t)
                del running[tid]
            window_s.append(dt if len(window_s) else 0.0)
            window_s[-1] += hooks
        if tid not in running and asked < args.trials:  # a trial ended: Tune starts the next one
            start_one()
            if asked == args.trials:
                steady = len(window_s)
        if reported % 5000 == 0 and reported and not args.silent:
            print(f"  ... {reported} reports, {asked} trials, {time.perf_counter() - started:.0f} s, "
                  f"RSS {rss_mb():.0f} MB", flush=True)
    loop_s = time.perf_counter() - started

    t = time.perf_counter()
    writer.on_experiment_end([])
    end_of_experiment_s = time.perf_counter() - t
    t = time.perf_counter()
    epochs = results.open(spec.study_dir).table("epochs")
    trials = results.open(spec.study_dir).table("trials")
    read_s = time.perf_counter() - t
    files = sorted(p.name for p in (spec.study_dir / "results").iterdir())
    out = {
        "trials": args.trials, "epochs": args.epochs, "concurrent": args.concurrent, "reports": reported,
        "checkpoint_every": args.checkpoint_every, "epoch_s": args.epoch_s,
        "report_first_ms": mean_ms(report_s[:100]), "report_last_ms": mean_ms(report_s[-100:]),
        "report_p99_ms": 1000 * sorted(report_s)[int(0.99 * len(report_s))] if report_s else math.nan,
        "first_report_ms": 1000 * first_report_s,
        "window100_first_ms": mean_ms(window_s[:100]), "window100_last_ms": mean_ms(window_s[-100:]),
        "window100_steady_ms": mean_ms(window_s[max(0, (steady or len(window_s)) - 100):steady]),
        "window2000_first_ms": mean_ms(window_s[:2000]), "window2000_last_ms": mean_ms(window_s[-2000:]),
        "end_first_ms": mean_ms(end_s[:100]), "end_last_ms": mean_ms(end_s[-100:]),
        "writer_total_s": sum(window_s), "ask_first_ms": mean_ms(ask_s[:100]), "ask_last_ms": mean_ms(ask_s[-100:]),
        "tell_first_ms": mean_ms(tell_s[:100]), "tell_last_ms": mean_ms(tell_s[-100:]), "optuna_total_s":
        sum(ask_s) + sum(tell_s), "loop_s": loop_s, "end_of_experiment_s": end_of_experiment_s, "read_s": read_s,
        "epoch_rows": epochs.num_rows, "trial_rows": trials.num_rows, "files": files, "stats": writer.stats,
        "peak_rss_mb": rss_mb(), "total_s": time.perf_counter() - started, "root": str(root),
    }
    if not args.keep and not args.out:
        shutil.rmtree(root, ignore_errors=True)
    return out


def report(r: dict) -> None:
    s = r["stats"]
    print(f"driver scale: {r['trials']} trials x {r['epochs']} epochs, {r['concurrent']} at once: "
          f"{r['reports']} reports; checkpoint every {r['checkpoint_every'] or '-'} epochs; writer clock "
          + (f"simulated, {r['epoch_s']:g} s per epoch" if r["epoch_s"] else "real (reports as fast as they go)"))
    print(f"  writer per report (on_trial_result): first 100 {r['report_first_ms']:.3f} ms, last 100 "
          f"{r['report_last_ms']:.3f} ms (x{r['report_last_ms'] / r['report_first_ms']:.2f}), "
          f"p99 {r['report_p99_ms']:.3f} ms (the very first, which loads: {r['first_report_ms']:.1f} ms)")
    print(f"  writer per report, trial ends included: first 100 reports {r['window100_first_ms']:.3f} ms, last 100 "
          f"{r['window100_last_ms']:.3f} ms (the last trials ending), last 100 before the last trial started "
          f"{r['window100_steady_ms']:.3f} ms; first / last 2000 {r['window2000_first_ms']:.3f} / "
          f"{r['window2000_last_ms']:.3f} ms (x{r['window2000_last_ms'] / r['window2000_first_ms']:.2f})")
    print(f"  writer per trial end (on_trial_complete / on_trial_error: part + trials.parquet written): "
          f"first 100 {r['end_first_ms']:.2f} ms, last 100 {r['end_last_ms']:.2f} ms")
    print(f"  writer total {r['writer_total_s']:.1f} s; experiment end (compaction) {r['end_of_experiment_s']:.2f} s; "
          f"read back {r['epoch_rows']} epoch rows + {r['trial_rows']} trial rows in {r['read_s']:.2f} s")
    print(f"  written: rows {s['rows']}, files {s['files']}, {s['merges']} merges, {s['compactions']} compactions, "
          f"{s['files_read']} files read back; left: {', '.join(r['files'])}")
    print(f"  optuna ask per trial: first 100 {r['ask_first_ms']:.2f} ms, last 100 {r['ask_last_ms']:.2f} ms; tell "
          f"{r['tell_first_ms']:.2f} / {r['tell_last_ms']:.2f} ms; optuna total {r['optuna_total_s']:.1f} s")
    print(f"  peak RSS {r['peak_rss_mb']:.0f} MB; total wall time {r['total_s']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--concurrent", type=int, default=16, help="trials running at once")
    ap.add_argument("--checkpoint-every", type=int, default=0,
                    help="results with a checkpoint every N epochs (0: none; a study's default is 1)")
    ap.add_argument("--epoch-s", type=float, default=0.0,
                    help="simulated seconds per epoch for the writer's throttles (0: the real clock)")
    ap.add_argument("--quick", action="store_true", help="200 trials x 10 epochs")
    ap.add_argument("--optuna", choices=("memory", "sqlite"), default="memory", help="Optuna storage")
    ap.add_argument("--out", help="folder for the study (default: a temporary folder, removed after)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--silent", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    if args.quick:
        args.trials, args.epochs = 200, 10
    report(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
