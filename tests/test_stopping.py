"""Instability-aware stopping end to end in real Tune studies on a real local Ray (``conftest.stopping_studies``).

In ``enforce``, two trials train at a sane learning rate and two at base_lr 1e4, where AdamW makes the loss
non-finite within a few steps (batch sizes 32 and 64 each). The diverged trials stop at once with status
``diverged`` and the study goes on; Optuna is never told NaN. In ``observe`` the same diverging trial runs to
the end and is only flagged.
"""

import math

import optuna
import pyarrow.parquet as pq
import pytest
from studies import DIVERGING, HEALTHY


@pytest.fixture(scope="module")
def studies(stopping_studies):
    return stopping_studies


def table(spec, name):
    return pq.read_table(spec.study_dir / "results" / f"{name}.parquet").to_pylist()


def test_diverged_trial_stops_at_once_and_the_study_goes_on(studies):
    spec = studies["enforce"]
    trials = {(r["base_lr"], r["batch_size"]): r for r in table(spec, "trials")}
    assert len(trials) == 4
    for batch_size in (32, 64):
        healthy, bad = trials[HEALTHY, batch_size], trials[DIVERGING, batch_size]
        assert healthy["status"] == "completed" and healthy["epochs_done"] == 2
        assert bad["status"] == "diverged" and bad["epochs_done"] == 1 and bad["verdict_epoch"] == 1
        assert "non-finite" in bad["verdict_reason"]
        epoch = next(r for r in table(spec, "epochs") if r["trial_id"] == bad["trial_id"])
        # stopped mid-epoch: fewer steps ran than the epoch has (512 images / 64), so it trained for less time
        assert epoch["stopped"] == 1 and epoch["nonfinite"] == 1 and math.isnan(epoch["knn_top1"])


def test_events_reach_the_results(studies):
    spec = studies["enforce"]
    trials = {r["trial_id"]: r for r in table(spec, "trials")}
    events = table(spec, "events")
    bad = [t for t in trials.values() if t["status"] == "diverged"]
    assert len(bad) == 2
    for t in bad:
        nonfinite = [e for e in events if e["trial_id"] == t["trial_id"] and e["kind"] == "nonfinite"]
        assert nonfinite and all(e["epoch"] == 1 and e["step"] < 8 for e in nonfinite)
        assert t["events"] == sum(e["trial_id"] == t["trial_id"] for e in events)
    assert all(e["kind"] != "nonfinite" for e in events if trials[e["trial_id"]]["status"] == "completed")


def test_optuna_is_never_told_nan(studies):
    for spec in studies.values():
        ot = optuna.load_study(study_name=spec.name, storage=f"sqlite:///{spec.study_dir / 'optuna.db'}")
        assert all(t.value is None or math.isfinite(t.value) for t in ot.trials)
        for t in ot.trials:
            assert all(math.isfinite(v) for v in t.intermediate_values.values())
    states = {(t.params["base_lr"], t.params["batch_size"]): t.state for t in optuna.load_study(
        study_name="enforce", storage=f"sqlite:///{studies['enforce'].study_dir / 'optuna.db'}").trials}
    complete, pruned = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
    assert states == {(HEALTHY, 32): complete, (HEALTHY, 64): complete, (DIVERGING, 32): pruned,
                      (DIVERGING, 64): pruned}


def test_observe_mode_flags_but_stops_nothing(studies):
    spec = studies["observe"]
    (trial,) = table(spec, "trials")
    assert trial["epochs_done"] == 2 and trial["status"] == "completed"
    assert trial["verdict"] == "diverged" and trial["verdict_epoch"] == 1
    assert [r["stopped"] for r in table(spec, "epochs")] == [0, 0]


def test_results_of_several_studies_query_together(studies):
    import duckdb
    import pandas as pd
    import pyarrow.compute as pc

    from study import results

    root = studies["enforce"].study_dir.parent
    r = results.open(root)
    assert r.studies == ["enforce", "observe"]
    trials = r.table("trials")
    assert sorted(set(trials.column("study").to_pylist())) == ["enforce", "observe"] and trials.num_rows == 5
    # filters are pushed down to the Parquet scan; schema version and table name travel in the metadata
    diverged = r.trials.to_table(filter=(pc.field("status") == "diverged") & (pc.field("study") == "enforce"))
    assert diverged.column("base_lr").to_pylist() == [DIVERGING, DIVERGING]
    meta = pq.read_schema(studies["enforce"].study_dir / "results" / "events.parquet").metadata
    assert meta[b"ssl_study.schema_version"] == str(results.SCHEMA_VERSION).encode()
    assert meta[b"ssl_study.table"] == b"events"
    # pandas and DuckDB read the same files as they are
    frame = pd.read_parquet(studies["observe"].study_dir / "results" / "trials.parquet")
    assert list(frame["verdict"]) == ["diverged"]
    pattern = str(root / "*" / "results" / "epochs.parquet")
    count = duckdb.sql(f"SELECT count(*) FROM read_parquet('{pattern}', union_by_name=true)").fetchall()[0][0]
    assert count == r.table("epochs").num_rows == 2 * 1 + 2 * 2 + 2  # diverged: 1 epoch, healthy: 2, observe: 2
