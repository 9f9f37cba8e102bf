"""The study file's ``tracking:`` (study/tracking/) against real trackers: a real MLflow server on 127.0.0.1,
TensorBoard event files and W&B offline runs, all three on one tiny real study (a healthy and a diverging learning
rate: a completed trial and one the policy stops, with its instability events), read back with each tracker's own
reader and compared with the study's Parquet tables. Then a tracker that fails (a warning, nothing raised into
Tune) and bad input (one line, exit code 2, before Ray starts), without a study.
"""

import json
import math
import secrets
import struct
from pathlib import Path

import pytest
from servers import free_ports, mlflow_server
from studies import DIVERGING, HEALTHY, ROOT, STOPPING_TRAIN, rows, run_studies, write_study

from study.cli import main
from study.tracking import EVENT_COLUMNS, TensorBoard
from study.tracking.mlflow_logger import MLflow
from trainers.records import EpochRecord

SECRETS = {"MLFLOW_TRACKING_TOKEN": secrets.token_hex(16), "WANDB_API_KEY": secrets.token_hex(20)}


def study(name: str, tracking: dict) -> dict:
    return {"name": name, "train": STOPPING_TRAIN,
            "resources": {"workers": 1, "cpus_per_worker": 0.45, "driver_cpus": 0.1},  # fewer processes
            "search": {"space": {"base_lr": {"choice": [HEALTHY, DIVERGING]}}, "sampler": "grid", "num_samples": 2,
                       "max_concurrent": 2},
            "scheduler": {"type": "fifo"}, "tracking": tracking}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """The tiny study with all three trackers, run once, with credentials in the environment (which the trackers
    must not write anywhere): its spec, its tables and the MLflow server's URI (the server is up for the module)."""
    root = tmp_path_factory.mktemp("tracked")
    with mlflow_server(root) as server, pytest.MonkeyPatch.context() as env:
        for key, value in SECRETS.items():
            env.setenv(key, value)  # the server has no auth: the token is sent and ignored
        spec = write_study(root, study("tracked", {"tensorboard": True, "mlflow": server.uri,
                                                   "wandb": {"project": "ssl-study-test", "mode": "offline"}}),
                           data_dir=ROOT / "datasets")
        run_studies(spec)
        tables = {name: rows(spec, name) for name in ("trials", "epochs", "events")}
        yield spec, tables, server.uri


def history(tables: dict, trial_id: str) -> dict[str, list[tuple[int, float]]]:
    """Each metric's (epoch, value) of a trial in the epochs table, the finite ones (what a tracker gets)."""
    epochs = sorted((r for r in tables["epochs"] if r["trial_id"] == trial_id), key=lambda r: r["epoch"])
    return {m: [(r["epoch"], float(r[m])) for r in epochs if math.isfinite(r[m])] for m in EpochRecord.metrics()}


def events(tables: dict, trial_id: str) -> list[list]:
    found = [[r[c] for c in EVENT_COLUMNS] for r in tables["events"] if r["trial_id"] == trial_id]
    return sorted(found, key=lambda e: (e[0], e[2], e[3]))


def same_rows(got: list[list], expected: list[list]) -> bool:
    """Row lists equal, a NaN equal to a NaN (the magnitude of a non-finite event)."""
    def key(v):
        return "nan" if isinstance(v, float) and math.isnan(v) else v
    return [[key(v) for v in r] for r in got] == [[key(v) for v in r] for r in expected]


def ended(trial: dict) -> dict:
    """A trial's status and verdict as the trials table has them: what every tracker gets at its end."""
    out = {"status": trial["status"]}
    if trial["verdict"]:
        out.update(verdict=trial["verdict"], verdict_reason=trial["verdict_reason"] or "",
                   verdict_epoch=trial["verdict_epoch"])
    return out


def test_the_study_has_what_the_trackers_are_compared_with(tracked):
    _, tables, _ = tracked
    assert sorted(t["status"] for t in tables["trials"]) == ["completed", "diverged"], tables["trials"]
    assert tables["events"], "the diverging trial reports instability events"


def test_mlflow_has_a_run_per_trial_equal_to_the_tables(tracked, tmp_path):
    from mlflow import MlflowClient

    spec, tables, uri = tracked
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(spec.name)
    runs = {r.data.tags["trial_id"]: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == sorted(t["trial_id"] for t in tables["trials"])
    for trial in tables["trials"]:
        run = runs[trial["trial_id"]]
        assert run.info.run_name == trial["trial_id"] and run.info.status == "FINISHED"
        assert run.data.params == {"base_lr": str(trial["base_lr"])}
        assert {k: run.data.tags.get(k) for k in ended(trial)} == {k: str(v) for k, v in ended(trial).items()}
        for metric, expected in history(tables, trial["trial_id"]).items():
            got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric))
            assert got == expected, metric
        table = json.loads(Path(client.download_artifacts(run.info.run_id, "events.json", str(tmp_path))).read_text())
        assert table["columns"] == list(EVENT_COLUMNS)
        assert same_rows(table["data"], events(tables, trial["trial_id"]))


def test_tensorboard_event_files_hold_every_epoch(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec, tables, _ = tracked
    assert sorted(p.name for p in (spec.study_dir / "tensorboard").iterdir()) == \
        sorted(t["trial_id"] for t in tables["trials"])
    for trial in tables["trials"]:
        acc = EventAccumulator(str(spec.study_dir / "tensorboard" / trial["trial_id"]))
        acc.Reload()
        for metric, expected in history(tables, trial["trial_id"]).items():
            got = [(e.step, e.value) for e in acc.Scalars(metric)] if metric in acc.Tags()["scalars"] else []
            assert got == [(s, pytest.approx(v, rel=1e-6, abs=1e-30)) for s, v in expected], metric  # float32
        texts = {tag.split("/")[0]: acc.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
                 for tag in acc.Tags()["tensors"]}
        assert {k: texts[k] for k in ended(trial)} == {k: str(v) for k, v in ended(trial).items()}
        lines = texts["events"].splitlines()[2:]  # a Markdown table: the header, its rule, a line per event
        assert len(lines) == len(events(tables, trial["trial_id"]))


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (``run-ID.wandb``), W&B's LevelDB-style log: a 7-byte header, then 32 KiB
    blocks of chunks (CRC-32, length, type: 1 whole record, 2 first / 3 middle / 4 last piece), each record a
    ``wandb_internal_pb2.Record`` (wandb has no Python reader of its own since the Go core writes the file)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def items(update) -> dict:
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in update}


def test_wandb_offline_runs_hold_every_epoch(tracked):
    spec, tables, _ = tracked
    for trial in tables["trials"]:
        [run_dir] = (spec.study_dir / "wandb").glob(f"offline-run-*-{trial['trial_id']}")
        records = wandb_records(run_dir / f"run-{trial['trial_id']}.wandb")
        [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert (run.run_id, run.project, run.run_group) == (trial["trial_id"], "ssl-study-test", spec.name)
        assert items(run.config.update)["base_lr"] == trial["base_lr"]
        steps = [items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
        for metric, expected in history(tables, trial["trial_id"]).items():
            assert [(s["_step"], s[metric]) for s in steps if metric in s] == expected, metric
        summary = {}
        for r in records:
            if r.WhichOneof("record_type") == "summary":
                summary.update(items(r.summary.update))
        assert {k: summary[k] for k in ended(trial)} == ended(trial)
        table = json.loads((run_dir / "files" / summary["events/path"]).read_text())
        assert table["columns"] == list(EVENT_COLUMNS)
        assert same_rows(table["data"], events(tables, trial["trial_id"]))


def test_no_credential_reaches_a_file_of_the_study(tracked):
    spec, _, _ = tracked
    for path in spec.study_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(value.encode() in data for value in SECRETS.values()), path


def test_a_tracker_that_fails_is_a_warning_and_the_trial_goes_on(tmp_path, capsys):
    """MLflow unreachable when the experiment starts (the server went away after launch checked it): its callback
    warns once and does nothing more. TensorBoard unable to write (its folder is a file): the trial's start warns
    and what follows is skipped. Nothing raises into Tune."""
    from ray.tune.experiment import Trial

    closed = f"http://127.0.0.1:{free_ports(1)[0]}"
    spec = write_study(tmp_path, study("failing", {"tensorboard": True, "mlflow": closed}), data_dir=ROOT / "datasets")
    spec.study_dir.mkdir(parents=True)
    (spec.study_dir / "tensorboard").write_text("not a folder")
    trial = Trial("run_trial", config={"base_lr": HEALTHY}, trial_id="abc12_00000", stub=True)
    for callback in (MLflow(spec), TensorBoard(spec)):
        callback.setup()
        callback.on_trial_start(0, [trial], trial)
        for epoch in (1, 2):
            callback.on_trial_result(epoch, [trial], trial, {"epoch": epoch, "loss": 1.0 / epoch})
        callback.on_trial_complete(2, [trial], trial)
        callback.on_experiment_end([trial])
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[1] for line in lines] == [" tracking.mlflow", " tracking.tensorboard"], lines
    assert all(line.startswith("warning: ") and "(the trials go on; it is tried again in 60 s)" in line
               for line in lines)


def test_bad_tracking_is_one_line_and_exit_2_before_ray_starts(tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    closed = f"http://127.0.0.1:{free_ports(1)[0]}"
    cases = [
        ({"mlflow": closed}, f"tracking.mlflow: cannot reach {closed}: ConnectionRefusedError: [Errno 111]"),
        ({"wandb": {"project": "p"}}, "tracking.wandb: mode online needs WANDB_API_KEY in the environment"),
        ({"wandb": {"project": "p", "mode": "later"}}, "tracking.wandb.mode: 'later' is not one of: online, offline"),
        ({"neptune": "x"}, "tracking: unknown key 'neptune'; accepted: mlflow, tensorboard, wandb"),
        ({"wandb": {"project": "p", "api_key": "abc"}}, "tracking.wandb.api_key: credentials are never read from "
                                                        "the study file"),
        ({"mlflow": "http://me:pw@127.0.0.1:5000"}, "tracking.mlflow: the URI holds a password"),
        ({"mlflow": "mlruns"}, "tracking.mlflow: 'mlruns' is not a tracking URI; accepted: http(s)://HOST:PORT"),
    ]
    for i, (tracking, expected) in enumerate(cases):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(json.dumps({**study(f"bad{i}", tracking), "storage": str(tmp_path / "runs"),
                                    "data_dir": str(ROOT / "datasets")}))
        assert main(["launch", str(path)]) == 2, tracking
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"ssl-study: error: {path}: ") and expected in err, err
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()
