"""The ``ssl-study`` command line.

    ssl-study launch [SPEC] [--dry-run] [--address ADDR]     run a study (default: the bundled one)
    ssl-study resume NAME                                      continue an interrupted study
    ssl-study extend NAME --trials N                           add trials, warm-started from the Optuna storage
    ssl-study status NAME                                      trials by status, best so far, running ones
    ssl-study best NAME                                        config, metrics and checkpoint of the best trial
    ssl-study evaluate NAME [--top K] [--protocol linear|knn] [--epochs N]   the K best trials' backbones, frozen:
                                                               linear probe or full kNN (evaluations table)
    ssl-study results NAME|ROOT [--where EXPR] [--sort COL] [--columns ...] [--format table|csv|json|parquet]
    ssl-study report NAME [--params A B]                       PNG figures and an HTML page of the results
    ssl-study submit SPEC --address http://HEAD:8265           run a study on a cluster as a Ray Job
    ssl-study convert SOURCE OUT [--write-mode ...]            an image folder or built-in set -> FFCV files
    ssl-study replay [RECORD] [--sampler ...] [--scheduler ...] [--stopping ...] [--policy KEY=VALUE ...] [--seeds N]
                                                               replay a finished observe-mode study (or the
                                                               shipped record) under other search settings

NAME is a study directory or a study name under ``--storage`` (default ``runs``). Bad input exits with code 2
and a one-line message naming the file, key or value, before any Ray resource is spent. While a study runs, the
terminal shows only its progress lines and failed trials; Ray's output goes to ``<study dir>/logs/ray.log``
(``--verbose``: to the terminal instead).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from data import store
from data.errors import DatasetError
from study import DEFAULT_STUDY, results
from study.best import best_trial
from study.console import format_table
from study.errors import QueryError, SpecError
from study.results.schema import ALL_TABLES, SUMMARY_COLUMNS

if TYPE_CHECKING:
    from study.spec import StudySpec


class UsageError(ValueError):
    """A command line argparse refuses (shown in one line, like every other bad input)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's own prints the usage block and exits; main prints one line
        raise UsageError(f"{message}; `{self.prog} --help` shows the usage")


def _at_least(least: int):
    """An argparse type: an integer of at least ``least``."""
    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}")
        return value
    return integer




def describe(spec: StudySpec, address: str | None) -> str:
    """The resolved study, as ``launch --dry-run`` prints it."""
    from search_spaces import flatten
    from study import cluster, tracking

    def space(params, indent="    ") -> list[str]:
        lines = []
        for p in params:
            lines.append(f"{indent}{p.name} ~ {p.kind} {list(p.args)}")
            for value, branch in p.when:
                lines.append(f"{indent}  when {p.name} = {value}:")
                lines += space(branch, indent + "    ")
        return lines

    from trainers.config import recipe_defaults

    r, s, cfg = spec.resources, spec.search, spec.train_config()
    need = r.per_trial()
    recipe = {k: v for k, v in recipe_defaults(cfg.backbone, cfg.method).items() if k not in spec.train}
    if s.max_concurrent is not None:
        concurrency = f"{s.max_concurrent} at a time"
    elif address:
        concurrency = "as many at a time as the cluster holds (counted when it joins)"
    else:
        concurrency = f"{cluster.concurrency(spec, cluster.local_nodes())} at a time (what this machine holds)"
    tune_note = f"; searching {', '.join(p.name for p in flatten(spec.params))}" if spec.params else ""
    start = (f" after {s.startup_trials} {'Sobol-design' if s.startup == 'sobol' else 'random'} trials"
             if s.sampler == "tpe" else "")
    return "\n".join([
        f"study {spec.name} from {spec.source}" + (f" (preset {spec.preset})" if spec.preset else ""),
        f"  train: {cfg.method} on {cfg.backbone}, {spec.dataset}, {cfg.epochs} epochs, batch {cfg.batch_size} "
        f"({cfg.batch_size // r.workers} per worker), {cfg.optimizer}{tune_note}",
        *([f"  recipe: {cfg.backbone}'s, for what the file leaves out: "
           + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in recipe.items())]
          if recipe else []),
        "  space:", *space(spec.params),
        f"  search: {s.sampler}{start} (seed {s.seed}) for {s.metric} ({s.mode}), {s.num_samples} trials, "
        f"{concurrency}",
        f"  scheduler: {spec.scheduler.type}" + (f" (grace {spec.scheduler.grace_period} epochs, reduction "
                                                 f"{spec.scheduler.reduction_factor})"
                                                 if spec.scheduler.type == "asha" else ""),
        *([f"  evaluate: the {spec.evaluate.top} best trials at the end, {_protocol(spec.evaluate)}"]
          if spec.evaluate else []),
        f"  stopping: {spec.stopping.mode} (grace {spec.stopping.grace_epochs} epochs, false alarms "
        f"{spec.stopping.alpha:g} per epoch and detector; spikes > {spec.stopping.spike_threshold:g}x median, at "
        f"most {spec.stopping.max_spikes} episodes and {spec.stopping.max_dips} dense dips per epoch, kNN drop "
        f"<= {spec.stopping.max_knn_drop:g} beyond its noise)",
        f"  per trial: {r.workers} workers x ({r.cpus_per_worker:g} CPU, {r.gpus_per_worker:g} GPU) + "
        f"{r.driver_cpus:g} CPU driver = {need['CPU']:g} CPU, {need['GPU']:g} GPU",
        f"  results: {spec.study_dir} (results/*.parquet, train/<trial>/ checkpoints)",
        f"  optuna:  {spec.optuna_url}",
        f"  ray:     {address or 'a local Ray started in this process'}",
        *(f"  {line}" for line in tracking.where(spec)),
    ])


def _protocol(ev) -> str:
    if ev.protocol == "knn":
        return "weighted kNN at k 20 and 200"
    return f"linear probe ({ev.epochs} epochs, batch {ev.batch_size})"


def print_summary(spec: StudySpec, trials) -> None:
    from study import evaluate, tracking

    columns = ["trial_id", SUMMARY_COLUMNS[0], *(p.name for p in spec.params), *SUMMARY_COLUMNS[1:]]
    print(f"\n{format_table(trials, columns)}\n")
    evaluations = evaluate.read_rows(spec.study_dir)
    for trial_id in dict.fromkeys(r["trial_id"] for r in evaluations):
        print(f"evaluated {trial_id}: {evaluate.describe(evaluate.of_trial(evaluations, trial_id))}")
    print(f"Parquet results: {spec.study_dir / 'results'} (trials, epochs, events"
          f"{', evaluations' if evaluations else ''})")
    print(f"Optuna storage:  {spec.optuna_url}")
    for line in tracking.where(spec):
        print(line)


def launch(args: argparse.Namespace) -> int:
    from study.spec import load_spec

    spec = load_spec(args.spec)  # validated whole before Ray starts
    from study import cluster, runner, tracking  # heavy imports (Ray, torch) only once the spec is known good

    if args.dry_run:
        if not args.address:  # a real launch checks in cluster.connect, before Ray starts
            cluster.check_fits(spec, cluster.local_nodes(), "this machine")
        from study.optuna_storage import check_storage
        from study.spec import with_default_storage

        runner.check_locations(spec)  # as runner.run_study does, before Ray starts: buckets writable,
        spec = with_default_storage(spec)  # the Optuna storage it would use, reachable
        check_storage(spec)
        tracking.check(spec)  # the trackers, reachable
        print(describe(spec, args.address))
        return 0
    print_summary(spec, runner.run_study(spec, address=args.address, verbose=args.verbose))
    return 0


def resume(args: argparse.Namespace) -> int:
    from study import runner

    spec = runner.open_study(args.name, args.storage)
    print_summary(spec, runner.resume_study(spec, address=args.address, verbose=args.verbose))
    return 0


def extend(args: argparse.Namespace) -> int:
    from study import runner

    spec = runner.open_study(args.name, args.storage)
    print_summary(spec, runner.extend_study(spec, args.trials, address=args.address, verbose=args.verbose))
    return 0


def _open(args: argparse.Namespace) -> StudySpec:
    from study import runner

    return runner.open_study(args.name, args.storage)


def _trials(spec: StudySpec):
    try:
        return results.open(spec.study_dir).table("trials")
    except FileNotFoundError:
        return None


def _best(spec: StudySpec, rows: list[dict]) -> dict | None:
    return best_trial(rows, spec.search.metric, spec.search.mode)


def status(args: argparse.Namespace) -> int:
    from collections import Counter

    from study import runner

    spec = runner.open_study(args.name, args.storage)
    table = _trials(spec)
    rows = table.to_pylist() if table is not None else []
    counts = Counter(r["status"] for r in rows)
    print(f"study {spec.name} ({spec.study_dir}): {len(rows)} of {spec.search.num_samples}+ trials reported; "
          + (", ".join(f"{n} {s}" for s, n in counts.most_common()) or "nothing yet"))
    if best := _best(spec, rows):
        print(f"  best {spec.search.metric}: {best[spec.search.metric]:.4g} (trial {best['trial_id']}, "
              f"{best['status']}, epoch {best['epochs_done']})")
        from study import evaluate

        if evaluated := evaluate.of_trial(evaluate.read_rows(spec.study_dir), best["trial_id"]):
            print(f"  evaluated {best['trial_id']}: {evaluate.describe(evaluated)}")
    results_file = spec.study_dir / "results" / "trials.parquet"
    for r in rows:
        if r["status"] == "running":
            age = time.time() - store.mtime(results_file)
            print(f"  running {r['trial_id']}: epoch {r['epochs_done']}/{spec.train_config().epochs}, "
                  f"{spec.search.metric} {r[spec.search.metric]:.4g} (results updated {age:.0f} s ago; if the "
                  f"driver is gone, `ssl-study resume {spec.name}`)")
    return 0


def best(args: argparse.Namespace) -> int:
    from study import evaluate, runner

    spec = runner.open_study(args.name, args.storage)
    table = _trials(spec)
    row = _best(spec, table.to_pylist() if table is not None else [])
    if row is None:
        print(f"study {spec.name}: no trial has a finite {spec.search.metric} yet", file=sys.stderr)
        return 1
    params = {p.name: row.get(p.name) for p in spec.params}
    export = store.location(row["checkpoint"]) / "backbone.safetensors" if row["checkpoint"] else None
    evaluated = [{"protocol": r["protocol"], "settings": json.loads(r["settings"]),
                  **{k: r[k] for k in ("top1", "top5", "seconds", "evaluated_at")}}
                 for r in evaluate.of_trial(evaluate.read_rows(spec.study_dir), row["trial_id"])]
    print(json.dumps({
        "study": spec.name, "trial_id": row["trial_id"], "status": row["status"], "params": params,
        "config": spec.trial_config(row).as_dict(),
        "metrics": {k: row[k] for k in SUMMARY_COLUMNS if k not in ("status", "verdict", "time_total_s")},
        "checkpoint": row["checkpoint"],
        "backbone": str(export) if export and export.exists() else None,
        **({"evaluations": evaluated} if evaluated else {}),
    }, indent=2, default=str))
    return 0


def evaluate_cmd(args: argparse.Namespace) -> int:
    from study import evaluate, runner
    from study.spec import Evaluate

    if args.base_lr is not None and not args.base_lr > 0:
        raise SpecError(f"--base-lr: must be > 0, got {args.base_lr:g}")
    ev = Evaluate(top=args.top, protocol=args.protocol, epochs=args.epochs, batch_size=args.batch_size,
                  base_lr=args.base_lr, train_subset=args.train_subset)
    spec = runner.open_study(args.name, args.storage)
    jobs, failed = runner.evaluate_study(spec, ev, address=args.address, verbose=args.verbose)
    print(f"\n{format_table(evaluate.table_of(spec, jobs), ['trial_id', *evaluate.SHOWN])}")
    return 1 if failed else 0


def results_cmd(args: argparse.Namespace) -> int:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from study.query import parse_where

    root = store.location(args.name)
    if "://" not in args.name and not root.exists():
        root = store.location(args.storage) / args.name
    try:
        res = results.open(root)
    except FileNotFoundError:
        raise SpecError(f"{args.name}: no results (looked for {root}/results/ and {root}/*/results/); give a study "
                        f"directory, a study name under --storage or a folder holding study directories") from None
    dataset = getattr(res, args.table)
    names = dataset.schema.names
    for column in [*(args.columns or []), *([args.sort.lstrip("-")] if args.sort else [])]:
        if column not in names:
            raise SpecError(f"--columns/--sort: unknown column '{column}'; columns: {', '.join(names)}")
    where = parse_where(args.where, dataset.schema) if args.where else None
    columns = list(dict.fromkeys(args.columns)) if args.columns else None  # Arrow refuses a column asked twice
    table = dataset.to_table(filter=where, columns=columns)
    if args.sort:
        descending = args.desc or args.sort.startswith("-")
        table = table.sort_by([(args.sort.lstrip("-"), "descending" if descending else "ascending")])
    if args.format == "table":
        print(format_table(table))
    elif args.format == "csv":
        pacsv.write_csv(table, sys.stdout.buffer)
    elif args.format == "json":
        print(json.dumps(table.to_pylist(), indent=1, default=str))
    else:
        if not args.output:
            raise SpecError("--format parquet: give --output FILE")
        try:
            pq.write_table(table, args.output)
        except OSError as e:
            raise SpecError(f"--output {args.output!r}: cannot write it ({os.strerror(e.errno) if e.errno else e}); "
                            f"give a file in a folder that exists") from None
    return 0


def _policy_overrides(items: list[str]) -> dict:
    from trainers.policy import StopPolicy

    fields = StopPolicy.__dataclass_fields__
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields or key == "mode":
            raise SpecError(f"--policy {item!r}: expected KEY=VALUE with KEY one of: "
                            f"{', '.join(k for k in fields if k != 'mode')}")
        kind = int if fields[key].type in ("int", int) else float
        try:
            out[key] = kind(value)
        except ValueError:
            raise SpecError(f"--policy {key}: expected {kind.__name__}, got {value!r}") from None
    return out


def add_replay_arguments(rp: argparse.ArgumentParser) -> None:
    """``ssl-study replay``'s options: a study file's search, scheduler and stopping keys, with its defaults."""
    from study.spec import SAMPLERS, SCHEDULERS, STARTUPS, Scheduler, Search
    from trainers.policy import STOP_MODES, StopPolicy

    search, scheduler = Search(), Scheduler()
    rp.add_argument("name", nargs="?", default="mocov3-fmnist-grid",
                    help="a finished observe-mode study (directory or name under --storage) or a shipped record "
                         "under bench/records/ (default: mocov3-fmnist-grid)")
    rp.add_argument("--storage", default="runs")
    rp.add_argument("--sampler", choices=SAMPLERS, default=search.sampler)
    rp.add_argument("--startup", choices=STARTUPS, default=search.startup,
                    help="how TPE's first trials are drawn: random, or a Sobol design")
    rp.add_argument("--startup-trials", type=_at_least(0), default=search.startup_trials,
                    help="TPE's first trials, before it models")
    rp.add_argument("--scheduler", choices=SCHEDULERS, default=scheduler.type)
    rp.add_argument("--grace-period", type=_at_least(1), default=scheduler.grace_period,
                    help="ASHA: epochs before the first rung")
    rp.add_argument("--reduction-factor", type=_at_least(2), default=scheduler.reduction_factor,
                    help="ASHA / Hyperband: keep 1/N at each rung")
    rp.add_argument("--stopping", choices=STOP_MODES, default=StopPolicy().mode,
                    help="the instability policy's mode in the replay")
    rp.add_argument("--policy", nargs="+", metavar="KEY=VALUE",
                    help="override the recorded stopping settings (detectors too, where the record has traces)")
    rp.add_argument("--metric", choices=("knn_top1", "rankme"), default=search.metric)
    rp.add_argument("--constraints", action=argparse.BooleanOptionalAction, default=search.constraints,
                    help="stopped or flagged trials as constraint violations")
    rp.add_argument("--seeds", type=_at_least(1), default=1,
                    help="replay seeds (sampler seed and which recorded seed plays)")
    rp.add_argument("--trials", type=_at_least(1), default=None,
                    help="at most this many trials (default: until the budget)")
    rp.add_argument("--budget", type=float, default=1.0, help="compute budget as a fraction of the grid's")


def replay_cmd(args: argparse.Namespace) -> int:
    from study import replay

    record = replay.load_record(args.name, args.storage)  # a one-line error for a missing or unfit record
    strategy = replay.Strategy(name=f"{args.sampler}-{args.scheduler}-{args.stopping}", sampler=args.sampler,
                               scheduler=args.scheduler, stopping=args.stopping,
                               policy=_policy_overrides(args.policy or []), metric=args.metric,
                               constraints=args.constraints, startup_trials=args.startup_trials,
                               startup=args.startup, grace_period=args.grace_period,
                               reduction_factor=args.reduction_factor)
    if not 0 < args.budget <= 10:
        raise SpecError(f"--budget: a fraction of the grid's compute in (0, 10], got {args.budget:g}")
    replay.replay_spec(record, strategy, 1, 0, Path("."))  # checks the policy before Ray starts
    from study import cluster

    grid = len(record.runs) * record.epochs
    best = record.best_cell()
    print(f"record {record.name}: {sum(len(r) for r in record.runs.values())} runs in {len(record.runs)} cells "
          f"({', '.join(record.axes)}), {record.epochs} epochs each; the grid costs {grid} epochs "
          f"({record.seconds / 3600:.2f} h recorded); best cell {_cell(record, best)}: mean final kNN "
          f"{record.truth(best):.4f}")
    # a replay keeps no study directory: its log goes to a folder of its own
    log = None if args.verbose else Path(tempfile.mkdtemp(prefix="ssl-study-replay-")) / "ray.log"
    with cluster.ray_session(log, object_store_memory=128 * 2**20):
        outcomes = [replay.replay(record, strategy, seed=seed, trials=args.trials, budget=round(args.budget * grid))
                    for seed in range(args.seeds)]
    if args.seeds == 1:
        print(f"\n{'trial':>5} {'cell':<48} {'seed':>4} {'status':>9} {'epochs':>6} {args.metric:>9}  why")
        for e in outcomes[0]:
            print(f"{e.trial:5d} {_cell(record, e.cell):<48} {e.seed:4d} {e.status:>9} {e.epochs:6d} "
                  f"{e.value:9.4f}  {e.stopped_reason}")
    print(f"\n{'seed':>4} {'trials':>6} {'stopped':>7} {'epochs':>6} {'of grid':>7} {'hours':>6}  best configuration "
          f"found (mean final kNN; regret to the best cell)")
    for seed, ended in enumerate(outcomes):
        last = ended[-1] if ended else None
        stopped = sum(e.status not in ("completed", "budget") for e in ended)
        found = (f"{_cell(record, last.incumbent)} ({last.incumbent_truth:.4f}; "
                 f"{record.truth(best) - last.incumbent_truth:+.4f})" if last and last.incumbent else "none completed")
        used = last.epochs_used if last else 0
        print(f"{seed:4d} {len(ended):6d} {stopped:7d} {used:6d} {used / grid:7.0%} "
              f"{(last.seconds_used if last else 0) / 3600:6.2f}  {found}")
    return 0


def _cell(record, cell) -> str:
    return ", ".join(f"{a}={v}" for a, v in zip(record.axes, cell, strict=True))


def parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``command`` (the subcommand to be run) gets its full arguments, the others their names only."""
    p = _Parser(prog="ssl-study", description=__doc__.splitlines()[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def named(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("name", help="study directory, or study name under --storage")
        sp.add_argument("--storage", default="runs", help="where studies live (default: runs)")
        return sp

    def verbose(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--verbose", action="store_true", help="show Ray's, Tune's and the workers' output here "
                                                               "instead of in <study dir>/logs/ray.log")

    lp = sub.add_parser("launch", help="run a study from a study file")
    lp.add_argument("spec", nargs="?", default=None,
                    help=f"study file (YAML); default: the bundled study {DEFAULT_STUDY.name}")
    lp.add_argument("--dry-run", action="store_true", help="print the resolved study and start nothing")
    lp.add_argument("--address", default=None, help="attach to a running Ray cluster (default: local Ray)")
    lp.set_defaults(func=launch)
    rp = named("resume", "continue an interrupted study from its checkpoints")
    rp.add_argument("--address", default=None)
    rp.set_defaults(func=resume)
    ep = named("extend", "add trials to a study, warm-started from its Optuna storage")
    ep.add_argument("--trials", type=_at_least(1), required=True, help="how many trials to add")
    ep.add_argument("--address", default=None)
    ep.set_defaults(func=extend)
    for sp in (lp, rp, ep):
        verbose(sp)
    named("status", "trials by status, best so far, running trials").set_defaults(func=status)
    named("best", "the best trial: config, metrics, checkpoint").set_defaults(func=best)
    vp = named("evaluate", "evaluate the best trials' exported backbones, frozen: linear probe or kNN")
    if command == "evaluate":  # its defaults live in study/spec.py, which imports what --help need not
        from study.spec import PROTOCOLS, Evaluate

        d = Evaluate()
        vp.add_argument("--top", type=_at_least(1), default=d.top, help=f"the K best completed trials (default "
                                                                          f"{d.top})")
        vp.add_argument("--protocol", choices=PROTOCOLS, default=d.protocol,
                        help="linear: the paper's linear probe; knn: weighted kNN at k 20 and 200 on the whole test "
                             f"split (default {d.protocol})")
        vp.add_argument("--epochs", type=_at_least(1), default=d.epochs,
                        help=f"linear probe epochs (default {d.epochs}, the paper's)")
        vp.add_argument("--batch-size", type=_at_least(1), default=d.batch_size,
                        help=f"linear probe batch; lr = base lr x batch / 256 (default {d.batch_size})")
        vp.add_argument("--base-lr", type=float, default=d.base_lr,
                        help="linear probe base lr (default 3.0 for a ViT, 0.1 for a ResNet: the paper's)")
        vp.add_argument("--train-subset", type=_at_least(1), default=d.train_subset,
                        help="probe training images, kNN bank: a fixed subset of the train split (default: all)")
        vp.add_argument("--address", default=None, help="the Ray cluster to run on (default: a local Ray)")
        verbose(vp)
    vp.set_defaults(func=evaluate_cmd)
    qp = named("results", "query results tables (one study, or every study under a root)")
    qp.add_argument("--table", choices=ALL_TABLES, default="trials")
    qp.add_argument("--where", help="filter, e.g. \"status == 'completed' and base_lr > 1e-3\"")
    qp.add_argument("--sort", help="column to sort by (--sort=-col or --desc: descending)")
    qp.add_argument("--desc", action="store_true", help="sort descending")
    qp.add_argument("--columns", nargs="+", help="columns to show")
    qp.add_argument("--format", choices=("table", "csv", "json", "parquet"), default="table")
    qp.add_argument("--output", help="file for --format parquet")
    qp.set_defaults(func=results_cmd)
    # Subcommands whose arguments live in their own (heavy) module get them only when they are the one run, so
    # that `ssl-study --help` and every other command start without importing FFCV, torch or matplotlib.
    rp = named("report", "write PNG figures and an HTML page of a study's results")
    if command == "report":
        from study import report

        report.add_report_arguments(rp)
        rp.set_defaults(func=lambda args: report.report_from_args(args, _open(args)))
    cp = sub.add_parser("convert", help="convert an image folder, fashion_mnist or mnist to FFCV files")
    if command == "convert":
        from data.datasets import add_convert_arguments, convert_from_args

        add_convert_arguments(cp)
        cp.set_defaults(func=convert_from_args)

    rp = sub.add_parser("replay", help="replay a recorded observe-mode study under other search settings")
    if command == "replay":  # its defaults are a study file's (study/spec.py), which imports what --help need not
        add_replay_arguments(rp)
    verbose(rp)
    rp.set_defaults(func=replay_cmd)

    sp = sub.add_parser("submit", help="send a study to a Ray cluster as a Ray Job (token auth handled)")
    if command == "submit":
        from study import submit

        submit.add_submit_arguments(sp)
        sp.set_defaults(func=submit.submit_from_args)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        args = parser(command).parse_args(argv)
        return args.func(args)
    except (UsageError, SpecError, QueryError, DatasetError) as e:
        print(f"ssl-study: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
