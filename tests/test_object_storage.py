"""Studies in object storage, against a real S3 server (moto's, started on 127.0.0.1 by tests/servers.py).

Bad locations are one line before Ray starts; the results tables are written and read through pyarrow's S3
filesystem; a whole study (its results, checkpoints, Tune state, saved study, Optuna file and FFCV files in the
bucket) is launched, its driver killed, resumed, extended from a machine with an empty cache, and read by
``status``, ``best``, ``results``, ``report``, :func:`study.results.open` and DuckDB. Credentials come from the
environment only: no object and no file of the study holds the secret key.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pyarrow as pa
import pytest
import ray
import yaml
from servers import free_ports, postgres_server, s3_server

import data.store
from data.store import ObjectPath, location
from study import cluster, results
from study.cli import main
from study.optuna_storage import open_storage
from study.results.files import read as read_folder
from study.results.files import write_atomic

ROOT = Path(__file__).resolve().parents[1]
STATE = optuna.trial.TrialState


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def s3env(s3, monkeypatch, tmp_path):
    """The server's endpoint and key in this process's environment, a cache of this test's own."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SSL_STUDY_CACHE", str(tmp_path / "cache"))
    data.store._filesystem.cache_clear()  # filesystems are made once per bucket, from the environment of then
    yield s3
    data.store._filesystem.cache_clear()


def study_file(tmp_path: Path, name: str, **keys) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "data_dir": str(ROOT / "datasets"), "search": {
        "space": {"base_lr": {"log": [1.0e-4, 1.0e-3]}}, "num_samples": 1}, **keys}))
    return path


# ----------------------------------------------------------------------------------------------- bad input


def _refused(capsys, path: Path) -> str:
    assert main(["launch", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not ray.is_initialized(), err
    return err


def test_a_missing_bucket_is_one_line_naming_the_setting(s3env, tmp_path, capsys):
    for key in ("storage", "data_dir"):
        err = _refused(capsys, study_file(tmp_path, f"nobucket-{key}", **{key: "s3://no-such-bucket/x"}))
        assert f": {key}: s3://no-such-bucket/x" in err and "(bucket 'no-such-bucket' does not exist" in err, err


def test_wrong_credentials_are_one_line_and_not_echoed(s3env, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-key")
    data.store._filesystem.cache_clear()
    err = _refused(capsys, study_file(tmp_path, "badkey", storage=f"s3://{s3env.bucket}/studies"))
    assert ": storage: " in err and "the credentials were refused" in err and "not-the-key" not in err


def test_an_unreachable_endpoint_is_one_line_within_seconds(s3env, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")
    data.store._filesystem.cache_clear()
    start = time.monotonic()
    err = _refused(capsys, study_file(tmp_path, "nowhere", storage=f"s3://{s3env.bucket}/studies"))
    assert "cannot reach http://127.0.0.1:" in err and time.monotonic() - start < 20


@pytest.mark.parametrize("uri", ["s3://bucket/p?endpoint_override=http://127.0.0.1:9000", "s3://key:secret@bucket/p",
                                 "ftp://host/p", "file://relative/p", "s3:///p"])
def test_a_uri_with_options_credentials_or_an_unknown_scheme_is_refused_at_load(uri, tmp_path, capsys):
    err = _refused(capsys, study_file(tmp_path, "badurl", storage=uri))
    assert ": storage: " in err and ("accepted" in err or "environment" in err), err
    assert "secret" not in err, err  # a URI's credentials are not echoed (AWS_SECRET_ACCESS_KEY is upper case)


# ------------------------------------------------------------------------------------- tables through S3


def test_tables_written_to_s3_are_read_whole_and_listed(s3env):
    folder = location(f"s3://{s3env.bucket}/tables/one/results")
    assert isinstance(folder, ObjectPath) and str(folder / "x") == f"s3://{s3env.bucket}/tables/one/results/x"
    table = pa.table({"trial_id": ["a", "b"], "knn_top1": [0.5, 0.25]})
    write_atomic(table, folder / "trials.parquet")
    assert read_folder(str(folder)).equals(table)
    with pytest.raises(FileNotFoundError):
        read_folder(folder, "epochs")
    write_atomic(table, location(f"s3://{s3env.bucket}/tables/two/results/trials.parquet"))
    both = results.open(f"s3://{s3env.bucket}/tables")
    assert both.studies == ["one", "two"] and both.table("trials").num_rows == 4


# ----------------------------------------------------------------------------------------- a whole study

STUDY = {
    "name": "on-s3",
    "train": {"backbone": "vit_test_patch4_32", "epochs": 2, "batch_size": 64, "mlp_dim": 64, "dim": 32,
              "warmup_epochs": 0.5, "train_subset": 256, "knn_bank_subset": 128, "knn_eval_subset": 128,
              "checkpoint_every": 1, "monitor_every": 2, "monitor_bank": 128},
    "resources": {"workers": 1, "cpus_per_worker": 0.9, "driver_cpus": 0.1},
    "search": {"space": {"base_lr": {"log": [1.0e-4, 1.0e-3]}}, "num_samples": 2, "max_concurrent": 1, "seed": 5},
    "scheduler": {"type": "fifo"},
}


def _rows(uri: str, table: str = "trials") -> list[dict]:
    try:
        return results.open(uri).table(table).to_pylist()
    except FileNotFoundError:
        return []


def _objects(s3) -> dict[str, bytes]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1", aws_access_key_id=s3.access_key,
                          aws_secret_access_key=s3.secret_key)
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket)
            for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=s3.bucket, Key=k)["Body"].read() for k in keys}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def s3_study(request, s3, tmp_path_factory):
    """Launched from the CLI in its own process with its data_dir in the bucket too and its Optuna study in the
    default SQLite file (mirrored to the bucket) or in a PostgreSQL server (cluster/README.md's study), killed
    once its first trial has a checkpointed epoch, resumed here as on a new head node (an empty cache), then
    extended by one trial from yet another machine."""
    root = tmp_path_factory.mktemp("s3study")
    name = f"on-s3-{request.param}"
    uri = f"s3://{s3.bucket}/studies/{name}"
    with contextlib.ExitStack() as stack, pytest.MonkeyPatch.context() as mp:
        search, env = dict(STUDY["search"]), {**s3.env, "SSL_STUDY_CACHE": str(root / "cache")}
        if request.param == "postgresql":
            pg = stack.enter_context(postgres_server(root))
            search["storage"], env["PGPASSWORD"], env["PGPASSFILE"] = pg.url, pg.password, "/nonexistent/.pgpass"
        path = root / "study.yaml"
        path.write_text(yaml.safe_dump({**STUDY, "name": name, "search": search,
                                        "storage": f"s3://{s3.bucket}/studies", "data_dir": f"s3://{s3.bucket}/datasets"}))
        for key, value in env.items():
            mp.setenv(key, value)
        data.store._filesystem.cache_clear()
        driver = subprocess.Popen([sys.executable, "-m", "study", "launch", str(path)], cwd=root,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 600
        while not any(r["status"] == "running" and r["epochs_done"] >= 1 for r in _rows(uri)):
            assert driver.poll() is None, "the study ended before its driver could be killed"
            assert time.monotonic() < deadline, "no epoch within 10 minutes"
            time.sleep(0.5)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        killed = _rows(uri)
        time.sleep(2)  # let the killed session's processes go
        # The head node was lost with the driver: resume on a new one, whose cache is empty.
        mp.setenv("SSL_STUDY_CACHE", str(root / "new-head"))
        cluster.start_ray(None, num_cpus=2, object_store_memory=256 * 2**20)
        try:
            assert main(["resume", uri]) == 0
            resumed = _rows(uri)
            mp.setenv("SSL_STUDY_CACHE", str(root / "another-machine"))
            assert main(["extend", uri, "--trials", "1"]) == 0
        finally:
            ray.shutdown()
        yield uri, root, killed, resumed, search.get("storage"), env.get("PGPASSWORD")


@pytest.mark.cluster
def test_a_study_in_s3_survives_its_driver_and_is_extended_elsewhere(s3_study, s3env, monkeypatch):
    uri, root, killed, resumed, server, password = s3_study
    if password:
        monkeypatch.setenv("PGPASSWORD", password)
    assert len(killed) == 1 and killed[0]["status"] == "running", killed
    assert len(resumed) == 2 and all(r["status"] == "completed" for r in resumed), resumed
    final = _rows(uri)
    assert len(final) == 3 and all(r["status"] == "completed" for r in final), final
    epochs = _rows(uri, "epochs")
    assert sorted((e["trial_id"], e["epoch"]) for e in epochs) == sorted(
        (r["trial_id"], e) for r in final for e in (1, 2))  # every epoch once, none lost to the kill
    # The machine that extended it started with an empty cache: it took the Optuna study from the bucket (or
    # from the database server, and then no Optuna file is in the bucket).
    name = uri.rpartition("/")[2]
    db = root / "another-machine" / "studies" / "s3" / s3env.bucket / "studies" / name / "optuna.db"
    assert (location(uri) / "optuna.db").exists() == db.exists() == (server is None)
    trials = optuna.load_study(study_name=name, storage=open_storage(server or f"sqlite:///{db}")).trials
    assert [t.state for t in trials] == [STATE.COMPLETE] * 3
    assert sorted(t.value for t in trials) == pytest.approx(sorted(r["knn_top1"] for r in final))
    for row in final:  # checkpoints in the bucket, each with its exported backbone
        assert row["checkpoint"].startswith(f"{uri}/train/{row['trial_id']}/")
        assert (location(row["checkpoint"]) / "backbone.safetensors").is_file()
    assert not (root / "runs").exists() and not (root / "datasets").exists()


@pytest.mark.cluster
def test_status_best_results_report_duckdb_and_open_read_the_bucket(s3_study, s3env, capsys, monkeypatch):
    import duckdb

    uri, root, *_, password = s3_study
    if password:  # the report reads the Optuna study for its importance figure
        monkeypatch.setenv("PGPASSWORD", password)
    final = _rows(uri)
    assert main(["status", uri]) == 0
    assert "3 of 2+ trials reported; 3 completed" in capsys.readouterr().out
    assert main(["best", uri]) == 0
    best = yaml.safe_load(capsys.readouterr().out)
    assert best["metrics"]["knn_top1"] == max(r["knn_top1"] for r in final)
    assert best["backbone"].startswith(f"{uri}/train/")
    assert main(["results", uri, "--table", "epochs"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + 6
    assert main(["report", uri]) == 0
    page = Path(capsys.readouterr().out.strip())
    assert page.is_file() and (location(uri) / "report" / "report.html").read_bytes() == page.read_bytes()
    epochs = results.open(uri).epochs  # noqa: F841 - a pyarrow dataset over the bucket's files, DuckDB scans it
    [(count, best_knn)] = duckdb.sql("SELECT count(*), max(knn_top1) FROM epochs").fetchall()
    assert count == 6 and best_knn == pytest.approx(max(e["knn_top1"] for e in _rows(uri, "epochs")))
    # The FFCV files went to the bucket once, and each node's copy is checked against them.
    objects = _objects(s3env)
    assert any(k.startswith("datasets/") and k.endswith(".beton") for k in objects), sorted(objects)
    # Credentials only from the environment: no object of the study and no file it wrote holds the key (nor the
    # database's password).
    for secret in (s3env.secret_key.encode(), *([password.encode()] if password else [])):
        assert not [k for k, body in objects.items() if secret in body]
        assert not [p for p in root.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_reading_commands_on_a_bucket_they_cannot_read_are_one_line(s3env, capsys, monkeypatch):
    assert main(["status", f"s3://{s3env.bucket}/studies/none-here"]) == 2
    assert "no study found" in capsys.readouterr().err
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-key")
    data.store._filesystem.cache_clear()
    for command in ("status", "best", "report", "resume"):
        assert main([command, f"s3://{s3env.bucket}/studies/x"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "the credentials were refused" in err and "not-the-key" not in err, err


def test_a_file_uri_is_a_plain_path_and_a_saved_study_names_the_bucket(s3env, tmp_path):
    from study.spec import load_spec, snapshot

    assert location(f"file://{tmp_path}/runs") == tmp_path / "runs" and not data.store.is_remote("file:///x")
    spec = load_spec(study_file(tmp_path, "saved", storage=f"s3://{s3env.bucket}/studies/",
                                 data_dir=f"file://{tmp_path}/d"))
    assert str(spec.study_dir) == f"s3://{s3env.bucket}/studies/saved" and spec.remote
    saved = snapshot(spec)
    assert saved["storage"] == f"s3://{s3env.bucket}/studies" and saved["data_dir"] == str(tmp_path / "d")
    assert spec.optuna_url.startswith(f"sqlite:///{tmp_path / 'cache' / 'studies' / 's3' / s3env.bucket}")


@pytest.mark.cluster
def test_a_failed_trial_of_a_study_in_s3_has_its_error_in_the_table_and_its_log_in_the_bucket(s3env, tmp_path):
    """A trial whose worker raises (``resume_from`` names no checkpoint): the study ends, the trials table in the
    bucket says ``failed`` with the error's line and where its log is, and that log is in the bucket."""
    name, missing = "fails-on-s3", "/nonexistent/checkpoint"
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**STUDY, "name": name, "storage": f"s3://{s3env.bucket}/studies",
                                    "data_dir": str(ROOT / "datasets"),
                                    "train": {**STUDY["train"], "epochs": 1},
                                    "search": {"space": {"resume_from": {"choice": [missing]}}, "sampler": "grid",
                                               "num_samples": 1, "seed": 0}}))
    out = subprocess.run([sys.executable, "-m", "study", "launch", str(path)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    uri = f"s3://{s3env.bucket}/studies/{name}"
    (row,) = _rows(uri)
    assert row["status"] == "failed", (out.stdout[-1500:], out.stderr[-1500:])
    assert row["error"].startswith("FileNotFoundError") and missing in row["error"], row["error"]
    log = location(uri) / "logs" / f"{row['trial_id']}.log"
    assert row["error"].endswith(f"(full log: {uri}/logs/{row['trial_id']}.log)"), row["error"]
    text = log.read_bytes().decode()
    assert f"trial {row['trial_id']} failed" in text and "FileNotFoundError" in text
