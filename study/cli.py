"""The ``ssl-study`` command line."""

from __future__ import annotations

import argparse
import sys

from study.spec import DEFAULT_STUDY, SpecError, load_spec

SUMMARY = ["trial_id", "status", "epochs_done", "knn_top1_init", "knn_top1", "knn_top1_best", "loss",
           "time_total_s"]


def launch(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)  # validated whole before Ray starts
    if args.dry_run:
        print(f"study {spec.name} from {spec.source}\n  results: {spec.study_dir}")
        print(f"  space: {', '.join(f'{p.name}~{p.kind}{list(p.args)}' for p in spec.params)}")
        r = spec.resources
        print(f"  per trial: {r.workers} workers x ({r.cpus_per_worker} CPU, {r.gpus_per_worker} GPU) "
              f"+ {r.driver_cpus} CPU driver; {spec.search.num_samples} trials, "
              f"{spec.search.max_concurrent} at a time")
        return 0
    from study import results, runner  # heavy imports (Ray, torch) only once the spec is known good

    trials = runner.run_study(spec, address=args.address)
    columns = SUMMARY[:2] + [p.name for p in spec.params] + SUMMARY[2:]
    print(f"\n{results.format_table(trials, columns)}\n")
    print(f"Parquet results: {spec.study_dir / 'results'} (trials.parquet, epochs.parquet)")
    print(f"Optuna storage:  sqlite:///{spec.study_dir / 'optuna.db'}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssl-study", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    lp = sub.add_parser("launch", help="run a study from a study file")
    lp.add_argument("spec", nargs="?", default=None,
                    help=f"study file (YAML); default: the bundled study {DEFAULT_STUDY.name}")
    lp.add_argument("--dry-run", action="store_true", help="print the resolved study and start nothing")
    lp.add_argument("--address", default=None, help="attach to a running Ray cluster (default: local Ray)")
    lp.set_defaults(func=launch)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecError as e:
        print(f"ssl-study: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
