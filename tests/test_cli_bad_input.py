"""Bad input to `ssl-study results / replay / submit / status / best / resume / extend`: one line on stderr naming
the value and what is accepted, exit code 2 (1 for a cluster that does not answer), never a traceback.

No study runs: the results cases read a trials table written by hand; most cases call ``study.cli.main`` in this
process, a few the real command, to see that nothing else reaches the terminal.
"""

import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from studies import write_study

from study.cli import main

ROOT = Path(__file__).resolve().parents[1]
SSL_STUDY = str(Path(sys.executable).with_name("ssl-study"))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """``runs/s`` with a trials table, an empty folder, a folder that is no record and a valid study file whose
    paths are absolute (what `submit` wants)."""
    root = tmp_path_factory.mktemp("bad")
    (root / "runs" / "s" / "results").mkdir(parents=True)
    pq.write_table(pa.table({"trial_id": ["a", "b"], "status": ["completed", "pruned"], "knn_top1": [0.5, 0.4]}),
                   root / "runs" / "s" / "results" / "trials.parquet")
    (root / "empty").mkdir()
    (root / "notes").mkdir()
    (root / "notes" / "a.txt").write_text("not a record")
    write_study(root, {"name": "ok", "search": {"space": {"base_lr": {"log": [1.0e-4, 1.0e-3]}}}},
                data_dir=ROOT / "datasets")
    (root / "broken.yaml").write_text("name: x\ntrain: [1, 2\n")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = [
    # results
    (["results", "s", "--where", "knn_top1 >"], "--where 'knn_top1 >': not an expression"),
    (["results", "s", "--where", "nope > 1"], "unknown column 'nope'; columns: trial_id, status, knn_top1"),
    (["results", "s", "--where", "len(status) > 1"], "'len(status)' is not supported (columns, literals"),
    (["results", "s", "--where", "knn_top1 > 'a'"], "no kernel matching input types (double, string); the columns "
                                                    "it names: knn_top1 (double)"),
    (["results", "s", "--where", "status == 1"], "the columns it names: status (string)"),
    (["results", "s", "--where", "status"], "must evaluate to bool, but status evaluates to string"),
    (["results", "s", "--where", "knn_top1 > 1 / 0"], "division by zero"),
    (["results", "s", "--where", "knn_top1 in [1, 'a']"], "Could not convert 'a'"),
    (["results", "s", "--sort", "nope"], "--columns/--sort: unknown column 'nope'; columns: trial_id"),
    (["results", "s", "--columns", "trial_id", "nope"], "unknown column 'nope'"),
    (["results", "s", "--format", "bad"], "argument --format: invalid choice: 'bad' (choose from 'table', 'csv', "
                                          "'json', 'parquet')"),
    (["results", "s", "--format", "parquet", "--output", "{root}/no/such/dir/x.parquet"],
     "--output '{root}/no/such/dir/x.parquet': cannot write it (No such file or directory)"),
    (["results", "s", "--format", "parquet"], "--format parquet: give --output FILE"),
    (["results", "nostudy"], "nostudy: no results (looked for {root}/runs/nostudy/results/"),
    (["results", "{root}/empty"], "{root}/empty: no results (looked for {root}/empty/results/ and "
                                  "{root}/empty/*/results/)"),
    # replay
    (["replay", "{root}/missing"], "{root}/missing: no record found"),
    (["replay", "{root}/notes"], "{root}/notes: no record found"),
    (["replay", "--policy", "max_dips"], "--policy 'max_dips': expected KEY=VALUE with KEY one of: grace_epochs"),
    (["replay", "--policy", "nope=1"], "--policy 'nope=1': expected KEY=VALUE"),
    (["replay", "--policy", "max_dips=two"], "--policy max_dips: expected int, got 'two'"),
    (["replay", "--seeds", "0"], "argument --seeds: expected an integer >= 1, got '0'"),
    (["replay", "--seeds", "-2"], "argument --seeds: expected an integer >= 1, got '-2'"),
    (["replay", "--trials", "0"], "argument --trials: expected an integer >= 1, got '0'"),
    (["replay", "--budget", "-1"], "--budget: a fraction of the grid's compute in (0, 10], got -1"),
    (["replay", "--sampler", "bayes"], "argument --sampler: invalid choice: 'bayes' (choose from 'tpe', 'random'"),
    (["replay", "--scheduler", "pbt"],
     "argument --scheduler: invalid choice: 'pbt' (choose from 'asha', 'hyperband', 'fifo')"),
    (["replay", "--startup", "lhs"], "argument --startup: invalid choice: 'lhs' (choose from 'random', 'sobol')"),
    (["replay", "--grace-period", "0"], "argument --grace-period: expected an integer >= 1, got '0'"),
    (["replay", "--reduction-factor", "1"], "argument --reduction-factor: expected an integer >= 2, got '1'"),
    (["replay", "--startup-trials", "-1"], "argument --startup-trials: expected an integer >= 0, got '-1'"),
    # submit
    (["submit", "{root}/missing.yaml", "--address", "http://127.0.0.1:8265"], "{root}/missing.yaml: study file "
                                                                             "not found"),
    (["submit", "{root}/broken.yaml", "--address", "http://127.0.0.1:8265"], "{root}/broken.yaml: not valid YAML"),
    (["submit", "{root}/ok.yaml", "--address", "head:8265"], "--address 'head:8265': expected the Ray dashboard's "
                                                             "URL, http://HOST:PORT"),
    (["submit", "{root}/ok.yaml", "--address", "http://head:port"], "--address 'http://head:port': expected"),
    (["submit", "{root}/ok.yaml", "--address", "ray://head:10001"], "--address 'ray://head:10001': expected"),
    # status, best, resume, extend
    *[([command, "nostudy", *extra], "nostudy: no study found (looked for nostudy/study.yaml and "
                                     "{root}/runs/nostudy/study.yaml)")
      for command, extra in (("status", []), ("best", []), ("resume", []), ("extend", ["--trials", "1"]))],
    (["extend", "s", "--trials", "0"], "argument --trials: expected an integer >= 1, got '0'"),
    (["extend", "s", "--trials", "-3"], "argument --trials: expected an integer >= 1, got '-3'"),
    (["extend", "s"], "the following arguments are required: --trials; `ssl-study extend --help` shows the usage"),
]


@pytest.mark.parametrize(("argv", "expected"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_is_one_line_and_exit_2(root, capsys, monkeypatch, argv, expected):
    monkeypatch.chdir(root)
    argv = [a.format(root=root) for a in argv] + (["--storage", str(root / "runs")] if argv[0] != "submit" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ssl-study: error: "), err
    assert expected.format(root=root) in err


def test_a_cluster_that_does_not_answer_is_one_line_before_anything_is_sent(root, capsys):
    address = f"http://127.0.0.1:{free_port()}"
    assert main(["submit", str(root / "ok.yaml"), "--address", address]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ssl-study: error: could not reach the Ray dashboard at {address} ")


@pytest.mark.parametrize(("argv", "code", "expected"), [
    (["results", "runs/s", "--where", "knn_top1 > 'a'"], 2, "the columns it names: knn_top1 (double)"),
    (["replay", "--seeds", "0"], 2, "argument --seeds: expected an integer >= 1, got '0'"),
    (["submit", "ok.yaml", "--address", "http://127.0.0.1:{port}"], 1, "could not reach the Ray dashboard at"),
])
def test_the_command_prints_only_that_line(root, argv, code, expected):
    argv = [a.format(port=free_port()) for a in argv]
    done = subprocess.run([SSL_STUDY, *argv], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == code and done.stdout == "", done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr and expected in done.stderr, done.stderr
