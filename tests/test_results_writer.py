"""The results writer (study/results/writer.py) driven directly, as Tune's driver calls it, with many reports.

No Ray cluster and no training: real ``ray.tune.experiment.Trial`` objects (stubs; a failed one gets its error
file in a plain folder, see :class:`LocalTrial`) go through the writer's Tune hooks, and the tables are read back
with pyarrow, DuckDB and ``study.results``. What is checked: the tables are complete and equal to what was
reported (a reference model of the semantics: a re-reported epoch replaces that epoch and the later ones),
a reader running alongside never fails nor sees a partial file, a resumed (unpickled) writer appends, the
compaction keeps every row, and the work per report does not grow with the study (rows written, files read).
"""

import math
import pickle
import random
import threading
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from ray.tune.experiment import Trial

from study import results
from study.results import files
from study.results.writer import ResultsWriter
from study.spec import Resources, Search, StudySpec

EPOCHS = 5
TRIALS = 300
CONCURRENT = 12


class LocalTrial(Trial):
    """A real Tune trial whose folder is a plain directory (Tune's is under the Ray session's folder, which takes a
    running Ray): ``handle_error`` writes its error file there, where ``on_trial_error`` reads it."""

    folder: str | None = None

    @property
    def local_path(self) -> str | None:
        return self.folder


def make_trial(tid: str, config: dict, folder) -> LocalTrial:
    trial = LocalTrial("fn", config=config, trial_id=tid, stub=True)
    trial.folder = str(folder / tid)
    return trial


class Clock:
    """A clock the test moves (picklable, as Tune pickles its callbacks)."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make_spec(root, name="w"):
    return StudySpec(name=name, storage=str(root / "runs"), train={"epochs": EPOCHS},
                     search=Search(space={"base_lr": {"log": [1.0e-4, 1.0e-2]}, "wd": {"choice": [0.0, 0.05]}}),
                     resources=Resources(workers=1, cpus_per_worker=1.0))


class Reference:
    """The tables as the writer before issue 15 kept them: rows keyed, a re-reported epoch drops the trial's
    rows of that epoch and later."""

    def __init__(self) -> None:
        self.epochs: dict[tuple, dict] = {}
        self.events: dict[tuple, dict] = {}
        self.status: dict[str, str] = {}

    def report(self, tid: str, result: dict) -> None:
        epoch = result["epoch"]
        self.epochs = {k: r for k, r in self.epochs.items() if not (k[0] == tid and k[1] >= epoch)}
        self.events = {k: r for k, r in self.events.items() if not (k[0] == tid and r["epoch"] >= epoch)}
        self.epochs[(tid, epoch)] = {"trial_id": tid, "epoch": epoch, "loss": result["loss"]}
        for e in result["events"]:
            self.events[(tid, e["step"], e["kind"], e["layer"])] = {"trial_id": tid, **e}

    def epoch_rows(self) -> set:
        return {(r["trial_id"], r["epoch"], r["loss"]) for r in self.epochs.values()}

    def event_rows(self) -> set:
        return {(r["trial_id"], r["step"], r["epoch"], r["kind"], r["layer"], r["magnitude"])
                for r in self.events.values()}


def epoch_rows(table) -> list:
    return [(r["trial_id"], r["epoch"], r["loss"]) for r in table.select(["trial_id", "epoch", "loss"]).to_pylist()]


def event_rows(table) -> list:
    return [(r["trial_id"], r["step"], r["epoch"], r["kind"], r["layer"], r["magnitude"])
            for r in table.to_pylist()]


def result_for(rng: random.Random, tid: str, epoch: int, generation: int) -> dict:
    events = [{"step": epoch * 100 + k, "epoch": epoch, "kind": "loss_spike", "layer": f"blocks.{k}",
               "magnitude": round(rng.uniform(2, 9), 3)} for k in range(rng.choice((0, 0, 0, 1, 2)))]
    # the loss says which run of the trial reported it: 100 * generation + less than 100
    return {"epoch": epoch, "loss": round(100.0 * generation + 10.0 / epoch + rng.random() / 100, 6),
            "knn_top1": round(0.1 * epoch + rng.random() / 100, 6), "knn_top1_init": 0.1, "rankme": 5.0,
            "spike_episodes": float(len(events)), "knn_dip_count": 0.0, "max_spike_ratio": 1.0 + len(events),
            "time_total_s": float(epoch), "events": events}


def drive(writer, folder, reference, trial_ids, seed, clock, on_report=lambda: None):
    """Run ``trial_ids`` through ``writer``'s hooks, CONCURRENT at a time, epochs interleaved as Tune does.
    Every 11th trial is restarted after epoch 4 from its checkpoint of epoch 1 (it reports epoch 2 again, then
    3..EPOCHS), every 7th stops at epoch 2 (pruned; a restarted one at its second epoch 2), every 29th fails at
    epoch 3."""
    rng = random.Random(seed)
    trials = {tid: make_trial(tid, {"base_lr": 10 ** rng.uniform(-4, -2), "wd": rng.choice([0.0, 0.05])}, folder)
              for tid in trial_ids}
    live = list(trial_ids)
    for start in range(0, len(live), CONCURRENT):
        wave = live[start:start + CONCURRENT]
        plans = {}
        for tid in wave:
            n = int(tid.rsplit("_", 1)[1])
            plan = [(e, 0) for e in range(1, EPOCHS + 1)]
            if n % 11 == 0:
                plan = [(e, 0) for e in range(1, 5)] + [(e, 1) for e in range(2, EPOCHS + 1)]
            if n % 7 == 0:  # pruned at epoch 2: a restarted one after reporting epoch 2 again (3 and 4 go)
                plan = plan[:5] if n % 11 == 0 else plan[:2]
            plans[tid] = (plan, n % 29 == 0)
        for step in range(max(len(p) for p, _ in plans.values())):
            for tid in wave:
                plan, fails = plans[tid]
                if step >= len(plan):
                    continue
                epoch, generation = plan[step]
                trial = trials[tid]
                if fails and epoch == 3:
                    Path(trial.local_path).mkdir(parents=True, exist_ok=True)
                    trial.handle_error(RuntimeError(f"trial {tid} blew up"))
                    writer.on_trial_error(0, [], trial)
                    reference.status[tid] = "failed"
                    plans[tid] = (plan[:step], False)
                    continue
                result = result_for(rng, tid, epoch, generation)
                trial.update_last_result(dict(result))
                writer.on_trial_result(0, [], trial, result)
                reference.report(tid, result)
                clock.t += 0.01
                on_report()
                if step == len(plan) - 1:
                    writer.on_trial_complete(0, [], trial)
                    reference.status[tid] = "completed" if epoch == EPOCHS else "pruned"
    return trials


class Reader(threading.Thread):
    """Reads the tables over and over while the writer writes: results.read_table, results.open, every Parquet
    file as it is, and DuckDB over what read_table returns. Records every failure."""

    def __init__(self, study_dir) -> None:
        super().__init__(daemon=True)
        self.study_dir, self.stop, self.errors, self.reads, self.raw = study_dir, threading.Event(), [], 0, 0

    def run(self) -> None:
        folder = self.study_dir / "results"
        while not self.stop.is_set():
            try:
                if not (folder / "trials.parquet").exists():
                    self.stop.wait(0.01)
                    continue
                epochs = results.open(self.study_dir).table("epochs")
                events = results.open(self.study_dir).table("events")
                trials = results.open(self.study_dir).table("trials")
                keys = epochs.select(["trial_id", "epoch"]).to_pylist()
                assert len(keys) == len({(k["trial_id"], k["epoch"]) for k in keys}), "a repeated epoch"
                n = duckdb.sql("SELECT count(*) FROM epochs").fetchall()[0][0]  # the Arrow table in scope
                assert n == epochs.num_rows and events.num_rows >= 0 and trials.num_rows >= 0
                opened = results.open(self.study_dir)
                assert opened.table("trials").num_rows >= 0 and opened.table("epochs").num_rows >= 0
                for path in folder.glob("*.parquet"):  # raw files: whole or gone (a merge removed it), never torn
                    try:
                        files.read_file(path)  # one open handle: pq.read_table(path) opens it twice
                        self.raw += 1
                    except FileNotFoundError:
                        pass
                self.reads += 1
                self.stop.wait(0.02)  # a reader polls; it leaves the writer most of the two CPUs
            except Exception as e:  # recorded: the test asserts there is none
                self.errors.append(repr(e))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One writer through TRIALS trials with a reader alongside, then a resumed (unpickled) writer that
    restarts a few of them and adds more, then the experiment's end."""
    root = tmp_path_factory.mktemp("writer")
    spec = make_spec(root)
    trials_dir = root / "trials"
    clock, reference = Clock(), Reference()
    # a part about every 5 reports (the test's clock moves 0.01 s a report), merges of 4, chunks of 300 rows
    writer = ResultsWriter(spec, clock=clock, flush_every_s=0.05, merge_parts=4, chunk_rows=300)
    reader = Reader(spec.study_dir)
    counts = []  # after each report: (epoch rows reported so far, rows written, files read, files in results/)
    reported, compared, flushed = [0], [0], [0]

    def on_report():
        reported[0] += 1
        s = writer.stats
        counts.append((reported[0], s["rows"]["epochs"] + s["rows"]["events"], s["files_read"],
                       len(list((spec.study_dir / "results").iterdir())), s["files"]["trials"]))
        flushed[0] += not writer.buffer["epochs"]
        if not writer.buffer["epochs"] and flushed[0] % 4 == 0:  # just written: a reader sees every row so far
            compared[0] += 1
            epochs = results.open(spec.study_dir).table("epochs")
            assert sorted(epoch_rows(epochs)) == sorted(reference.epoch_rows())
            assert set(event_rows(results.open(spec.study_dir).table("events"))) == reference.event_rows()

    first = [f"trial_{i:05d}" for i in range(TRIALS)]
    reader.start()
    try:
        drive(writer, trials_dir, reference, first, seed=0, clock=clock, on_report=on_report)
    finally:
        reader.stop.set()
        reader.join()
    assert compared[0] >= 20
    mid = {"parts": sorted(p.name for p in (spec.study_dir / "results").glob("*-part-*.parquet")),
           "stats": {k: (dict(v) if isinstance(v, dict) else v) for k, v in writer.stats.items()}}
    # The driver dies without the experiment's end, after a flush (what was buffered is lost otherwise);
    # Tune restores the pickled callback; the restarted trials re-report an old epoch, new trials come.
    writer.flush()
    resumed = pickle.loads(pickle.dumps(writer))
    again = [f"trial_{i:05d}" for i in range(0, 60, 3)]
    more = [f"trial_{i:05d}" for i in range(TRIALS, TRIALS + 40)]
    rng = random.Random(1)
    trials = {tid: make_trial(tid, {"base_lr": 1e-3, "wd": 0.0}, trials_dir) for tid in again}
    for tid in again:  # from a checkpoint of epoch 1, to the end
        for epoch in range(1, EPOCHS + 1):
            result = result_for(rng, tid, epoch, 2)
            trials[tid].update_last_result(dict(result))
            resumed.on_trial_result(0, [], trials[tid], result)
            reference.report(tid, result)
        resumed.on_trial_complete(0, [], trials[tid])
        reference.status[tid] = "completed"
    drive(resumed, trials_dir, reference, more, seed=2, clock=clock)
    before_end = results.open(spec.study_dir).table("epochs")
    resumed.on_experiment_end([])
    return spec, reference, reader, counts, mid, resumed, before_end


def test_tables_hold_what_was_reported(run):
    spec, reference, _, _, _, _, _ = run
    epochs = results.open(spec.study_dir).table("epochs")
    assert sorted(epoch_rows(epochs)) == sorted(reference.epoch_rows())
    assert len(epoch_rows(epochs)) == len(reference.epochs)  # no epoch twice
    assert sorted(event_rows(results.open(spec.study_dir).table("events"))) == sorted(reference.event_rows())
    trials = {r["trial_id"]: r for r in results.open(spec.study_dir).table("trials").to_pylist()}
    assert set(trials) == set(reference.status) and len(trials) == TRIALS + 40
    for tid, status in reference.status.items():
        row = trials[tid]
        mine = sorted((r for r in reference.epochs.values() if r["trial_id"] == tid), key=lambda r: r["epoch"])
        assert row["status"] == status, tid
        assert row["epochs_done"] == (mine[-1]["epoch"] if mine else 0), tid
        assert row["events"] == sum(1 for k in reference.events if k[0] == tid), tid
        if mine:
            assert row["loss"] == mine[-1]["loss"]
        if status == "failed":
            assert "blew up" in row["error"]
    assert all(math.isfinite(r["knn_top1_best"]) for r in trials.values() if r["epochs_done"])


def test_a_repeated_epoch_replaces_the_earlier_rows(run):
    spec = run[0]
    epochs = results.open(spec.study_dir).table("epochs").to_pylist()
    restarted = [r for r in epochs if r["trial_id"] == "trial_00011"]  # restarted after epoch 4 from epoch 2
    assert sorted(r["epoch"] for r in restarted) == list(range(1, EPOCHS + 1))
    runs = [int(r["loss"] // 100) for r in sorted(restarted, key=lambda r: r["epoch"])]
    assert runs == [0] + [1] * (EPOCHS - 1)
    pruned_restart = [r for r in epochs if r["trial_id"] == "trial_00077"]  # 77 = 7 * 11: restarted, then pruned
    assert [(r["epoch"], int(r["loss"] // 100)) for r in sorted(pruned_restart, key=lambda r: r["epoch"])] == \
        [(1, 0), (2, 1)]
    resumed = [r for r in epochs if r["trial_id"] == "trial_00033"]  # run again whole by the resumed writer
    assert len(resumed) == EPOCHS and all(r["loss"] // 100 == 2 for r in resumed)


def test_a_reader_alongside_never_fails_nor_sees_a_partial_file(run):
    _, _, reader, _, mid, _, _ = run
    assert reader.errors == []
    assert reader.reads > 10 and reader.raw > 10
    assert mid["stats"]["merges"] > 10 and mid["parts"]  # the reads went on while parts came and merged


def test_the_work_per_report_does_not_grow(run):
    counts = run[3]
    n = len(counts)
    assert n > 1000
    assert all(c[2] == 0 for c in counts)  # no report reads a file back
    # Rows written (parts and merges of epochs and events) per report: bounded, and no more at the end than in
    # the first third (the old writer rewrote every row of the study at every report).
    third = counts[n // 3]
    per_report_first = third[1] / third[0]
    per_report_last = (counts[-1][1] - third[1]) / (counts[-1][0] - third[0])
    assert per_report_last <= 2 * per_report_first and per_report_last < 12, (per_report_first, per_report_last)
    # The files under results/ stay few: merged parts, not one file per report.
    assert max(c[3] for c in counts) <= 60
    assert max(c[3] for c in counts[n // 2:]) <= max(c[3] for c in counts[:n // 2]) + 12
    # trials.parquet: rewritten when a trial ends, otherwise at most once per trials_every_s (1 s of the
    # test's clock, 0.01 s per report).
    assert counts[-1][4] <= TRIALS + n * 0.01 / 1.0 + 2


def test_the_compaction_keeps_every_row(run):
    spec, reference, _, _, _, writer, before_end = run
    folder = spec.study_dir / "results"
    assert sorted(p.name for p in folder.glob("*.parquet")) == ["epochs.parquet", "events.parquet", "trials.parquet"]
    table = pq.read_table(folder / "epochs.parquet")
    assert sorted(epoch_rows(table)) == sorted(epoch_rows(before_end)) == sorted(reference.epoch_rows())
    meta = pq.read_schema(folder / "events.parquet").metadata
    assert meta[b"ssl_study.schema_version"] == str(results.SCHEMA_VERSION).encode()
    assert meta[b"ssl_study.table"] == b"events"
    assert int(meta[files.THROUGH]) == writer.seq - 1
    n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{folder}/epochs*.parquet')").fetchall()[0][0]
    assert n == len(reference.epochs) == results.open(spec.study_dir).table("epochs").num_rows
    events = pq.read_table(folder / "events.parquet")
    assert sorted(event_rows(events)) == sorted(reference.event_rows())


def test_a_writer_started_on_parts_a_killed_driver_left_compacts_them(tmp_path):
    spec = make_spec(tmp_path, "killed")
    trials_dir = tmp_path / "trials"
    clock, reference = Clock(), Reference()
    writer = ResultsWriter(spec, clock=clock, flush_every_s=0.0, merge_parts=3, chunk_rows=50)
    drive(writer, trials_dir, reference, [f"trial_{i:05d}" for i in range(30)], seed=3, clock=clock)
    folder = spec.study_dir / "results"
    assert list(folder.glob("epochs-part-*.parquet"))
    # pq sees the compacted file only (empty until the end); read_table sees everything
    assert pq.read_table(folder / "epochs.parquet").num_rows == 0
    assert sorted(epoch_rows(results.open(spec.study_dir).table("epochs"))) == sorted(reference.epoch_rows())
    fresh = ResultsWriter(spec, clock=clock)  # a new driver: `ssl-study resume`
    again = make_trial("trial_00011", {"base_lr": 1e-3, "wd": 0.0}, trials_dir)
    result = result_for(random.Random(0), "trial_00011", 3, 5)
    fresh.on_trial_result(0, [], again, result)  # its first hook loads and compacts
    reference.report("trial_00011", result)
    assert not list(folder.glob("*-part-*.parquet"))
    assert fresh.stats["compactions"] == 1 and fresh.stats["files_read"] > 0
    fresh.on_trial_complete(0, [], again)
    fresh.on_experiment_end([])
    assert sorted(epoch_rows(pq.read_table(folder / "epochs.parquet"))) == sorted(reference.epoch_rows())
    rows = [r for r in reference.epochs.values() if r["trial_id"] == "trial_00011"]
    assert sorted(r["epoch"] for r in rows) == [1, 2, 3]
    row = next(r for r in pq.read_table(folder / "trials.parquet").to_pylist() if r["trial_id"] == "trial_00011")
    assert row["epochs_done"] == 3 and row["status"] == "pruned"


def test_rows_are_buffered_between_flushes(tmp_path):
    """With the default throttles a report writes nothing until flush_every_s has passed, a trial ends or a result
    comes with a checkpoint."""
    spec = make_spec(tmp_path, "buffered")
    trials_dir = tmp_path / "trials"
    clock = Clock()
    writer = ResultsWriter(spec, clock=clock)
    trials = [make_trial(f"t{i}", {"base_lr": 1e-3, "wd": 0.0}, trials_dir) for i in range(3)]
    rng = random.Random(0)
    for t in trials:
        writer.on_trial_result(0, [], t, result_for(rng, t.trial_id, 1, 0))
    written = dict(writer.stats["files"])
    assert written["epochs"] == 1  # the empty compacted file written when the writer started
    for t in trials:
        writer.on_trial_result(0, [], t, result_for(rng, t.trial_id, 2, 0))
    assert writer.stats["files"] == written  # nothing due yet (the trials table: once per second)
    clock.t += writer.flush_every_s
    writer.on_step_end(0, [])  # Tune's loop: the rows are due
    assert writer.stats["files"]["epochs"] == written["epochs"] + 1
    assert results.open(spec.study_dir).table("epochs").num_rows == 6
    writer.on_trial_result(0, [], trials[0], result_for(rng, "t0", 3, 0))
    writer.on_trial_complete(0, [], trials[0])  # a trial's end writes at once
    assert results.open(spec.study_dir).table("epochs").num_rows == 7
    assert {r["trial_id"]: r["status"] for r in results.open(spec.study_dir).table().to_pylist()}["t0"] == "pruned"
    # A result with a checkpoint: a trial restored from it goes on after that epoch, so its row and everything
    # buffered before it are written at once (a driver killed now loses none of them).
    checkpoint = {"checkpoint_path": str(tmp_path / "checkpoint")}
    writer.on_trial_result(0, [], trials[2], result_for(rng, "t2", 3, 0))
    assert results.open(spec.study_dir).table("epochs").num_rows == 7  # no checkpoint: buffered
    writer.on_trial_result(0, [], trials[1], {**result_for(rng, "t1", 3, 0), **checkpoint})
    assert results.open(spec.study_dir).table("epochs").num_rows == 9  # t1's checkpointed epoch and t2's
    writer.on_trial_result(0, [], trials[2], {**result_for(rng, "t2", 4, 0), **checkpoint})
    assert results.open(spec.study_dir).table("epochs").num_rows == 10
