"""The Optuna study in a database server, a journal file or SQLite (study/optuna_storage.py), against a real
PostgreSQL server this module starts (tests/servers.py): trials survive a killed writer, bad storages are one
line (password masked) before Ray starts, a real study runs and is extended on PostgreSQL, and optuna-dashboard
opens what the study wrote with the commands cluster/README.md gives."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import psycopg2
import pyarrow.parquet as pq
import pytest
import ray
import yaml
from servers import postgres_server
from studies import write_study

from study import cluster
from study.cli import main
from study.errors import SpecError
from study.optuna_storage import check_storage, dashboard_argument, driver_url, open_storage
from study.report.importance import param_importance
from study.search import close_orphans
from study.spec import DEFAULT_STUDY, load_spec, with_default_storage

ROOT = Path(__file__).resolve().parents[1]
STATE = optuna.trial.TrialState


@pytest.fixture(scope="module")
def pg(tmp_path_factory):
    with postgres_server(tmp_path_factory.mktemp("pg")) as server:
        yield server


@pytest.fixture
def pgenv(pg, monkeypatch):
    """The server, with its password in PGPASSWORD (as a study gets it) and no ~/.pgpass to fall back on."""
    monkeypatch.setenv("PGPASSWORD", pg.password)
    monkeypatch.setenv("PGPASSFILE", "/nonexistent/.pgpass")
    return pg


def storage_url(kind: str, pg, tmp_path: Path) -> str:
    return {"postgresql": pg.url, "journal": f"journal://{tmp_path / 'nfs' / 'optuna.journal'}",
            "sqlite": f"sqlite:///{tmp_path / 'optuna.db'}"}[kind]


def study_file(tmp_path: Path, **search) -> Path:
    data = yaml.safe_load(DEFAULT_STUDY.read_text())
    data["search"].update(search)
    data["storage"] = str(tmp_path / "runs")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ----------------------------------------------------------------------------- a killed writer, then a reader

WRITER = """
import sys, time
import optuna
from study.optuna_storage import open_storage
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study(study_name=sys.argv[2], storage=open_storage(sys.argv[1]), direction="maximize")
for _ in range(2):
    trial = study.ask()
    study.tell(trial, 2 * trial.suggest_float("x", 0.0, 1.0))
study.ask().suggest_float("x", 0.0, 1.0)  # left RUNNING: the writer is killed before it ends
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("kind", ["postgresql", "journal", "sqlite"])
def test_trials_survive_a_killed_writer_and_are_read_back_by_a_second_open(kind, pgenv, tmp_path):
    url, name = storage_url(kind, pgenv, tmp_path), f"killed-{kind}"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, url, name], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready", writer.stderr.read()
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    study = optuna.load_study(study_name=name, storage=open_storage(url))  # a new process's view: a new object
    assert [t.state for t in study.trials] == [STATE.COMPLETE, STATE.COMPLETE, STATE.RUNNING]
    assert all(t.value == pytest.approx(2 * t.params["x"]) for t in study.trials[:2])
    assert close_orphans(url, name) == 1  # what resume does with a trial the killed driver had asked
    again = optuna.load_study(study_name=name, storage=open_storage(url))
    assert [t.state for t in again.trials] == [STATE.COMPLETE, STATE.COMPLETE, STATE.FAIL]
    assert again.best_value == pytest.approx(max(t.value for t in study.trials[:2]))
    if kind == "postgresql":  # the trials are in the server's database, not in some local file
        with psycopg2.connect(host=pgenv.host, port=pgenv.port, user=pgenv.user, dbname=pgenv.database) as c, \
                c.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM trials JOIN studies USING (study_id) WHERE study_name = %s", (name,))
            assert cursor.fetchone()[0] == 3
        assert not list(tmp_path.iterdir())
    if kind == "journal":  # the NFS-safe lock is a file created next to the journal, gone once released
        journal = Path(url.removeprefix("journal://"))
        assert journal.is_file() and sorted(p.name for p in journal.parent.iterdir()) == ["optuna.journal"]


# ----------------------------------------------------------------------------- bad storages: one line, masked


def one_line(error: pytest.ExceptionInfo, password: str) -> str:
    text = str(error.value)
    assert "\n" not in text and password not in text, text
    return text


def test_check_storage_accepts_the_server_and_the_files(pgenv, tmp_path):
    check_storage(pgenv.url)
    check_storage(driver_url(pgenv.url))
    check_storage(f"journal://{tmp_path / 'a' / 'b' / 'optuna.journal'}")  # its folders can be created
    check_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert not list(tmp_path.iterdir())  # checking creates nothing


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("closed port", "cannot connect (connection to server at \"127.0.0.1\", port {closed} failed: Connection "
                        "refused); check that the server runs"),
        ("wrong password", "password authentication failed for user \"ssl\"); the password comes from PGPASSWORD"),
        ("no password", "no password supplied); the password comes from PGPASSWORD or ~/.pgpass"),
        ("unknown database", "database \"nodb\" does not exist"),
        ("unknown host", "could not translate host name \"nohost.invalid\" to address"),
        ("password in the URL", "'postgresql://ssl:***@127.0.0.1:{port}/study' holds a password, which the study's "
                                "saved study.yaml and its messages would show; give 'postgresql://ssl@127.0.0.1:{port}"
                                "/study' and set PGPASSWORD"),
        ("password in the query", "'postgresql://ssl@127.0.0.1:{port}/study?password=***' holds a password"),
    ],
)
def test_an_unusable_database_is_one_line_naming_search_storage(pgenv, monkeypatch, case, expected):
    closed = cluster.free_port()
    url = {"closed port": f"postgresql://ssl@127.0.0.1:{closed}/study",
           "unknown database": pgenv.url.rsplit("/", 1)[0] + "/nodb",
           "unknown host": "postgresql://ssl@nohost.invalid/study",
           "password in the URL": f"postgresql://ssl:{pgenv.password}@127.0.0.1:{pgenv.port}/study",
           "password in the query": f"{pgenv.url}?password={pgenv.password}"}.get(case, pgenv.url)
    if case == "wrong password":
        monkeypatch.setenv("PGPASSWORD", "not-the-password")
    if case == "no password":
        monkeypatch.delenv("PGPASSWORD")
    started = time.monotonic()
    with pytest.raises(SpecError) as error:
        check_storage(url)
    text = one_line(error, pgenv.password)
    assert "not-the-password" not in text
    assert text.startswith("search.storage: ") and expected.format(closed=closed, port=pgenv.port) in text, text
    assert time.monotonic() - started < 10
    with pytest.raises(SpecError) as error:  # opening it says the same, instead of SQLAlchemy's traceback
        open_storage(url)
    assert one_line(error, pgenv.password).startswith("search.storage: ")


def test_files_that_cannot_hold_the_study_are_one_line(tmp_path):
    (tmp_path / "dir.journal").mkdir()
    (tmp_path / "notes.txt").write_text("not a database")
    sqlite = tmp_path / "optuna.db"
    optuna.create_study(study_name="s", storage=f"sqlite:///{sqlite}")
    for url, expected in [(f"journal://{tmp_path / 'dir.journal'}", "is a directory"),
                          (f"journal://{sqlite}", f"is an SQLite database, not a journal; use 'sqlite:///{sqlite}'"),
                          (f"sqlite:///{tmp_path / 'notes.txt'}", "is not an SQLite database"),
                          (f"journal://{tmp_path / 'notes.txt' / 'optuna.journal'}", "is not a writable directory")]:
        with pytest.raises(SpecError, match=r"^search\.storage: ") as error:
            check_storage(url)
        assert expected in one_line(error, "no password here")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("redis://127.0.0.1/0", "search.storage: 'redis://127.0.0.1/0' is not an Optuna storage URL; accepted: "
                                "journal, journal:///abs/path/optuna.journal, sqlite:///..., postgresql://..."),
        ("journal://runs/optuna.journal", "search.storage: 'journal://runs/optuna.journal': a journal file needs an "
                                          "absolute file path, journal:///abs/path/optuna.journal (three slashes)"),
        ("postgresql://ssl:hunter2@db.example:5432/study", "search.storage: 'postgresql://ssl:***@db.example:5432/"
                                                            "study' holds a password"),
        ("mysql://ssl:hunter2@db/study", "give 'mysql://ssl@db/study' and put it in an option file instead"),
    ],
)
def test_the_study_file_refuses_bad_storages_in_one_line(tmp_path, value, expected):
    with pytest.raises(SpecError) as error:
        load_spec(study_file(tmp_path, storage=value))
    assert expected in one_line(error, "hunter2") and str(error.value).startswith(f"{tmp_path / 'study.yaml'}: ")


def test_journal_shorthand_and_the_default(tmp_path):
    spec = load_spec(study_file(tmp_path, storage="journal"))
    assert spec.optuna_url == f"journal://{spec.study_dir / 'optuna.journal'}"
    from study.spec import snapshot

    assert snapshot(spec)["search"]["storage"] == "journal"  # the saved study keeps the shorthand: it moves along
    journal = spec.study_dir / "optuna.journal"
    assert "no Optuna storage found" in param_importance(spec, spec.study_dir)[1] and not journal.exists()
    study = optuna.create_study(study_name=spec.name, storage=open_storage(spec), direction="maximize")
    study.optimize(lambda t: t.suggest_float("base_lr", 1e-4, 1e-3, log=True), n_trials=3)
    assert journal.is_file() and "3 COMPLETE" in param_importance(spec, spec.study_dir)[1]  # the report reads it
    spec = load_spec(study_file(tmp_path))
    spec = with_default_storage(spec)  # a study directory on a local disk keeps SQLite
    assert spec.search.storage is None and spec.optuna_url == f"sqlite:///{spec.study_dir / 'optuna.db'}"


# ----------------------------------------------------------------------------- the CLI refuses before Ray


@pytest.mark.parametrize("dry_run", [False, True])
def test_launch_on_an_unreachable_database_exits_2_before_ray(tmp_path, capsys, dry_run):
    port = cluster.free_port()
    path = study_file(tmp_path, storage=f"postgresql://ssl@127.0.0.1:{port}/study")
    assert main(["launch", str(path), *(["--dry-run"] if dry_run else [])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"ssl-study: error: {path}: search.storage: 'postgresql://ssl@127.0.0.1:{port}/study': "
                          f"cannot connect (connection to server at \"127.0.0.1\", port {port} failed: Connection "
                          f"refused)"), err
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_launch_with_a_password_in_the_url_exits_2_and_prints_no_password(tmp_path, capsys):
    path = study_file(tmp_path, storage="postgresql://ssl:hunter2@127.0.0.1:5999/db")
    assert main(["launch", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hunter2" not in err and "'postgresql://ssl:***@127.0.0.1:5999/db'" in err, err
    assert "set PGPASSWORD" in err and not ray.is_initialized()


# ----------------------------------------------------------------------------- a real study on PostgreSQL

STUDY = {
    "name": "on-postgres",
    "train": {"backbone": "vit_test_patch4_32", "epochs": 1, "batch_size": 64, "mlp_dim": 64, "dim": 32,
              "warmup_epochs": 0.5, "train_subset": 256, "knn_bank_subset": 128, "knn_eval_subset": 128,
              "monitor_every": 2, "monitor_bank": 128},
    "resources": {"workers": 1, "cpus_per_worker": 0.9, "driver_cpus": 0.1},
    "search": {"space": {"base_lr": {"log": [1.0e-4, 1.0e-3]}}, "num_samples": 2, "max_concurrent": 2, "seed": 3},
    "scheduler": {"type": "fifo"},
}


def trials(spec) -> list[dict]:
    return pq.read_table(spec.study_dir / "results" / "trials.parquet").to_pylist()


@pytest.fixture(scope="module")
def pg_study(pg, tmp_path_factory):
    """The tiny study launched from the CLI on the PostgreSQL storage, then extended by one trial."""
    root = tmp_path_factory.mktemp("pgstudy")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PGPASSWORD", pg.password)
        spec = write_study(root, {**STUDY, "search": {**STUDY["search"], "storage": pg.url}},
                           data_dir=ROOT / "datasets")
        cluster.start_ray(None, num_cpus=2, object_store_memory=256 * 2**20)
        try:
            assert main(["launch", spec.source]) == 0
            launched = trials(spec)
            first = optuna.load_study(study_name=spec.name, storage=open_storage(pg.url)).trials
            assert main(["extend", str(spec.study_dir), "--trials", "1"]) == 0
        finally:
            ray.shutdown()
        final = optuna.load_study(study_name=spec.name, storage=open_storage(pg.url)).trials
    return spec, launched, first, trials(spec), final


@pytest.mark.cluster
def test_a_study_on_postgresql_runs_and_is_extended(pg_study, pgenv):
    spec, launched, first, final_rows, final = pg_study
    pg = pgenv
    assert len(launched) == 2 and all(r["status"] == "completed" for r in launched), launched
    assert [t.state for t in first] == [STATE.COMPLETE] * 2
    by_lr = {round(r["base_lr"], 12): r for r in launched}
    for t in first:  # what Optuna holds in the server is what the results say
        assert t.value == pytest.approx(by_lr[round(t.params["base_lr"], 12)]["knn_top1"])
    assert len(final_rows) == 3 and [t.state for t in final] == [STATE.COMPLETE] * 3
    assert [(t.number, t.value) for t in final[:2]] == [(t.number, t.value) for t in first]
    added = final[2]
    row = next(r for r in final_rows if round(r["base_lr"], 12) == round(added.params["base_lr"], 12))
    assert added.number == 2 and added.value == pytest.approx(row["knn_top1"])
    saved = (spec.study_dir / "study.yaml").read_text()
    assert yaml.safe_load(saved)["search"]["storage"] == pg.url and pg.password not in saved
    assert not (spec.study_dir / "optuna.db").exists() and not (spec.study_dir / "optuna.journal").exists()
    assert "3 COMPLETE" in param_importance(spec, spec.study_dir)[1]  # `ssl-study report` reads the server too


# ----------------------------------------------------------------------------- optuna-dashboard


@pytest.mark.parametrize("kind", ["postgresql", "journal", "sqlite"])
def test_optuna_dashboard_opens_what_the_study_wrote(kind, pgenv, tmp_path):
    url, name = storage_url(kind, pgenv, tmp_path), f"dashboard-{kind}"
    study = optuna.create_study(study_name=name, storage=open_storage(url), direction="maximize")
    study.enqueue_trial({"x": 0.25})
    study.optimize(lambda t: 2 * t.suggest_float("x", 0.0, 1.0), n_trials=2)
    port = cluster.free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("optuna-dashboard")), dashboard_argument(url),
                               "--host", "127.0.0.1", "--port", str(port), "--server", "wsgiref", "--quiet"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    summaries = json.load(response)["study_summaries"]
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()
                assert time.monotonic() < deadline, "optuna-dashboard did not answer within 60 s"
                time.sleep(0.3)
        found = next(s for s in summaries if s["study_name"] == name)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{found['study_id']}", timeout=10) as r:
            detail = json.load(r)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert [t["state"] for t in detail["trials"]] == ["Complete", "Complete"]
    assert detail["trials"][0]["params"][0]["param_internal_value"] == 0.25
    assert [t["values"] for t in detail["trials"]] == [[t.value] for t in study.trials]
