"""Record the search benchmark: real MoCo v3 runs of a grid, every run to its full budget, stored in the repo.

The studies under ``bench/records/NAME/*.yaml`` are ordinary ssl-study studies (observe-mode stopping, FIFO,
per-step traces): this script launches each one, or resumes it where it stopped (``ssl-study resume`` does the
same), then copies its Parquet tables and every run's per-step trace into the record folder, beside the study
files. ``ssl-study replay`` and ``bench/search.py`` play the record back under any search strategy.

    .venv/bin/python bench/record.py                 # record (or resume) and export bench/records/mocov3-fmnist-grid
    .venv/bin/python bench/record.py --export-only   # copy what the studies hold so far into the record
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from study import cluster, results, runner
from study.results.files import write_atomic
from study.spec import load_spec
from study.status import ENDED

RECORDS = Path(__file__).with_name("records")


def finished(spec) -> bool:
    path = spec.study_dir / "results" / "trials.parquet"
    if not path.exists():
        return False
    status = pq.read_table(path, columns=["status"]).column("status").to_pylist()
    return len(status) >= spec.search.num_samples and all(s in ENDED for s in status)


def record(spec) -> None:
    """Launch the study, or resume it when an earlier sitting left it unfinished."""
    if finished(spec):
        print(f"{spec.name}: complete")
        return
    tic = time.perf_counter()
    if runner.experiments(spec.study_dir):
        runner.resume_study(spec)
    else:
        runner.run_study(spec)
    print(f"{spec.name}: {(time.perf_counter() - tic) / 60:.1f} min")


def export(specs: list, folder: Path) -> None:
    """The studies' trials, epochs, events and per-step traces as four tables in ``folder``."""
    tables: dict[str, list[pa.Table]] = {name: [] for name in (*results.TABLES, "traces")}
    for spec in specs:
        out = spec.study_dir / "results"
        if not (out / "trials.parquet").exists():
            continue
        for name in results.TABLES:
            tables[name].append(results.open(spec.study_dir).table(name).replace_schema_metadata(None))
        for trial in pq.read_table(out / "trials.parquet").to_pylist():
            trace = Path(trial["checkpoint"] or "") / "trace.parquet"
            if trial["status"] in ENDED and trace.is_file():
                t = pq.read_table(trace)
                key = {"study": [spec.name] * len(t), "trial_id": [trial["trial_id"]] * len(t)}
                tables["traces"].append(_with_key(t, key))
    for name, parts in tables.items():
        if parts:
            table = pa.concat_tables(parts, promote_options="permissive")
            if name == "trials":  # only ended runs: a running trial's row would be replayed as if finished
                table = table.filter(pc.is_in(table["status"], pa.array(ENDED)))
            write_atomic(table, folder / f"{name}.parquet")
            print(f"  {folder / (name + '.parquet')}: {table.num_rows} rows")


def _with_key(table: pa.Table, key: dict) -> pa.Table:
    for i, (name, values) in enumerate(key.items()):
        table = table.add_column(i, name, pa.array(values, pa.string()))
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record", default="mocov3-fmnist-grid", help="a folder under bench/records/")
    p.add_argument("--export-only", action="store_true")
    args = p.parse_args()
    folder = RECORDS / args.record
    specs = [load_spec(f) for f in sorted(folder.glob("*.yaml"))]
    if not args.export_only:
        tic = time.perf_counter()
        cluster.start_ray(None)
        try:
            for spec in specs:
                record(spec)
        finally:
            ray.shutdown()
        print(f"recording: {(time.perf_counter() - tic) / 60:.1f} min wall")
    export(specs, folder)


if __name__ == "__main__":
    main()
