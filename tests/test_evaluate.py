"""`ssl-study evaluate` end to end on a real local Ray: a tiny study (2 trials, 1 epoch, exported backbones) whose
study file evaluates its best trial at the end, then the command: the linear probe of the 2 best (one new), a
second call that runs nothing, the full kNN, the table read back by `results`, `best`, `status` and the report,
and bad input (one line, exit 2, no evaluation task submitted). A second 1-trial study runs with train.export:
false. One Ray serves the module: the commands join the Ray that ran the studies, as `--address` joins a
cluster's (a Ray of their own costs each 20-40 s to start on 2 busy cores)."""

import json

import pytest
import ray
import torch
from studies import ROOT, local_ray, rows, write_study

from study import runner
from study.cli import main
from study.errors import SpecError
from trainers.knn import knn_predict_ks, knn_topk_correct

TRAIN = {"backbone": "vit_test_patch4_32", "epochs": 1, "batch_size": 64, "mlp_dim": 64, "dim": 32,
         "warmup_epochs": 0.0, "train_subset": 512, "knn_bank_subset": 256, "knn_eval_subset": 256, "export": True}
# The probe: 2 epochs of 512 training images at batch 128 (8 steps), then the whole test split (10,000 images).
PROBE = ["--epochs", "2", "--batch-size", "128", "--base-lr", "0.5", "--train-subset", "512"]
STUDY = {
    "name": "evaluated", "train": TRAIN,
    "resources": {"workers": 1, "cpus_per_worker": 0.9, "driver_cpus": 0.1},
    "search": {"space": {"base_lr": {"choice": [1.5e-4, 1.5e-3]}}, "sampler": "grid", "num_samples": 2,
               "max_concurrent": 2},
    "scheduler": {"type": "fifo"},
    "evaluate": {"top": 1, "protocol": "linear", "epochs": 2, "batch_size": 128, "base_lr": 0.5,
                 "train_subset": 512},
}
UNEXPORTED = {**STUDY, "name": "unexported", "train": {**TRAIN, "export": False},
              "search": {"space": {"base_lr": {"choice": [1.5e-4]}}, "sampler": "grid", "num_samples": 1},
              "evaluate": None}


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    specs = write_study(root, STUDY, data_dir=ROOT / "datasets"), write_study(root, UNEXPORTED, ROOT / "datasets")
    with local_ray():
        for spec in specs:
            runner.run_study(spec)
        yield specs


def evaluation_tasks() -> int:
    """The evaluation tasks this Ray has been given (study/evaluate.py names them)."""
    from ray.util.state import list_tasks

    address = f"http://{ray._private.worker.get_dashboard_url()}"
    return sum(t.name.startswith("evaluate ") for t in list_tasks(address=address, limit=10000))


def evaluate(spec, *extra) -> list[str]:
    return ["evaluate", spec.name, "--storage", str(spec.study_dir.parent), *extra]


def test_the_study_file_evaluates_the_best_trial_at_the_end(studies):
    spec, _ = studies
    trials = rows(spec, "trials")
    assert [t["status"] for t in trials] == ["completed", "completed"], [t["error"] for t in trials]
    best = max(trials, key=lambda t: t["knn_top1"])
    [row] = rows(spec, "evaluations")
    assert (row["study"], row["trial_id"], row["protocol"], row["epochs"], row["k"]) == (spec.name, best["trial_id"],
                                                                                       "linear", 2, None)
    assert json.loads(row["settings"]) == {"epochs": 2, "batch_size": 128, "base_lr": 0.5, "lr": 0.25,
                                           "train_subset": 512, "seed": 0}
    assert 0.1 < row["top1"] <= row["top5"] <= 1 and row["seconds"] > 0  # chance is 0.1


def test_evaluate_runs_what_the_table_lacks_then_nothing(studies, capsys):
    spec, _ = studies
    [first] = rows(spec, "evaluations")
    assert main(evaluate(spec, "--top", "2", *PROBE)) == 0
    out = capsys.readouterr().out
    table = rows(spec, "evaluations")
    assert len(table) == 2 and table[0] == first  # the one the launch wrote is kept, not run again
    assert {r["trial_id"] for r in table} == {t["trial_id"] for t in rows(spec, "trials")}
    assert all(0.1 < r["top1"] <= r["top5"] <= 1 for r in table)
    assert "1 already in" in out and all(r["trial_id"] in out for r in table)

    tasks = evaluation_tasks()
    assert main(evaluate(spec, "--top", "2", *PROBE)) == 0  # resumed: everything is there, nothing runs
    assert "2 already in" in capsys.readouterr().out and rows(spec, "evaluations") == table
    assert evaluation_tasks() == tasks
    # other settings are other evaluations (the key holds them): not run here, they are only planned
    from study import evaluate as ev
    from study.spec import Evaluate

    assert len(ev.pending(spec, ev.plan(spec, Evaluate(top=2, epochs=2)))) == 2


def test_knn_adds_a_row_per_k_and_every_command_shows_them(studies, capsys):
    spec, _ = studies
    assert main(evaluate(spec, "--top", "1", "--protocol", "knn", "--train-subset", "2048")) == 0
    table = rows(spec, "evaluations")
    knn = [r for r in table if r["protocol"] == "knn"]
    assert sorted(r["k"] for r in knn) == [20, 200]
    assert all(0.1 < r["top1"] <= r["top5"] <= 1 and r["epochs"] is None for r in knn)
    assert {json.loads(r["settings"])["train_subset"] for r in knn} == {2048}
    capsys.readouterr()

    assert main(["results", spec.name, "--storage", str(spec.study_dir.parent), "--table", "evaluations",
                 "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert sorted((r["trial_id"], r["protocol"], r["k"]) for r in shown) == sorted(
        (r["trial_id"], r["protocol"], r["k"]) for r in table)
    assert main(["results", spec.name, "--storage", str(spec.study_dir.parent), "--table", "evaluations",
                 "--where", "protocol == 'knn' and k == 200"]) == 0
    assert capsys.readouterr().out.count("\n") == 2  # the header and one row

    best_id = max(rows(spec, "trials"), key=lambda t: t["knn_top1"])["trial_id"]
    assert main(["best", spec.name, "--storage", str(spec.study_dir.parent)]) == 0
    best = json.loads(capsys.readouterr().out)
    assert best["trial_id"] == best_id
    assert sorted((e["protocol"], e["settings"].get("k")) for e in best["evaluations"]) == [
        ("knn", 20), ("knn", 200), ("linear", None)]
    assert main(["status", spec.name, "--storage", str(spec.study_dir.parent)]) == 0
    assert f"evaluated {best_id}: linear 2 epochs: top-1 " in capsys.readouterr().out

    from study.report.data import load
    from study.report.page import render_html

    page = render_html(load(spec.study_dir, spec), {}, (), "not computed")
    assert "<h2>Evaluations</h2>" in page and page.count(best_id) >= 4  # summary row + its 3 evaluations


@pytest.mark.parametrize(("extra", "expected"), [
    (["--top", "3"], "--top 3: the study has 2 completed trials with a finite knn_top1; give --top 2 or less"),
    (["--protocol", "svm"], "argument --protocol: invalid choice: 'svm' (choose from 'linear', 'knn')"),
    (["--top", "0"], "argument --top: expected an integer >= 1, got '0'"),
    (["--epochs", "0"], "argument --epochs: expected an integer >= 1, got '0'"),
    (["--base-lr", "-1"], "--base-lr: must be > 0, got -1"),
])
def test_bad_input_is_one_line_and_exit_2_before_ray(studies, capsys, extra, expected):
    spec, _ = studies
    tasks = evaluation_tasks()
    assert main(evaluate(spec, *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ssl-study: error: ") and expected in err, err
    assert evaluation_tasks() == tasks > 0


def test_a_study_without_exported_backbones_is_refused(studies, capsys):
    _, unexported = studies
    assert [t["status"] for t in rows(unexported, "trials")] == ["completed"]
    tasks = evaluation_tasks()
    assert main(evaluate(unexported, "--top", "1")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unexported: its trials ran with train.export: false" in err, err
    assert evaluation_tasks() == tasks


@pytest.mark.parametrize(("evaluate_section", "expected"), [
    ({"protocol": "svm"}, "evaluate.protocol: 'svm' is not one of: linear, knn"),
    ({"top": 0}, "evaluate.top: must be > 0, got 0"),
    ({"epochs": "ten"}, "evaluate.epochs: expected int, got 'ten'"),
    ({"bogus": 1}, "evaluate: unknown key 'bogus'; accepted: base_lr, batch_size, epochs, protocol, top, "
                   "train_subset"),
    ([1, 2], "evaluate: expected a mapping, got [1, 2]"),
])
def test_the_study_file_section_is_checked(tmp_path, evaluate_section, expected):
    with pytest.raises(SpecError) as e:
        write_study(tmp_path, {**STUDY, "evaluate": evaluate_section}, data_dir=ROOT / "datasets")
    assert expected in str(e.value) and str(e.value).startswith(str(tmp_path / "evaluated.yaml"))
    assert "\n" not in str(e.value)


def test_the_study_file_section_needs_exported_backbones(tmp_path):
    with pytest.raises(SpecError, match=r"evaluate: needs the trials' exported backbones, but train.export is false"):
        write_study(tmp_path, {**STUDY, "train": {**TRAIN, "export": False}}, data_dir=ROOT / "datasets")
    assert write_study(tmp_path, STUDY, data_dir=ROOT / "datasets").evaluate.epochs == 2


def test_dry_run_says_what_is_evaluated(tmp_path, capsys):
    write_study(tmp_path, STUDY, data_dir=ROOT / "datasets")
    assert main(["launch", str(tmp_path / "evaluated.yaml"), "--dry-run"]) == 0
    assert "evaluate: the 1 best trials at the end, linear probe (2 epochs, batch 128)" in capsys.readouterr().out


def test_knn_top5_counts_agree_with_the_predictions():
    g = torch.Generator().manual_seed(0)
    bank, feats = torch.randn(300, 8, generator=g), torch.randn(70, 8, generator=g)
    bank_labels, labels = torch.randint(0, 7, (300,), generator=g), torch.randint(0, 7, (70,), generator=g)
    counts = knn_topk_correct(feats, labels, bank, bank_labels, 7, [20, 500], chunk_size=16)
    preds = knn_predict_ks(feats, bank, bank_labels, 7, [20, 500])
    assert set(counts) == {20, 300}  # k capped at the bank's size, as the predictions are
    for k, (top1, top5) in counts.items():
        assert top1 == int((preds[k] == labels).sum()) <= top5 <= 70
    assert knn_topk_correct(feats, labels % 3, bank, bank_labels % 3, 3, [20])[20][1] == 70  # 3 classes: all in top 5


def test_a_task_has_a_trials_resources_on_one_node(tmp_path):
    from dataclasses import replace

    from study.evaluate import task_resources
    from study.spec import Resources

    spec = write_study(tmp_path, STUDY, data_dir=ROOT / "datasets")
    assert task_resources(spec, [{"CPU": 2.0}]) == {"num_cpus": 0.9, "num_gpus": 0.0}
    gpus = replace(spec, resources=Resources(workers=4, cpus_per_worker=8, gpus_per_worker=1))
    # 4 workers x 8 CPUs on nodes of 16: one process cannot span nodes
    assert task_resources(gpus, [{"CPU": 16.0, "GPU": 2.0}] * 2) == {"num_cpus": 16.0, "num_gpus": 1.0}
    half = replace(spec, resources=Resources(workers=1, cpus_per_worker=4, gpus_per_worker=0.5))
    assert task_resources(half, [{"CPU": 16.0, "GPU": 1.0}]) == {"num_cpus": 4.0, "num_gpus": 0.5}

