"""Replays of a recorded observe-mode study through the real search stack: a real local Ray and Tune run, real
Optuna, the real ASHA/FIFO schedulers and instability policy, and the results written as real Parquet.

The record is ``bench/records/mocov3-fmnist-grid`` (SSL_STUDY_TEST_RECORD points elsewhere, e.g. at a partial
recording while the grid is being recorded). A missing record fails these tests: it does not skip them.
"""

import dataclasses
import math
import os
import shutil
from collections import Counter
from pathlib import Path

import optuna
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from study import cluster, replay
from study.cli import main
from study.replay import RECOMPUTED, Strategy, summary
from study.results import TABLES, files
from trainers.policy import VERDICTS, verdict
from trainers.records import EpochRecord

RECORD = Path(os.environ.get("SSL_STUDY_TEST_RECORD",
                             Path(__file__).resolve().parent.parent / "bench" / "records" / "mocov3-fmnist-grid"))
# Stops a run at its first epoch with a dense-kNN dip or an epoch kNN below its best (every epoch counts, and
# alpha 0.5 puts the noise allowance at 0 standard errors).
STOPS = {"max_dips": 0, "grace_epochs": 0, "max_knn_drop": 1e-6, "alpha": 0.5}


def tables_of(record: Path) -> Path:
    """The folder holding the record's tables: ``results/`` of a study directory, or the record folder."""
    return record / "results" if (record / "results" / "trials.parquet").is_file() else record


def study_files(record: Path) -> list[Path]:
    return [record / "study.yaml"] if (record / "study.yaml").is_file() else sorted(record.glob("*.yaml"))


def rows(path: Path) -> list[dict]:
    """The table ``path`` names (``<folder>/<table>.parquet``), its compacted file and any parts."""
    return files.read(path.parent, path.stem).to_pylist()


def same(a, b) -> bool:
    """Equal, with None and NaN as one missing value."""
    missing = lambda v: v is None or (isinstance(v, float) and math.isnan(v))  # noqa: E731
    return (missing(a) and missing(b)) or a == b


def same_epochs(played: list[dict], recorded: list[dict]) -> bool:
    """The same epochs, but for the signal summaries a replay recomputes from the traces (checked apart)."""
    return len(played) == len(recorded) and all(
        same(p[c], r[c]) for p, r in zip(played, recorded, strict=True)
        for c in EpochRecord.metrics() if c not in RECOMPUTED)


def by_trial(table: list[dict], key=lambda r: (r["study"], r["trial_id"])) -> dict:
    out: dict = {}
    for r in table:
        out.setdefault(key(r), []).append(r)
    return out


def hand_verdict(run: replay.Run, record: replay.Record, policy) -> tuple[str, int, str, float]:
    """Status, epochs, reason and last knn_top1 of ``run`` under ``policy`` (enforce), by hand."""
    history = []
    for row in run.epochs:
        history.append(summary(row, policy, record.feature_dim))
        judged = verdict(history, policy)
        if judged:
            value = math.nan if judged[0] == "diverged" else row["knn_top1"]
            return judged[0], row["epoch"], judged[1], value
    return "completed", len(run.epochs), "", run.epochs[-1]["knn_top1"]


@pytest.fixture(scope="module")
def record() -> replay.Record:
    return replay.load_record(str(RECORD))


@pytest.fixture(scope="module")
def local_ray():
    environ = dict(os.environ)  # replay() sets Tune's environment variables for the rest of the process
    cluster.start_ray(None, num_cpus=2, object_store_memory=128 * 2**20)
    yield
    ray.shutdown()
    os.environ.clear()
    os.environ.update(environ)


# ---------------------------------------------------------------------------------------------- bad input
# (first: no Ray is up yet, so that stderr holds only what the command printed, no Ray worker's output)


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ssl-study: error: "), err
    return err[0]


def copy_as_study(tmp_path: Path, stopping: str, scheduler: str, trials: list[dict] | None = None) -> Path:
    """The record as a study directory ``tmp_path/s`` whose study file ran with ``stopping`` and ``scheduler``."""
    study = tmp_path / "s"
    (study / "results").mkdir(parents=True, exist_ok=True)
    for table in TABLES:
        shutil.copy(tables_of(RECORD) / f"{table}.parquet", study / "results")
    if trials is not None:
        pq.write_table(pa.Table.from_pylist(trials, schema=pq.read_schema(study / "results" / "trials.parquet")),
                       study / "results" / "trials.parquet")
    data = yaml.safe_load(study_files(RECORD)[0].read_text())
    data.update(stopping={"mode": stopping}, scheduler={"type": scheduler})
    (study / "study.yaml").write_text(yaml.safe_dump(data))
    return study


def test_a_missing_record_is_one_line_naming_it(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["replay", str(missing)]) == 2
    assert str(missing) in error_line(capsys)


@pytest.mark.parametrize(("stopping", "scheduler"), [("enforce", "asha"), ("observe", "asha"), ("enforce", "fifo")])
def test_a_study_not_run_in_observe_mode_under_fifo_is_refused(tmp_path, capsys, stopping, scheduler):
    study = copy_as_study(tmp_path, stopping, scheduler)
    assert main(["replay", str(study)]) == 2
    line = error_line(capsys)
    assert "observe" in line and f"stopping.mode {stopping!r}" in line and f"scheduler {scheduler!r}" in line
    copy_as_study(tmp_path, "observe", "fifo")  # the same tables under an observe/FIFO study file: accepted
    assert replay.load_record(str(study)).runs


def test_an_incomplete_grid_is_refused(tmp_path, capsys, record):
    # keep the runs of one cell and move one of them to a cell that differs in two axes: 2 of 4 cells recorded
    cell = next(c for c, runs in record.runs.items() if len(runs) >= 2)
    axes = list(record.axes)
    moved = [a for a in axes if len(choices_of(a)) >= 2][:2]
    assert len(moved) == 2, "the test needs a grid with two axes of at least two values"
    kept = [t for t in rows(tables_of(RECORD) / "trials.parquet") if tuple(t[a] for a in axes) == cell]
    for a in moved:
        kept[0][a] = next(v for v in choices_of(a) if v != kept[0][a])
    study = copy_as_study(tmp_path, "observe", "fifo", trials=kept)
    assert main(["replay", str(study)]) == 2
    assert "covers 2 of the 4 cells" in error_line(capsys)


def choices_of(axis: str) -> list:
    values = set()
    for f in study_files(RECORD):
        values |= set(yaml.safe_load(f.read_text())["search"]["space"].get(axis, {}).get("choice", []))
    return sorted(values)


@pytest.mark.parametrize(("policy", "named"), [
    ("knn_smooth=2", "knn_smooth"), ("alpha=2", "alpha"),
    ("nonsense=1", "nonsense"), ("max_dips=two", "max_dips"), ("mode=off", "mode"), ("max_dips=-1", "max_dips"),
])
def test_policy_overrides_the_record_cannot_honour_are_refused(capsys, policy, named):
    assert main(["replay", str(RECORD), "--policy", policy]) == 2
    line = error_line(capsys)
    assert "--policy" in line and named in line


def test_policy_overrides_a_replay_can_honour_are_accepted(record):
    detectors = {"alpha": 0.05, "spike_threshold": 2.0, "knn_window": 3}  # recomputed from the record's traces
    spec = replay.replay_spec(record, Strategy("ok", stopping="enforce", policy={**STOPS, **detectors}), 1, 0,
                              Path("."))
    assert spec.stopping == dataclasses.replace(record.stopping, mode="enforce", **{**STOPS, **detectors})
    played = record.with_detectors(spec.stopping)
    assert played is record.with_detectors(spec.stopping)  # computed once per setting
    assert played.stopping.alpha == 0.05 and played.runs.keys() == record.runs.keys()


def test_a_record_without_traces_refuses_other_detectors(tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(RECORD, bare, ignore=shutil.ignore_patterns("traces.parquet"))
    assert main(["replay", str(bare), "--policy", "spike_threshold=9"]) == 2
    line = error_line(capsys)
    assert "--policy spike_threshold" in line and "no per-step traces" in line


# ------------------------------------------------------------------------------------------------ replays


def test_grid_replay_plays_every_cell_once_and_reproduces_its_recorded_curves(local_ray, record, tmp_path):
    out = tmp_path / "r"
    ended = replay.replay(record, Strategy("grid", sampler="grid"), seed=0, out=out)
    detected = record.with_detectors(replay.replay_policy(record, "observe", {}))  # the summaries it played
    assert (out / "study.yaml").is_file()
    assert [e.status for e in ended] == ["completed"] * len(record.runs)
    assert all(e.epochs == record.epochs for e in ended)

    trials, epochs = rows(out / "results" / "trials.parquet"), rows(out / "results" / "epochs.parquet")
    events = rows(out / "results" / "events.parquet")
    axes = list(record.axes)
    cells = Counter(tuple(t[a] for a in axes) for t in trials)
    assert cells == Counter(record.runs.keys())  # every cell of the record, once
    assert Counter(e.cell for e in ended) == cells

    recorded = tables_of(RECORD)
    rec_epochs = {k: sorted(v, key=lambda r: r["epoch"])
                  for k, v in by_trial(rows(recorded / "epochs.parquet")).items()}
    rec_events = by_trial(rows(recorded / "events.parquet"))
    rec_cells = by_trial(rows(recorded / "trials.parquet"), key=lambda t: tuple(t[a] for a in axes))
    played_epochs = by_trial(epochs, key=lambda r: r["trial_id"])
    played_events = by_trial(events, key=lambda r: r["trial_id"])
    event = lambda e: (e["step"], e["epoch"], e["kind"], e["layer"], e["magnitude"])  # noqa: E731
    for t in trials:
        cell = tuple(t[a] for a in axes)
        played = sorted(played_epochs[t["trial_id"]], key=lambda r: r["epoch"])
        assert [r["epoch"] for r in played] == list(range(1, record.epochs + 1))
        matches = [(r["study"], r["trial_id"]) for r in rec_cells[cell]
                   if same_epochs(played, rec_epochs.get((r["study"], r["trial_id"]), []))]
        assert len(matches) == 1, f"cell {cell}: the replayed curve is not exactly one recorded run's"
        run = next(r for r in detected.runs[cell] if r.trial_id == matches[0][1])
        assert all(same(p[c], r[c]) for p, r in zip(played, run.epochs, strict=True) for c in RECOMPUTED)
        assert sorted(map(event, played_events.get(t["trial_id"], []))) == sorted(
            map(event, rec_events.get(matches[0], [])))


def test_enforced_policy_stops_trials_where_the_verdict_on_the_recorded_history_does(local_ray, record):
    ended = replay.replay(record, Strategy("enforce", sampler="random", stopping="enforce", policy=STOPS),
                          seed=0, trials=6)
    assert len(ended) == 6
    policy = dataclasses.replace(record.stopping, mode="enforce", **STOPS)
    detected = record.with_detectors(policy)
    for e in ended:
        run = next(r for r in detected.runs[e.cell] if r.seed == e.seed)
        status, epochs, reason, value = hand_verdict(run, record, policy)
        assert (e.status, e.epochs, e.stopped_reason) == (status, epochs, reason), e
        assert same(e.value, value)
    stopped = [e for e in ended if e.status in VERDICTS]
    assert any(e.epochs < record.epochs for e in stopped)  # stopped before the end of the run
    assert [e.epochs_used for e in ended] == [sum(x.epochs for x in ended[:i + 1]) for i in range(len(ended))]


def constrained_replay(record, tmp_path: Path, name: str, trials: int, policy: dict, constraints: bool = True):
    """A replay under ASHA and the enforced policy on an Optuna storage of its own: its Ended list, and the Optuna
    trials by number."""
    strategy = Strategy(name, sampler="random", scheduler="asha", stopping="enforce", constraints=constraints,
                        policy=policy)
    storage = optuna.storages.InMemoryStorage()
    ended = replay.replay(record, strategy, seed=0, trials=trials, budget=trials * record.epochs,  # not the limit
                          out=tmp_path / name, optuna_storage=storage)
    study = optuna.load_study(study_name=name, storage=storage)  # the study is named after ``out``
    by_number = {t.number: t for t in study.trials}
    # the study may hold more trials than Tune ran: asks that repeated a finished configuration were told its outcome
    assert len(ended) == trials and {e.trial for e in ended} <= set(by_number)
    return ended, by_number


def test_constraints_mark_the_trials_the_policy_stopped_as_infeasible(local_ray, record, tmp_path):
    # STOPS stops nearly every run; with a grace as long as the runs and no collapse threshold to speak of,
    # only a diverged run is stopped, and the others complete or ASHA prunes them
    lenient = {"grace_epochs": record.epochs, "collapse_threshold": 1e-12}
    seen = set()
    for name, policy, trials in (("stops", STOPS, 5), ("lenient", lenient, 3)):
        ended, optuna_trials = constrained_replay(record, tmp_path, name, trials, policy)
        for e in ended:
            t = optuna_trials[e.trial]
            assert e.status in (*VERDICTS, "completed", "pruned")
            assert t.constraints == {"instability": 1.0 if e.status in VERDICTS else 0.0}, (name, e, t.system_attrs)
            if e.status == "completed":
                assert t.state == optuna.trial.TrialState.COMPLETE and t.value == pytest.approx(e.value)
            else:
                assert t.state == optuna.trial.TrialState.PRUNED
            seen.add((name, t.constraints["instability"]))
    assert ("stops", 1.0) in seen and ("lenient", 0.0) in seen  # both values were set

    ended, optuna_trials = constrained_replay(record, tmp_path, "plain", 2, STOPS, constraints=False)
    assert any(e.status in VERDICTS for e in ended)
    assert all(t.constraints == {} for t in optuna_trials.values())


def test_budget_ends_the_replay_after_that_many_epochs(local_ray, record):
    ended = replay.replay(record, Strategy("budget", sampler="random"), seed=0, budget=15)
    assert ended and ended[-1].epochs_used == 15 and sum(e.epochs for e in ended) == 15
    assert all(e.epochs == record.epochs for e in ended[:-1])  # observe + FIFO: only the budget cuts a trial
    played = sum(r["epoch_time_s"] for e in ended
                 for r in next(r for r in record.runs[e.cell] if r.seed == e.seed).epochs[:e.epochs])
    assert ended[-1].seconds_used == pytest.approx(played)


def test_replays_with_the_same_seed_are_identical(local_ray, record):
    strategy = Strategy("tpe", sampler="tpe", scheduler="asha", stopping="enforce", startup_trials=2)
    outcomes = [[(e.trial, e.cell, e.seed, e.status, e.epochs)
                 for e in replay.replay(record, strategy, seed=3, trials=4, budget=30)] for _ in range(2)]
    assert outcomes[0] and outcomes[0] == outcomes[1]


def test_a_configuration_that_already_ran_is_told_its_outcome_not_run_again(local_ray, record):
    trials = min(15, len(record.runs) - 1)
    cells = {}
    for rerun in (False, True):
        storage = optuna.storages.InMemoryStorage()
        strategy = Strategy(f"dedupe-{rerun}", sampler="random", rerun_duplicates=rerun)
        ended = replay.replay(record, strategy, seed=0, trials=trials, budget=trials * record.epochs,
                              optuna_storage=storage)
        cells[rerun] = [e.cell for e in ended]
        study = optuna.load_study(study_name=replay.replay_spec(record, strategy, trials, 0, Path(".")).name,
                                  storage=storage)
        if not rerun:  # every Optuna trial beyond Tune's is a repeat, told the outcome of its finished twin
            ran = {e.trial for e in ended}
            for t in study.trials:
                if t.number not in ran:
                    twin = next(u for u in study.trials if u.number in ran and u.params == t.params)
                    assert (t.state, t.value) == (twin.state, twin.value)
    assert len(set(cells[False])) == trials  # no configuration ran twice
    assert len(set(cells[True])) < trials  # the same random draws, run as they come, repeat some


def test_a_finite_space_runs_each_configuration_then_gives_the_pruned_a_second_run_then_ends(local_ray, record,
                                                                                             capsys):
    """ASHA prunes most cells after an epoch, so every cell has run long before the grid's budget is spent: each
    pruned one then runs once more (ASHA's rungs have filled since) and the search ends, instead of asking TPE
    again and again for a configuration that has not run."""
    ended = replay.replay(record, Strategy("tpe+asha", scheduler="asha"), seed=3)
    cells = len(record.runs)
    assert sorted(e.cell for e in ended[:cells]) == sorted(record.runs)  # each cell once first
    first = {e.cell: e.status for e in ended[:cells]}
    again = [e.cell for e in ended[cells:]]
    assert again and len(set(again)) == len(again)  # then second runs, one per cell
    assert set(again) == {c for c, status in first.items() if status == "pruned"}  # of every cell pruned
    assert ended[-1].epochs_used < cells * record.epochs  # and the search ends with budget left
    assert "no new trial starts" in capsys.readouterr().out
