"""optuna-dashboard (0.21.0, the dev extra) on a study's Optuna storage, as the docs tell to open it: its WSGI app
``optuna_dashboard.wsgi(ARG)`` loads the storage from the same argument as ``optuna-dashboard ARG`` (its
``get_storage``, which guesses the storage from it), with ARG from ``study.optuna_storage.dashboard_argument``, and
is asked for the study as the browser asks (``/api/studies``, then ``/api/studies/ID``): it must show every
finished trial with its value.

SQLite: the real grid study (``conftest.stopping_studies``' enforce, the default ``optuna.db``); journal: the real
one-range study (``conftest.lr_range_study``, ``storage: journal``); PostgreSQL (a server of this module's,
tests/servers.py): the grid study's trials copied by Optuna into the database through the study's own
``open_storage``. No Ray runs here beyond the shared fixtures."""

import json
import math
from wsgiref.util import setup_testing_defaults

import optuna
import optuna_dashboard
import pyarrow.parquet as pq
import pytest
from servers import postgres_server

from study.optuna_storage import dashboard_argument, open_storage

FINISHED = {"COMPLETE": "Complete", "PRUNED": "Pruned", "FAIL": "Fail"}


@pytest.fixture(scope="module")
def pg(tmp_path_factory):
    with postgres_server(tmp_path_factory.mktemp("pg")) as server:
        yield server


@pytest.fixture
def study(request, stopping_studies, lr_range_study, pg, monkeypatch):
    """(spec, its storage URL) of the kind of storage the test names."""
    grid = stopping_studies["enforce"]
    if request.param == "sqlite":
        return grid, grid.optuna_url
    if request.param == "journal":
        return lr_range_study, lr_range_study.optuna_url
    monkeypatch.setenv("PGPASSWORD", pg.password)  # as a study and the dashboard get it: never in the URL
    if grid.name not in optuna.get_all_study_names(open_storage(pg.url)):
        optuna.copy_study(from_study_name=grid.name, from_storage=open_storage(grid),
                          to_storage=open_storage(pg.url))
    return grid, pg.url


def get(app, path: str) -> dict:
    """``GET path`` from the WSGI ``app``, its JSON body; a one-line failure on a status other than 200."""
    environ = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    status = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status[0].startswith("200"), f"GET {path}: {status[0]}: {body[:300]!r}"
    return json.loads(body)


@pytest.mark.parametrize("study", ["sqlite", "journal", "postgresql"], indirect=True)
def test_the_dashboard_shows_every_finished_trial_with_its_value(study):
    spec, url = study
    app = optuna_dashboard.wsgi(dashboard_argument(url))
    (summary,) = [s for s in get(app, "/api/studies")["study_summaries"] if s["study_name"] == spec.name]
    shown = {t["number"]: t for t in get(app, f"/api/studies/{summary['study_id']}")["trials"]}
    held = optuna.load_study(study_name=spec.name, storage=open_storage(url)).trials
    finished = [t for t in held if t.state.name in FINISHED]
    assert len(finished) == len(held) == len(pq.read_table(spec.study_dir / "results" / "trials.parquet"))
    for t in finished:
        assert shown[t.number]["state"] == FINISHED[t.state.name]
        params = {p["name"]: p["param_external_value"] for p in shown[t.number]["params"]}
        assert params == {k: str(v) for k, v in t.params.items()}
        if t.value is not None:
            assert shown[t.number]["values"] == [t.value]
    # the study's own results say the same: each completed trial's knn_top1 is a value the dashboard shows
    values = [t["values"][0] for t in shown.values() if t.get("values")]
    completed = [r for r in pq.read_table(spec.study_dir / "results" / "trials.parquet").to_pylist()
                 if r["status"] == "completed" and math.isfinite(r["knn_top1"])]
    assert completed
    for row in completed:
        assert any(v == pytest.approx(row["knn_top1"]) for v in values), (row, values)
