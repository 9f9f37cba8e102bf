"""The search race's statistics (bench/search.py) on a tiny synthetic record whose answer is known: regret, the
compute to reach within a point, the normalised score and the paired Wilcoxon test, first on hand-made replays,
then on real replays through Tune + Optuna + ASHA."""

import dataclasses
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import search  # noqa: E402

from study import replay as rp  # noqa: E402

EPOCHS = 3
TRUTH = {1e-3: 0.60, 3e-3: 0.70, 1e-2: 0.74, 3e-2: 0.50}  # each cell's mean final kNN: the best is 1e-2


@pytest.fixture(scope="module")
def record_folder(tmp_path_factory) -> Path:
    """Four cells x two seeds; each run's kNN climbs to its cell's truth +- 0.2 points (the seed)."""
    folder = tmp_path_factory.mktemp("records") / "synthetic"
    folder.mkdir()
    study = {"name": "synthetic", "dataset": "fashion_mnist",
             "train": {"epochs": EPOCHS, "backbone": "vit_test_patch4_32"},
             "search": {"space": {"base_lr": {"choice": list(TRUTH)}, "seed": {"choice": [0, 1]}}},
             "scheduler": {"type": "fifo"}, "stopping": {"mode": "observe"}}
    (folder / "grid.yaml").write_text(yaml.safe_dump(study))
    trials, epochs = [], []
    for i, (lr, truth) in enumerate(TRUTH.items()):
        for seed in (0, 1):
            tid = f"t{i}{seed}"
            final = truth + (0.002 if seed else -0.002)
            trials.append({"study": "synthetic", "trial_id": tid, "base_lr": lr, "seed": seed, "status": "completed",
                           "knn_top1": final})
            epochs += [{"study": "synthetic", "trial_id": tid, "epoch": e, "knn_top1": final - 0.05 * (EPOCHS - e),
                        "knn_top1_init": 0.4, "loss": 1.0, "epoch_time_s": 1.0} for e in range(1, EPOCHS + 1)]
    pq.write_table(pa.Table.from_pylist(trials), folder / "trials.parquet")
    pq.write_table(pa.Table.from_pylist(epochs), folder / "epochs.parquet")
    return folder


@pytest.fixture(scope="module")
def record(record_folder) -> rp.Record:
    return rp.load_record(str(record_folder))


def ended(record: rp.Record, answers: list[tuple[int, float]]) -> list[rp.Ended]:
    """A replay whose answer after ``epochs_used`` epochs is the cell with base lr ``lr``."""
    return [rp.Ended(used, float(used), i, (lr,), 0, "completed", EPOCHS, TRUTH[lr], "", (lr,),
                     record.truth((lr,))) for i, (used, lr) in enumerate(answers)]


def test_regret_reach_score_and_wilcoxon_on_replays_whose_answer_is_known(record):
    assert record.best_cell() == (1e-2,) and len(record.runs) * record.epochs == 12  # the grid: 12 epochs
    oracle = ended(record, [(3, 1e-2)])  # the best cell first, done at 25% of the grid
    late = ended(record, [(3, 3e-2), (6, 1e-3), (12, 1e-2)])  # a bad cell, then a middling one, the best at 100%
    s = search.score(oracle, record)
    assert s["reach"] == 0.25 and s["regret0.25"] == 0 and s["found"]
    assert s["regret0.05"] == pytest.approx(0.74 - sum(TRUTH.values()) / 4)  # no answer yet: an average cell's
    t = search.score(late, record)
    assert t["reach"] == 1.0 and t["regret0.25"] == pytest.approx(0.24) and t["regret0.5"] == pytest.approx(0.14)
    assert search.normalised([0.0] * 3, [0.24] * 3) == 1.0 and search.normalised([0.24] * 3, [0.24] * 3) == 0.0
    better, worse = [0.01 * i for i in range(20)], [0.01 * i + 0.05 for i in range(20)]
    assert search.wilcoxon_p(better, worse) < 1e-4 and search.wilcoxon_p(better, better) == 1.0
    rows = search.race({"random": [late] * 4, "random+asha": [late] * 4, "oracle": [oracle] * 4}, record)
    by = {r["strategy"]: r for r in rows}
    assert by["oracle"]["score0.25"] == 1.0 and by["random"]["score0.25"] == 0.0
    assert by["oracle"]["regret0.25"] == (0.0, 0.0) and math.isnan(by["random+asha"]["p0.25"])
    assert "| `oracle` | 0.25 [0.25, 0.25] |" in search.report(rows)


def test_real_replays_find_the_known_best_cell(record):
    from study import cluster

    cluster.start_ray(None, num_cpus=1, object_store_memory=128 * 2**20)
    from ray.train.constants import _get_ray_train_session_dir

    staging = Path(_get_ray_train_session_dir())
    staged = set(staging.glob("*"))
    curves = {name: [rp.replay(record, search.STRATEGIES[name], seed=seed) for seed in range(3)]
              for name in ("grid", "random+asha", "sobol-tpe+asha", "hyperband")}
    assert set(staging.glob("*")) == staged  # each replay removed what Tune staged in the Ray session
    rows = {r["strategy"]: r for r in search.race(curves, record)}
    assert rows["grid"]["found"] == 1.0 and rows["grid"]["regret0.5"][0] <= 0.24  # half the grid: >= 2 cells
    assert all(score(runs) for runs in curves.values())
    assert 0.0 <= rows["sobol-tpe+asha"]["p0.25"] <= 1.0 and rows["grid"]["reach"][2] <= 1.0
    # Hyperband's second bracket (3 trials from 1 epoch) halves: a trial paused at its rung resumes or is pruned
    assert any(e.status == "pruned" and e.epochs == 1 for runs in curves["hyperband"] for e in runs)
    assert any(e.status == "completed" and e.epochs == EPOCHS for runs in curves["hyperband"] for e in runs)


def score(runs: list[list[rp.Ended]]) -> bool:
    """Every replay ends with an answer, spends at most the grid's compute, and says what the answer is worth."""
    return all(e and e[-1].incumbent is not None and e[-1].epochs_used <= 12 and 0.5 <= e[-1].incumbent_truth <= 0.74
               for e in runs)


def test_difficulty_is_the_share_of_cells_near_the_best_and_the_seed_noise(record):
    hard = search.difficulty(record)
    assert hard["near"] == 0.25  # only 1e-2 lies within a point of itself; 3e-3 is 4 points below
    assert hard["noise"] == pytest.approx(0.004 / math.sqrt(2)) and hard["repeated"] == 4  # seeds at +-0.2 points


def test_the_noise_floor_is_the_regret_of_answering_the_best_run_seen(record):
    assert search.noise_floor(record, seeds=20) == 0.0  # the best cell's runs beat every other cell's
    # 3e-3's two seeds at 75% and 70% (truth 72.5%): where a replay seed plays the 75% run, the answer is 3e-3
    close = record.runs[(1e-2,)][0]
    runs = [dataclasses.replace(close, epochs=[{**close.epochs[-1], "knn_top1": v}]) for v in (0.75, 0.70)]
    lucky = dataclasses.replace(record, runs={**record.runs, (3e-3,): runs})
    played = [lucky.pick((3e-3,), s).final for s in range(20)]
    floor = search.noise_floor(lucky, seeds=20)
    assert 0.0 < floor < 0.015 and floor == pytest.approx((0.74 - 0.725) * played.count(0.75) / 20)


def test_saved_replays_resume_a_race_and_drop_those_of_a_changed_strategy(record, tmp_path, monkeypatch):
    saved = search.Saved(tmp_path, record, policy={"spike_z": 4.0})
    replays = {0: ended(record, [(3, 1e-3), (6, 1e-2)]), 1: ended(record, [(3, 3e-2)])}
    saved.save("tpe+asha", replays)
    assert saved.load("tpe+asha") == replays  # cells and incumbents come back as tuples
    assert saved.load("random") == {}  # never raced
    monkeypatch.setitem(search.STRATEGIES, "tpe+asha", rp.Strategy("tpe+asha", scheduler="asha", reduction_factor=3))
    assert saved.load("tpe+asha") == {}  # replayed again: the saved ones ran another strategy
    monkeypatch.undo()
    assert saved.load("tpe+asha") == replays
    changed = dataclasses.replace(record, runs={**record.runs, (1e-3,): record.runs[(1e-3,)][:1]})
    assert search.Saved(tmp_path, changed, policy={"spike_z": 4.0}).load("tpe+asha") == {}  # the record changed


def test_sigterm_ends_the_race_and_its_replaying_workers(record_folder, tmp_path):
    """`kill` of a race leaves no pool worker replaying on (by default only the parent died)."""
    saved = tmp_path / "saved"
    race = subprocess.Popen([sys.executable, "bench/search.py", "--records", str(record_folder), "--seeds", "40",
                             "--strategies", "hyperband", "--jobs", "1", "--saved", str(saved),
                             "--figures", str(tmp_path)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not list(saved.glob("*/hyperband.json.gz")):  # the first replay saved: the worker is replaying
            assert race.poll() is None and time.monotonic() < deadline, "no replay saved within 4 min"
            time.sleep(0.5)
        workers = [int(p.name) for p in Path("/proc").iterdir()
                   if p.name.isdigit() and status(p.name, "PPid") == race.pid]
        assert workers
        race.send_signal(signal.SIGTERM)
        assert race.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        race.kill()  # (a no-op once it has ended) a failed test leaves no race behind
    deadline = time.monotonic() + 60
    while alive := [w for w in workers if status(w, "State") not in (None, "Z")]:
        assert time.monotonic() < deadline, f"pool workers {alive} still running 60 s after the race ended"
        time.sleep(0.5)


def status(pid, field: str):
    """A field of /proc/<pid>/status (PPid as an int), None once the process has gone."""
    try:
        line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(f"{field}:"))
    except (OSError, StopIteration):
        return None
    value = line.split()[1]
    return int(value) if field == "PPid" else value


def test_the_race_marks_as_default_what_a_study_file_gets_when_it_says_nothing():
    from study.spec import Scheduler, Search
    from trainers.policy import StopPolicy

    strategy, search_, scheduler = search.STRATEGIES[search.DEFAULT], Search(), Scheduler()
    assert (strategy.sampler, strategy.startup, strategy.startup_trials, strategy.constraints,
            strategy.rerun_duplicates, strategy.metric) == (search_.sampler, search_.startup, search_.startup_trials,
                                                            search_.constraints, search_.rerun_duplicates,
                                                            search_.metric)
    assert (strategy.scheduler, strategy.grace_period, strategy.reduction_factor) == (
        scheduler.type, scheduler.grace_period, scheduler.reduction_factor)
    assert strategy.stopping == StopPolicy().mode and not strategy.policy
