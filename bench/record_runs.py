"""Record a grid of real runs one run at a time: resumable across sittings and machines, committed as runs land.

A record folder ``bench/records/NAME/`` holds ``grid.yaml``, an ordinary study file (observe-mode stopping, FIFO,
``train.trace: true``) whose ``search.space`` is a grid of ``choice`` lists, ``seed`` among them. Each run of the
grid (one point of the product) is recorded as a one-trial study of its own (``NAME-0007``) by ``ssl-study launch``
in a process of its own, then its trials, epochs, events and per-step trace are appended to the folder's four
tables (written under a temporary name and renamed). Runs already in ``trials.parquet`` are never run again, so an
interrupted recording continues with the missing runs only, on this machine or another; ``--commit`` commits the
folder after every run, so a sitting that ends loses at most the runs in flight. ``ssl-study replay`` and
``bench/search.py`` read the folder as they read any record.

The order is seed-major: every cell with its first seed, then every cell with the next, so a partial recording
already covers the whole grid.

    .venv/bin/python bench/record_runs.py --record mocov3-fmnist-4axes --parallel 2 --commit
    .venv/bin/python bench/record_runs.py --record mocov3-fmnist-4axes --status     # what is missing
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from record import _with_key  # noqa: E402  (bench/record.py: the same key columns as the first record's traces)

from study import results  # noqa: E402
from study.results import files  # noqa: E402
from study.results.files import write_atomic  # noqa: E402
from study.status import ENDED  # noqa: E402

RECORDS = Path(__file__).with_name("records")
TABLES = (*results.TABLES, "traces")


def grid_runs(grid: dict) -> list[dict]:
    """Every run of the grid (axis -> value, ``seed`` included), seed-major, then the runs of ``extra_seeds``
    (``{seeds: [2], cells: [{axis: value, ...}, ...]}``: more seeds in a few cells, for the seed noise)."""
    space = grid["search"]["space"]
    axes = [a for a in space if a != "seed"]
    runs = [{**dict(zip(axes, cell, strict=True)), "seed": seed}
            for seed in space.get("seed", {"choice": [0]})["choice"]
            for cell in itertools.product(*(space[a]["choice"] for a in axes))]
    extra = grid.get("extra_seeds") or {}
    for cell in extra.get("cells", []):
        if sorted(cell) != sorted(axes) or any(cell[a] not in space[a]["choice"] for a in axes):
            raise SystemExit(f"grid.yaml: extra_seeds.cells: {cell} is not a cell of the grid "
                             f"(one value of each of {', '.join(axes)} from its choice list)")
    return runs + [{**{a: cell[a] for a in axes}, "seed": seed}
                   for seed in extra.get("seeds", []) for cell in extra.get("cells", [])]


def run_key(run: dict) -> tuple:
    return tuple(sorted((k, float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v)
                        for k, v in run.items()))


def recorded(folder: Path, grid: dict) -> set[tuple]:
    """The runs ``folder``'s trials table holds, ended but not failed: a run that raised (in the second record, 3
    runs killed by Ray's memory monitor while other jobs shared the machine) is run again by the next sitting."""
    if not (folder / "trials.parquet").is_file():
        return set()
    space = grid["search"]["space"]
    return {run_key({a: row[a] for a in space}) for row in pq.read_table(folder / "trials.parquet").to_pylist()
            if row["status"] in ENDED and row["status"] != "failed"}


def run_study(grid: dict, run: dict, index: int, storage: Path) -> dict:
    """The one-trial study file of ``run``."""
    search = {**grid["search"], "space": {a: {"choice": [v]} for a, v in run.items()}, "sampler": "grid",
              "num_samples": 1, "max_concurrent": 1}
    study = {k: v for k, v in grid.items() if k != "extra_seeds"}  # the recorder's key, not a study file's
    return {**study, "name": f"{grid['name']}-{index:04d}", "storage": str(storage), "search": search}


def launch(study: dict, storage: Path, timeout_s: float) -> Path:
    """Run the study in a process of its own (a local Ray of its own); its study directory."""
    storage.mkdir(parents=True, exist_ok=True)
    path = storage / f"{study['name']}.yaml"
    path.write_text(yaml.safe_dump(study))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-m", "study", "launch", str(path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"{study['name']}: exit code {out.returncode}: {out.stderr.strip().splitlines()[-1:]}")
    return storage / study["name"]


def tables_of(study_dir: Path, name: str) -> dict[str, pa.Table]:
    """The study's four tables, its ended trials only, keyed by study and trial id."""
    out: dict[str, pa.Table] = {}
    for table in results.TABLES:
        out[table] = results.open(study_dir).table(table).replace_schema_metadata(None)
    ended = [t for t in out["trials"].to_pylist() if t["status"] in ENDED]
    traces = []
    for trial in ended:
        trace = Path(trial["checkpoint"] or "") / "trace.parquet"
        if trace.is_file():
            t = pq.read_table(trace)
            traces.append(_with_key(t, {"study": [name] * len(t), "trial_id": [trial["trial_id"]] * len(t)}))
    out["trials"] = pa.Table.from_pylist(ended, schema=out["trials"].schema)
    if traces:
        out["traces"] = pa.concat_tables(traces, promote_options="permissive")
    return out


def append(folder: Path, new: dict[str, pa.Table]) -> None:
    """Add ``new``'s rows to the folder's tables, each rewritten atomically (the trials table last: a run counts as
    recorded only once all its rows are in); the rows of an earlier, failed attempt at the same run (its study) go.
    Traces go to a file per run under ``traces/``, written once: a table of every trace rewritten per run would
    add its whole size to the repository's history at each commit (6 MB at 128 runs)."""
    split_traces(folder)
    if "traces" in new:
        for study in sorted(set(new["traces"].column("study").to_pylist())):
            write_traces(folder, study, new["traces"].filter(pc.equal(new["traces"]["study"], study)))
    rerun = pa.array(sorted({s for t in new.values() for s in t.column("study").to_pylist()}), pa.string())
    for name in ("epochs", "events", "trials"):
        if name not in new:
            continue
        path = folder / f"{name}.parquet"
        parts = [new[name]]
        if path.is_file():
            old = files.read_file(path)  # older schemas renamed
            parts.insert(0, old.filter(pc.invert(pc.is_in(old["study"], value_set=rerun))))
        write_atomic(pa.concat_tables(parts, promote_options="permissive"), path)


def write_traces(folder: Path, study: str, table: pa.Table) -> None:
    (folder / "traces").mkdir(exist_ok=True)
    write_atomic(table, folder / "traces" / f"{study}.parquet")


def split_traces(folder: Path) -> None:
    """A record's single ``traces.parquet`` (as this recorder wrote it before) as a file per run; once."""
    legacy = folder / "traces.parquet"
    if not legacy.is_file():
        return
    table = pq.read_table(legacy)
    for study in sorted(set(table.column("study").to_pylist())):
        write_traces(folder, study, table.filter(pc.equal(table["study"], study)))
    legacy.unlink()


def commit(folder: Path, message: str) -> None:
    subprocess.run(["git", "add", str(folder)], cwd=ROOT, check=True)
    subprocess.run(["git", "commit", "-q", "-m", message], cwd=ROOT, check=False)


def record(folder: Path, *, parallel: int = 1, limit: int | None = None, storage: Path | None = None,
           commit_each: bool = False, timeout_s: float = 7200.0) -> list[tuple]:
    """Record the runs of ``folder/grid.yaml`` that its tables lack (at most ``limit``); the keys recorded."""
    grid = yaml.safe_load((folder / "grid.yaml").read_text())
    storage = storage or ROOT / "runs" / folder.name
    done = recorded(folder, grid)
    todo = [(i, run) for i, run in enumerate(grid_runs(grid)) if run_key(run) not in done][:limit]
    lock, keys = threading.Lock(), []

    def one(item: tuple[int, dict]) -> None:
        index, run = item
        tic = time.perf_counter()
        study = run_study(grid, run, index, storage)
        # A sitting that was stopped left this run's study half-made; it is not in the record, so it starts over
        # (launch refuses a study that exists).
        shutil.rmtree(storage / study["name"], ignore_errors=True)
        tables = tables_of(launch(study, storage, timeout_s), study["name"])
        with lock:  # one writer of the folder's tables at a time
            append(folder, tables)
            keys.append(run_key(run))
            print(f"{study['name']} {run}: {(time.perf_counter() - tic) / 60:.1f} min", flush=True)
            if commit_each:
                commit(folder, f"{folder.name}: run {index} recorded ({len(done) + len(keys)} of "
                               f"{len(done) + len(todo)})")

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, todo))
    return keys


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record", required=True, help="a folder under bench/records/ holding grid.yaml")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time, each a process with a local Ray")
    p.add_argument("--limit", type=int, default=None, help="record at most this many runs in this sitting")
    p.add_argument("--commit", action="store_true", help="git commit the record folder after every run")
    p.add_argument("--status", action="store_true", help="print what is recorded and what is missing")
    args = p.parse_args()
    folder = RECORDS / args.record
    if not (folder / "grid.yaml").is_file():
        raise SystemExit(f"{folder / 'grid.yaml'}: no such grid (a study file whose search.space is a grid)")
    if args.status:
        grid = yaml.safe_load((folder / "grid.yaml").read_text())
        runs, done = grid_runs(grid), recorded(folder, grid)
        print(f"{folder.name}: {sum(run_key(r) in done for r in runs)} of {len(runs)} runs recorded")
        return
    record(folder, parallel=args.parallel, limit=args.limit, commit_each=args.commit)


if __name__ == "__main__":
    main()
