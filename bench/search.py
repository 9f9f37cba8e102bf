"""Does a study find a better configuration for less compute than a grid? Every strategy replayed on the record.

Each strategy is a real Tune experiment over the recorded runs (study/replay.py: the project's StudySearch,
Tune's ASHA, the instability policy; only the training is played back), repeated over replay seeds (the
sampler's seed and which recorded seed of a cell plays). Compute is counted in epochs; the grid is every cell
run once to the end (the record's cells x epochs). For each strategy, over the seeds (median, quartiles):

- the compute from which on the answer stays within 1 point of the grid's best (the best cell's mean final kNN
  over its seeds), as a fraction of the grid's compute (inf when the budget ran out first);
- the regret (best cell minus the answer's mean final kNN) at 25% and 50% of the grid's compute, where the
  answer is what `ssl-study best` would give then: the best completed trial by the study metric, or the best
  trial stopped early while none has completed (no trial yet: the regret of an average cell);
- how often the answer at the full budget is the best cell;

and a figure of the answer's mean final kNN against compute (median and quartiles per strategy).

    .venv/bin/python bench/search.py                          # every strategy, 20 seeds
    .venv/bin/python bench/search.py --seeds 3 --strategies grid tpe+asha+policy   # a quick look
"""

from __future__ import annotations

import argparse
import functools
import math
import multiprocessing
import statistics
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from study import replay as rp

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/calibrate.py

STRATEGIES = {
    "grid": rp.Strategy("grid", sampler="grid"),
    "random": rp.Strategy("random", sampler="random"),
    "tpe": rp.Strategy("tpe"),
    "random+asha": rp.Strategy("random+asha", sampler="random", scheduler="asha"),
    "tpe+asha": rp.Strategy("tpe+asha", scheduler="asha"),
    "tpe+asha+policy": rp.Strategy("tpe+asha+policy", scheduler="asha", stopping="enforce"),
    # improvements (issue 14): the policy calibrated on the whole record (bench/calibrate.py: no batch size above
    # 5% healthy runs stopped, then the most runs not worth finishing stopped by half the budget); "+rerun":
    # without the searcher's duplicate check (a configuration that already ran is run again, as before);
    # instability as constraint violations; TPE modelling sooner and ASHA keeping a third at each rung; the
    # label-free metric
    "tpe+asha+calibrated": rp.Strategy("tpe+asha+calibrated", scheduler="asha", stopping="enforce",
                                       policy="calibrated"),
    "tpe+asha+calibrated+rerun": rp.Strategy("tpe+asha+calibrated+rerun", scheduler="asha", stopping="enforce",
                                             rerun_duplicates=True),
    "tpe+asha+calibrated+constraints": rp.Strategy("tpe+asha+calibrated+constraints", scheduler="asha",
                                                   stopping="enforce", constraints=True),
    "tpe5+asha3+calibrated+constraints": rp.Strategy("tpe5+asha3+calibrated+constraints", scheduler="asha",
                                                     stopping="enforce", constraints=True,
                                                     startup_trials=5, reduction_factor=3),
    "tpe+asha+calibrated(rankme)": rp.Strategy("tpe+asha+calibrated(rankme)", scheduler="asha", stopping="enforce",
                                               policy="calibrated", metric="rankme"),
}


CALIBRATED = {name for name in STRATEGIES if "calibrated" in name}  # their policy comes from calibrated()


def calibrated(record: rp.Record) -> dict:
    """The policy bench/calibrate.py chooses on the whole record for stopping runs not worth finishing."""
    import calibrate

    policy, _ = calibrate.choose(record, sorted(record.runs), calibrate.kinds(record), record.stopping)
    return {k: getattr(policy, k) for k in (*calibrate.DETECTORS, *calibrate.POLICY)}


def answer_at(ended: list[rp.Ended], epochs: float) -> float:
    """The answer's worth (mean final kNN of its cell) once ``epochs`` were spent; NaN before any answer."""
    worth = math.nan
    for e in ended:
        if e.epochs_used > epochs:
            break
        worth = e.incumbent_truth
    return worth


def score(ended: list[rp.Ended], record: rp.Record) -> dict:
    grid = len(record.runs) * record.epochs
    best = record.truth(record.best_cell())
    average = statistics.mean(record.truth(c) for c in record.runs)
    # from when on the answer stays within 1 point (an answer can get worse: a completed trial with a luckier
    # seed displaces a better cell's)
    reach = math.inf
    for e in reversed(ended):
        if not e.incumbent_truth >= best - 0.01:
            break
        reach = e.epochs_used / grid

    def regret(fraction: float) -> float:
        worth = answer_at(ended, fraction * grid)
        return best - (average if math.isnan(worth) else worth)

    final = ended[-1].incumbent if ended else None
    return {"reach": reach, "regret25": regret(0.25), "regret50": regret(0.5), "found": final == record.best_cell(),
            "used": (ended[-1].epochs_used if ended else 0) / grid, "trials": len(ended),
            "stopped": sum(e.status in ("unstable", "diverged", "collapsed") for e in ended),
            "pruned": sum(e.status == "pruned" for e in ended)}


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = np.quantile(np.array(xs, dtype=float), [0.25, 0.5, 0.75], method="lower")
    return float(q[0]), float(q[1]), float(q[2])


def plot(curves: dict[str, list[list[rp.Ended]]], record: rp.Record, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = len(record.runs) * record.epochs
    best = record.truth(record.best_cell())
    xs = np.linspace(0.02, 1.0, 50)
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, runs in curves.items():
        ys = np.array([[answer_at(ended, x * grid) for x in xs] for ended in runs])
        ys = np.where(np.isnan(ys), np.nan, ys)
        with warnings.catch_warnings():  # before a strategy's first answer every seed is NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            lo, mid, hi = (np.nanquantile(ys, q, axis=0) for q in (0.25, 0.5, 0.75))
        (line,) = ax.plot(xs, mid, lw=1.8, label=name)
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.12)
    ax.axhline(best, color="k", lw=0.8, ls="--", label="best cell (mean over seeds)")
    ax.axhline(best - 0.01, color="k", lw=0.8, ls=":", label="within 1 point")
    ax.set_xlabel("compute (fraction of the grid's epochs)")
    ax.set_ylabel("answer's mean final kNN top-1")
    ax.set_title(f"best configuration found so far: {record.name}, median and quartiles over "
                 f"{len(next(iter(curves.values())))} replay seeds", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _start_ray() -> None:
    from study import cluster

    cluster.start_ray(None, num_cpus=1, object_store_memory=128 * 2**20)


def _replay(task: tuple[str, str, int, dict]) -> list[rp.Ended]:
    record, name, seed, policy = task
    strategy = STRATEGIES[name]
    if name in CALIBRATED:
        strategy = replace(strategy, policy=policy)
    return rp.replay(_record(record), strategy, seed=seed)


@functools.cache
def _record(name: str) -> rp.Record:
    return rp.load_record(name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record", default=rp.DEFAULT_RECORD)
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    p.add_argument("--figure", default="bench/figures/search_best_so_far.png")
    p.add_argument("--jobs", type=int, default=2, help="replays at a time (processes, each with its own Ray)")
    args = p.parse_args()
    record = rp.load_record(args.record)
    grid = len(record.runs) * record.epochs
    best = record.best_cell()
    runs = sum(map(len, record.runs.values()))
    print(f"record {record.name}: {runs} runs, {len(record.runs)} cells, {record.epochs} epochs; grid = {grid} "
          f"epochs ({record.seconds / runs / 60:.1f} min per run recorded); best cell "
          f"{dict(zip(record.axes, best, strict=True))}: {record.truth(best):.4f}")
    curves: dict[str, list[list[rp.Ended]]] = {name: [] for name in args.strategies}
    policy = calibrated(record)
    print(f"calibrated policy: {policy}")
    tasks = [(args.record, name, seed, policy) for name in args.strategies for seed in range(args.seeds)]
    tic = time.perf_counter()
    # Replays are independent: each process runs its share on a local Ray of its own (one replay at a time, so
    # each replay stays deterministic).
    with multiprocessing.get_context("spawn").Pool(args.jobs, initializer=_start_ray) as pool:
        for (_, name, _, _), ended in zip(tasks, pool.imap(_replay, tasks), strict=True):
            curves[name].append(ended)
            if len(curves[name]) == args.seeds:
                print(f"  {name}: done at {time.perf_counter() - tic:.0f} s", flush=True)
        pool.close()  # let the workers exit (and shut their Ray down) instead of terminating them
        pool.join()
    print(f"\n{args.seeds} replay seeds; compute as a fraction of the grid ({grid} epochs); "
          f"regret in kNN points; median [quartiles]")
    print(f"{'strategy':>30} {'to within 1 pt':>20} {'regret@25%':>18} {'regret@50%':>18} {'best found':>10} "
          f"{'trials':>6} {'pruned':>6} {'policy':>6}")
    for name, runs in curves.items():
        s = [score(e, record) for e in runs]

        def cell(key: str, scale: float = 1.0, fmt: str = ".2f", s: list[dict] = s) -> str:
            lo, mid, hi = quartiles([x[key] * scale for x in s])
            return f"{mid:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"

        print(f"{name:>30} {cell('reach'):>20} {cell('regret25', 100, '.1f'):>18} {cell('regret50', 100, '.1f'):>18} "
              f"{sum(x['found'] for x in s) / len(s):10.0%} {statistics.median(x['trials'] for x in s):6.0f} "
              f"{statistics.median(x['pruned'] for x in s):6.0f} {statistics.median(x['stopped'] for x in s):6.0f}")
    print(f"\nfigure: {plot(curves, record, Path(args.figure))}")


if __name__ == "__main__":
    main()
