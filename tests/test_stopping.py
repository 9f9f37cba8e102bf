"""Instability-aware stopping end to end in real Tune studies on a real local Ray.

One trial trains at a sane learning rate, the other at base_lr 1e4, where AdamW makes the loss non-finite
within a few steps. In enforce mode the diverged trial stops at once with status ``diverged`` and the study
goes on; Optuna is never told NaN. In observe mode the same trial runs to the end and is only flagged.
"""

import math

import optuna
import pyarrow.parquet as pq
import pytest
from studies import run_studies, write_study

HEALTHY, DIVERGING = 1.5e-4, 1.0e4
TRAIN = {"backbone": "vit_test_patch4_32", "epochs": 2, "batch_size": 64, "mlp_dim": 64, "dim": 32,
         "warmup_epochs": 0.0, "train_subset": 512, "knn_bank_subset": 256, "knn_eval_subset": 256}


def study(root, name, rates, mode):
    return write_study(root, {
        "name": name, "train": TRAIN,
        "resources": {"workers": 2, "cpus_per_worker": 0.45, "driver_cpus": 0.1},
        "search": {"space": {"base_lr": {"choice": rates}}, "sampler": "grid", "num_samples": len(rates),
                   "max_concurrent": 2},
        "scheduler": {"type": "fifo"},
        "stopping": {"mode": mode},
    })


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("stopping")
    specs = {"enforce": study(root, "enforce", [HEALTHY, DIVERGING], "enforce"),
             "observe": study(root, "observe", [DIVERGING], "observe")}
    run_studies(*specs.values())
    return specs


def table(spec, name):
    return pq.read_table(spec.study_dir / "results" / f"{name}.parquet").to_pylist()


def test_diverged_trial_stops_at_once_and_the_study_goes_on(studies):
    spec = studies["enforce"]
    trials = {r["base_lr"]: r for r in table(spec, "trials")}
    assert trials[HEALTHY]["status"] == "completed" and trials[HEALTHY]["epochs_done"] == 2
    bad = trials[DIVERGING]
    assert bad["status"] == "diverged" and bad["epochs_done"] == 1 and bad["verdict_epoch"] == 1
    assert "non-finite" in bad["verdict_reason"]
    epoch = next(r for r in table(spec, "epochs") if r["trial_id"] == bad["trial_id"])
    # stopped mid-epoch: fewer steps ran than the epoch has (512 images / 64), so it trained for less time
    assert epoch["stopped"] == 1 and epoch["nonfinite"] == 1 and math.isnan(epoch["knn_top1"])


def test_events_reach_the_results(studies):
    spec = studies["enforce"]
    trials = {r["trial_id"]: r for r in table(spec, "trials")}
    events = table(spec, "events")
    bad = next(t for t in trials.values() if t["status"] == "diverged")
    nonfinite = [e for e in events if e["trial_id"] == bad["trial_id"] and e["kind"] == "nonfinite"]
    assert nonfinite and all(e["epoch"] == 1 and e["step"] < 8 for e in nonfinite)
    assert bad["events"] == sum(e["trial_id"] == bad["trial_id"] for e in events)
    assert all(e["kind"] != "nonfinite" for e in events if trials[e["trial_id"]]["status"] == "completed")


def test_optuna_is_never_told_nan(studies):
    for spec in studies.values():
        ot = optuna.load_study(study_name=spec.name, storage=f"sqlite:///{spec.study_dir / 'optuna.db'}")
        assert all(t.value is None or math.isfinite(t.value) for t in ot.trials)
        for t in ot.trials:
            assert all(math.isfinite(v) for v in t.intermediate_values.values())
    states = {t.params["base_lr"]: t.state for t in optuna.load_study(
        study_name="enforce", storage=f"sqlite:///{studies['enforce'].study_dir / 'optuna.db'}").trials}
    assert states == {HEALTHY: optuna.trial.TrialState.COMPLETE, DIVERGING: optuna.trial.TrialState.PRUNED}


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
    assert sorted(set(trials.column("study").to_pylist())) == ["enforce", "observe"] and trials.num_rows == 3
    # filters are pushed down to the Parquet scan; schema version and table name travel in the metadata
    diverged = r.trials.to_table(filter=(pc.field("status") == "diverged") & (pc.field("study") == "enforce"))
    assert diverged.num_rows == 1 and diverged.column("base_lr").to_pylist() == [DIVERGING]
    meta = pq.read_schema(studies["enforce"].study_dir / "results" / "events.parquet").metadata
    assert meta[b"ssl_study.schema_version"] == str(results.SCHEMA_VERSION).encode()
    assert meta[b"ssl_study.table"] == b"events"
    # pandas and DuckDB read the same files as they are
    frame = pd.read_parquet(studies["observe"].study_dir / "results" / "trials.parquet")
    assert list(frame["verdict"]) == ["diverged"]
    pattern = str(root / "*" / "results" / "epochs.parquet")
    count = duckdb.sql(f"SELECT count(*) FROM read_parquet('{pattern}', union_by_name=true)").fetchall()[0][0]
    assert count == r.table("epochs").num_rows == 1 + 2 + 2  # diverged: 1 epoch, healthy: 2, observe: 2
