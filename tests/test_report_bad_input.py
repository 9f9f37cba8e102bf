"""``ssl-study report`` on bad input: one line on stderr and exit 2, naming the value and what is accepted, or,
for the optional parameter importance, a report that says in one line why it has none.

No study runs here: each case writes a study directory by hand (the resolved study file and Parquet tables in
the results writer's schemas), so these take seconds, not the minutes of tests/test_report.py.
"""

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from studies import write_study

from study import cli, report
from study.results import schema
from study.spec import SpecError, snapshot

ROOT = Path(__file__).resolve().parents[1]
STUDY = {
    "name": "tiny-bad-input",
    "train": {"backbone": "vit_test_patch4_32", "epochs": 2, "batch_size": 64},
    "resources": {"workers": 1, "cpus_per_worker": 0.9, "driver_cpus": 0.1},
    "search": {"space": {"base_lr": {"choice": [1.0e-4, 1.0e4]}, "batch_size": {"choice": [32, 64]}},
               "sampler": "grid", "num_samples": 4},
    "scheduler": {"type": "fifo"},
}
TRIALS = [
    {"trial_id": "t1", "status": "completed", "base_lr": 1.0e-4, "batch_size": 32, "epochs_done": 2,
     "knn_top1": 0.31, "knn_top1_best": 0.31, "knn_top1_init": 0.12, "loss": 5.1, "events": 0},
    {"trial_id": "t2", "status": "completed", "base_lr": 1.0e-4, "batch_size": 64, "epochs_done": 2,
     "knn_top1": 0.28, "knn_top1_best": 0.29, "knn_top1_init": 0.11, "loss": 5.3, "events": 0},
    {"trial_id": "t3", "status": "diverged", "base_lr": 1.0e4, "batch_size": 32, "epochs_done": 1,
     "knn_top1": None, "loss": float("nan"), "verdict": "diverged", "verdict_epoch": 1,
     "verdict_reason": "non-finite loss", "events": 1},
    {"trial_id": "t4", "status": "diverged", "base_lr": 1.0e4, "batch_size": 64, "epochs_done": 1,
     "knn_top1": None, "loss": float("nan"), "verdict": "diverged", "verdict_epoch": 1,
     "verdict_reason": "non-finite loss", "events": 1},
]
EPOCHS = [
    {"trial_id": "t1", "epoch": 1, "knn_top1": 0.25, "loss": 5.5, "dense_knn_min": 0.2},
    {"trial_id": "t1", "epoch": 2, "knn_top1": 0.31, "loss": 5.1, "dense_knn_min": 0.27},
    {"trial_id": "t2", "epoch": 1, "knn_top1": 0.22, "loss": 5.6, "dense_knn_min": 0.2},
    {"trial_id": "t2", "epoch": 2, "knn_top1": 0.28, "loss": 5.3, "dense_knn_min": 0.25},
    {"trial_id": "t3", "epoch": 1, "knn_top1": float("nan"), "loss": float("nan"), "dense_knn_min": 0.1},
    {"trial_id": "t4", "epoch": 1, "knn_top1": float("nan"), "loss": float("nan"), "dense_knn_min": 0.1},
]
EVENTS = [{"trial_id": t, "step": 3, "epoch": 1, "kind": "nonfinite", "layer": "loss", "magnitude": float("nan")}
          for t in ("t3", "t4")]


def make_study(root: Path, trials: list[dict] | None = TRIALS):
    """A study directory as ``launch`` leaves it: ``study.yaml`` and, unless ``trials`` is None, the results
    tables (``trials`` rows, and the epochs and events above)."""
    spec = write_study(root, STUDY, data_dir=ROOT / "datasets")
    spec.study_dir.mkdir(parents=True)
    (spec.study_dir / "study.yaml").write_text(yaml.safe_dump(snapshot(spec)))
    if trials is not None:
        tables = {"trials": (trials, schema.trials_schema(spec.params)), "epochs": (EPOCHS, schema.EPOCHS_SCHEMA),
                  "events": (EVENTS, schema.EVENTS_SCHEMA)}
        (spec.study_dir / "results").mkdir()
        for name, (rows, table_schema) in tables.items():
            table = pa.Table.from_pylist(rows, schema=table_schema)
            pq.write_table(table, spec.study_dir / "results" / f"{name}.parquet")
    return spec


def cli_error(capsys, *argv: str) -> str:
    """The one line ``ssl-study report ARGV`` prints on stderr, after checking it exits 2."""
    assert cli.main(["report", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ssl-study: error: ") and err.count("\n") == 1, err
    return err


def importance_note(page: Path) -> str:
    text = page.read_text()
    section = text[text.index('<figure id="importance"'):]
    return section[:section.index("</figure>")]


# ------------------------------------------------------------------------------------------ the study itself


def test_unknown_study(tmp_path, capsys):
    err = cli_error(capsys, "no-such-study", "--storage", str(tmp_path))
    assert "no-such-study: no study found" in err and str(tmp_path / "no-such-study" / "study.yaml") in err


def test_study_without_results(tmp_path, capsys):
    spec = make_study(tmp_path, trials=None)
    err = cli_error(capsys, str(spec.study_dir))
    assert "no results to report yet" in err and str(spec.study_dir / "results" / "trials.parquet") in err
    assert not (spec.study_dir / "report").exists()


def test_empty_trials_table(tmp_path, capsys):
    spec = make_study(tmp_path, trials=[])
    err = cli_error(capsys, str(spec.study_dir))
    assert f"{spec.study_dir / 'results' / 'trials.parquet'}: no trials to report yet" in err
    assert not (spec.study_dir / "report").exists()


@pytest.mark.parametrize("content", [b"", b"not parquet at all"], ids=["zero-bytes", "garbage"])
def test_unreadable_results_table(tmp_path, capsys, content):
    spec = make_study(tmp_path)
    (spec.study_dir / "results" / "epochs.parquet").write_bytes(content)
    err = cli_error(capsys, str(spec.study_dir))
    assert f"{spec.study_dir / 'results' / 'epochs.parquet'}: not a readable Parquet table" in err


# ------------------------------------------------------------------------------------------------- --params


def test_params_not_in_the_study(tmp_path, capsys):
    spec = make_study(tmp_path)
    err = cli_error(capsys, str(spec.study_dir), "--params", "base_lr", "warmup")
    assert "--params: warmup is not a column of the trials table" in err
    assert "base_lr, batch_size" in err  # the searched parameters, the ones that make sense
    assert not (spec.study_dir / "report").exists()  # refused before anything is written


def test_params_twice(tmp_path):
    spec = make_study(tmp_path)
    with pytest.raises(SpecError, match="got base_lr twice"):
        report.write_report(spec.study_dir, params=("base_lr", "base_lr"))


# ---------------------------------------------------------------------------------------------------- --out


def test_out_is_a_file(tmp_path, capsys):
    spec = make_study(tmp_path)
    out = tmp_path / "a-file"
    out.write_text("mine")
    err = cli_error(capsys, str(spec.study_dir), "--out", str(out))
    assert f"{out}: not a directory; --out takes a directory" in err
    assert out.read_text() == "mine"
    err = cli_error(capsys, str(spec.study_dir), "--out", str(out / "below"))
    assert f"{out / 'below'}: cannot write the report there (Not a directory)" in err


@pytest.fixture
def unwritable(tmp_path):
    """A directory this process cannot create files in (root ignores permissions: then sysfs, which refuses)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o555)
        yield folder
        folder.chmod(0o755)
    elif Path("/sys/kernel").is_dir():
        yield Path("/sys/kernel")
    else:
        pytest.skip("running as root without sysfs: no unwritable directory to try")


def test_out_unwritable(tmp_path, capsys, unwritable):
    spec = make_study(tmp_path)
    err = cli_error(capsys, str(spec.study_dir), "--out", str(unwritable))
    assert f"{unwritable}: cannot write the report there" in err


# ----------------------------------------------------------------------------------- the Optuna storage


def test_no_optuna_storage_is_explained(tmp_path):
    spec = make_study(tmp_path)
    page = report.write_report(spec.study_dir)
    for name in ("curves", "events", "heatmap", "status", "parallel"):
        assert (page.parent / f"{name}.png").is_file(), name
    assert f"Not computed: no Optuna storage found ({spec.study_dir / 'optuna.db'} does not exist)" in \
        importance_note(page)
    assert not (spec.study_dir / "optuna.db").exists()  # not created by looking


@pytest.mark.parametrize("content", [b"", b"garbage " * 100], ids=["zero-bytes", "garbage"])
def test_bad_optuna_database_is_explained(tmp_path, content):
    spec = make_study(tmp_path)
    db = spec.study_dir / "optuna.db"
    db.write_bytes(content)
    note = importance_note(report.write_report(spec.study_dir))
    assert f"Not computed: {db} is not an SQLite database" in note and "\n" not in note
    assert db.read_bytes() == content  # the report reads; it never writes Optuna's schema into the file


def test_a_run_judged_unstable_is_drawn_against_its_noise(tmp_path):
    """stopped.png: drawn for a trial the policy judged unstable (the diverged ones need no noise band), absent
    when no trial was."""
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    assert not (report.write_report(make_study(tmp_path / "a").study_dir).parent / "stopped.png").exists()
    unstable = {**TRIALS[1], "status": "unstable", "verdict": "unstable", "verdict_epoch": 2,
                "verdict_reason": "kNN top-1 fell 8.0 points below its best epoch, 5.5 standard errors (> 2.0)"}
    page = report.write_report(make_study(tmp_path / "b", [TRIALS[0], unstable, *TRIALS[2:]]).study_dir)
    png = page.parent / "stopped.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 'src="stopped.png"' in page.read_text()
