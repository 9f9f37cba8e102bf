"""Does a study find a better configuration for less compute than a grid? Every strategy replayed on the record.

Each strategy is a real Tune experiment over the recorded runs (study/replay.py: the project's StudySearch,
Tune's ASHA or Hyperband, the instability policy; only the training is played back), repeated over replay seeds
(the sampler's seed and which recorded seed of a cell plays), the same seeds for every strategy. Compute is
counted in epochs; the grid is every cell run once to the end (the record's cells x epochs). For each strategy:

- the compute from which on the answer stays within 1 point of the grid's best (the best cell's mean final kNN
  over its seeds), as a fraction of the grid's compute (median and quartiles over seeds; inf when never);
- the regret (best cell minus the answer's mean final kNN) at 5, 10, 25 and 50% of the grid's compute (mean and
  standard error), where the answer is what `ssl-study best` would give then: the best completed trial by the
  study metric, or the best trial stopped early while none has completed (no trial yet: an average cell's);
- the normalised score (0 = random search's regret, 1 = the best cell) and the paired Wilcoxon signed-rank p of
  the regrets against random+ASHA's, at 10 and 25%;
- how often the answer at the full budget is the best cell;

and a figure of regret against compute (mean and standard error per strategy). Before the table it prints how
hard the record is (the share of cells within 1 point of the best, the seed noise) and its noise floor.

    .venv/bin/python bench/search.py                          # every strategy, 50 seeds, on both records
    .venv/bin/python bench/search.py --records mocov3-fmnist-grid --seeds 3 --strategies grid tpe+asha+policy
    nice .venv/bin/python bench/search.py --commit    # hours: commits bench/races/ as strategies finish, so that
                                                      # a race cut off by the end of a sitting goes on in the next
    .venv/bin/python bench/search.py --saved-only     # the table and figure of what is saved, replaying nothing
"""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import json
import math
import multiprocessing
import signal
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from data import atomic
from study import replay as rp

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/calibrate.py, bench/record_runs.py

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
    # issue 27: Hyperband, and BOHB-style TPE proposing the trials of Hyperband's brackets (hpbandster, BOHB's own
    # package, is unmaintained since 2019; Tune's TuneBOHB needs it: this is the closest maintained pair)
    "hyperband": rp.Strategy("hyperband", sampler="random", scheduler="hyperband", reduction_factor=3),
    "tpe+hyperband": rp.Strategy("tpe+hyperband", scheduler="hyperband", reduction_factor=3),
    # the one-epoch top-K baseline of Egele et al. (2023): every trial runs one epoch and only the best tenth goes
    # on to the end (ASHA with one rung: grace 1, reduction factor 10 = the records' epochs); TPE whose first
    # trials are a Sobol design
    "random+top10%@1": rp.Strategy("random+top10%@1", sampler="random", scheduler="asha", reduction_factor=10),
    "sobol-tpe+asha": rp.Strategy("sobol-tpe+asha", scheduler="asha", startup="sobol"),
    "sobol-tpe+asha+policy": rp.Strategy("sobol-tpe+asha+policy", scheduler="asha", stopping="enforce",
                                          startup="sobol"),
}


RECORDS = ["mocov3-fmnist-grid", "mocov3-fmnist-4axes"]  # the first record (issue 14) and the harder one (issue 27)
CALIBRATED = {name for name in STRATEGIES if "calibrated" in name}  # their policy comes from calibrated()


def calibrated(record: rp.Record) -> dict:
    """The policy bench/calibrate.py chooses on the whole record for stopping runs not worth finishing."""
    import calibrate

    policy, _ = calibrate.choose(record, sorted(record.runs), calibrate.kinds(record), record.stopping)
    return {k: getattr(policy, k) for k in (*calibrate.DETECTORS, *calibrate.POLICY)}


def difficulty(record: rp.Record) -> dict:
    """How hard the record is to search: the share of cells within 1 point of the best cell, and the seed noise
    (the median over cells with 2 or more finite seeds of the standard deviation of their runs' final kNN: the
    median, since a few cells at the edge of stability have seeds 5 points apart)."""
    best = record.truth(record.best_cell())
    finite = ([r.final for r in rs if math.isfinite(r.final)] for rs in record.runs.values())
    spread = [statistics.stdev(f) for f in finite if len(f) > 1]
    return {"near": sum(record.truth(c) >= best - 0.01 for c in record.runs) / len(record.runs),
            "noise": statistics.median(spread) if spread else math.nan, "repeated": len(spread)}


def noise_floor(record: rp.Record, seeds: int) -> float:
    """The regret of a search that ran every cell to the end and answered the best final kNN it saw, mean over
    replay ``seeds``: what choosing by one run per cell costs when seeds differ. A search that answers by a run's
    value (as `ssl-study best` does) lands below it only by luck or by never seeing a lesser cell's lucky final
    run (a cell stopped early)."""
    best = record.truth(record.best_cell())
    seen = ([(record.pick(c, s).final, c) for c in record.runs] for s in range(seeds))
    return statistics.mean(best - record.truth(max((v, c) for v, c in runs if math.isfinite(v))[1]) for runs in seen)


def answer_at(ended: list[rp.Ended], epochs: float) -> float:
    """The answer's worth (mean final kNN of its cell) once ``epochs`` were spent; NaN before any answer."""
    worth = math.nan
    for e in ended:
        if e.epochs_used > epochs:
            break
        worth = e.incumbent_truth
    return worth


FRACTIONS = (0.05, 0.10, 0.25, 0.50)  # of the grid's compute, where the regret is measured
BASELINE = "random+asha"  # what every strategy is tested against (paired by replay seed)
DEFAULT = "sobol-tpe+asha+policy"  # what `ssl-study launch` does when the study file says nothing (study/spec.py)
REFERENCE = "random"  # the normalised score's 0


def regret_at(ended: list[rp.Ended], record: rp.Record, fraction: float) -> float:
    """Best cell's worth minus the answer's once ``fraction`` of the grid's compute was spent (no answer yet: an
    average cell's)."""
    worth = answer_at(ended, fraction * len(record.runs) * record.epochs)
    return record.truth(record.best_cell()) - (statistics.mean(record.truth(c) for c in record.runs)
                                               if math.isnan(worth) else worth)


def score(ended: list[rp.Ended], record: rp.Record) -> dict:
    grid = len(record.runs) * record.epochs
    best = record.truth(record.best_cell())
    # from when on the answer stays within 1 point (an answer can get worse: a completed trial with a luckier
    # seed displaces a better cell's)
    reach = math.inf
    for e in reversed(ended):
        if not e.incumbent_truth >= best - 0.01:
            break
        reach = e.epochs_used / grid
    final = ended[-1].incumbent if ended else None
    return {"reach": reach, **{f"regret{f:g}": regret_at(ended, record, f) for f in FRACTIONS},
            "found": final == record.best_cell(), "used": (ended[-1].epochs_used if ended else 0) / grid,
            "trials": len(ended), "stopped": sum(e.status in ("unstable", "diverged", "collapsed") for e in ended),
            "pruned": sum(e.status == "pruned" for e in ended)}


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt n)."""
    return statistics.mean(xs), (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.nan)


def normalised(regrets: list[float], reference: list[float]) -> float:
    """1 - mean regret / the reference's mean regret: 0 = the reference (random search), 1 = the best cell."""
    ref = statistics.mean(reference)
    return 1.0 - statistics.mean(regrets) / ref if ref > 0 else math.nan


def wilcoxon_p(xs: list[float], ys: list[float]) -> float:
    """Two-sided p of the paired Wilcoxon signed-rank test of ``xs`` against ``ys`` (same replay seeds; ties at
    zero difference dropped, Wilcoxon's method); 1 when every pair is equal."""
    from scipy.stats import wilcoxon

    if all(x == y for x, y in zip(xs, ys, strict=True)):
        return 1.0
    return float(wilcoxon(xs, ys, zero_method="wilcox", alternative="two-sided").pvalue)


def race(curves: dict[str, list[list[rp.Ended]]], record: rp.Record) -> list[dict]:
    """A row per strategy: reach (median, quartiles), regret at each of FRACTIONS (mean, standard error), the
    normalised score at each, how often the best cell is the final answer, and the Wilcoxon p against BASELINE at
    each fraction (paired by seed; NaN where BASELINE was not raced)."""
    scores = {name: [score(e, record) for e in runs] for name, runs in curves.items()}
    rows = []
    for name, s in scores.items():
        row = {"strategy": name, "reach": quartiles([x["reach"] for x in s]),
               "found": sum(x["found"] for x in s) / len(s), "seeds": len(s),
               **{k: statistics.median(x[k] for x in s) for k in ("trials", "pruned", "stopped", "used")}}
        for f in FRACTIONS:
            key = f"regret{f:g}"
            row[key] = mean_se([x[key] for x in s])
            row[f"score{f:g}"] = (normalised([x[key] for x in s], [x[key] for x in scores[REFERENCE]])
                                  if REFERENCE in scores else math.nan)
            row[f"p{f:g}"] = (wilcoxon_p([x[key] for x in s], [x[key] for x in scores[BASELINE]])
                              if BASELINE in scores and name != BASELINE else math.nan)
        rows.append(row)
    return rows


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = np.quantile(np.array(xs, dtype=float), [0.25, 0.5, 0.75], method="lower")
    return float(q[0]), float(q[1]), float(q[2])


def report(rows: list[dict]) -> str:
    """The race as a Markdown table (the README's)."""
    head = ["strategy", "within 1 pt from", *(f"regret@{f:.0%}" for f in FRACTIONS), "score@10%", "score@25%",
            "best found", "p@10%", "p@25%", "trials", "pruned", "stopped", "compute used"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        lo, mid, hi = r["reach"]
        name = f"**`{r['strategy']}`** (default)" if r["strategy"] == DEFAULT else f"`{r['strategy']}`"
        cells = [name, f"{mid:.2f} [{lo:.2f}, {hi:.2f}]",
                 *(f"{100 * r[f'regret{f:g}'][0]:.2f} ± {100 * r[f'regret{f:g}'][1]:.2f}" for f in FRACTIONS),
                 f"{r['score0.1']:.2f}", f"{r['score0.25']:.2f}", f"{r['found']:.0%}",
                 *("-" if math.isnan(r[k]) else f"{r[k]:.3g}" for k in ("p0.1", "p0.25")),
                 f"{r['trials']:.0f}", f"{r['pruned']:.0f}", f"{r['stopped']:.0f}", f"{r['used']:.0%}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(curves: dict[str, list[list[rp.Ended]]], record: rp.Record, path: Path) -> Path:
    """Regret against compute: mean over seeds with a band of one standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = np.linspace(0.01, 1.0, 100)
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.cm.tab20(np.linspace(0, 1, 20))
    for i, (name, runs) in enumerate(curves.items()):
        ys = 100 * np.array([[regret_at(ended, record, x) for x in xs] for ended in runs])
        mean, se = ys.mean(axis=0), ys.std(axis=0, ddof=1) / np.sqrt(len(ys)) if len(ys) > 1 else 0.0
        key = name in (DEFAULT, BASELINE)  # the default and what it is tested against, drawn thicker
        (line,) = ax.plot(xs, mean, lw=2.8 if key else 1.3, color=colours[i % 20],
                          label=f"{name} (default)" if name == DEFAULT else name)
        ax.fill_between(xs, mean - se, mean + se, color=line.get_color(), alpha=0.15)
    ax.axhline(1.0, color="k", lw=0.8, ls=":", label="1 point")
    ax.set_xscale("log")
    ax.set_xlabel("compute (fraction of the grid's epochs)")
    ax.set_ylabel("regret (kNN top-1 points below the best cell)")
    ax.set_title(f"{record.name}: regret of the answer so far, mean and standard error over "
                 f"{len(next(iter(curves.values())))} replay seeds", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _start_ray() -> None:
    from study import cluster

    cluster.start_ray(None, num_cpus=1, object_store_memory=128 * 2**20)


def _replay(task: tuple[str, str, int, dict]) -> list[rp.Ended]:
    record, name, seed, policy = task
    return rp.replay(_record(record), _strategy(name, policy), seed=seed)


def _strategy(name: str, policy: dict) -> rp.Strategy:
    return replace(STRATEGIES[name], policy=policy) if name in CALIBRATED else STRATEGIES[name]


class Saved:
    """Each strategy's replays of a record, one gzipped JSON file per strategy (50 replays of the second record:
    1.4 MB of JSON, a tenth of it gzipped, and the race commits them) rewritten as each replay ends (by this
    process only): a race of thousands of replays takes hours, and an interrupted one (or one continued in
    another session, from the committed files) replays only what is missing. Replays of a strategy that has
    changed since, or of the record before runs were added to it, are dropped."""

    def __init__(self, folder: Path, record: rp.Record, policy: dict) -> None:
        self.folder, self.policy = folder / Path(record.name).name, policy
        self.runs = hashlib.sha1(" ".join(sorted(r.trial_id for rs in record.runs.values() for r in rs)).encode()
                                 ).hexdigest()[:12]  # which recorded runs the replays played

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.json.gz"

    def _key(self, name: str) -> dict:
        return {"strategy": repr(_strategy(name, self.policy)), "record_runs": self.runs}

    def load(self, name: str) -> dict[int, list[rp.Ended]]:
        path = self._path(name)
        if not path.is_file():
            return {}
        saved = json.loads(gzip.decompress(path.read_bytes()))
        if {k: saved.get(k) for k in self._key(name)} != self._key(name):
            return {}
        return {int(seed): [rp.Ended(**{**e, "cell": tuple(e["cell"]),
                                        "incumbent": e["incumbent"] and tuple(e["incumbent"])}) for e in ended]
                for seed, ended in saved["replays"].items()}

    def save(self, name: str, replays: dict[int, list[rp.Ended]]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(self._path(name), gzip.compress(json.dumps(
            {**self._key(name),
             "replays": {seed: [asdict(e) for e in ended] for seed, ended in sorted(replays.items())}}).encode(),
            mtime=0))  # the same replays, the same bytes: an unchanged file is no change to commit


@functools.cache
def _record(name: str) -> rp.Record:
    return rp.load_record(name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", nargs="+", default=RECORDS, help="records to race on, each in turn")
    p.add_argument("--seeds", type=int, default=50)
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    p.add_argument("--figures", default="bench/figures", help="where each record's regret figure goes")
    p.add_argument("--jobs", type=int, default=2, help="replays at a time (processes, each with its own Ray)")
    p.add_argument("--saved", type=Path, default=Path("bench/races"),
                   help="every replay's result, to resume an interrupted race (delete it after changing the "
                        "replay's code: a saved replay is reused while its strategy is unchanged)")
    p.add_argument("--commit", action="store_true",
                   help="git commit the saved replays as each strategy finishes and every 15 minutes")
    p.add_argument("--saved-only", action="store_true",
                   help="replay nothing: the table and figure of the strategies whose seeds are all saved")
    args = p.parse_args()
    # SIGTERM (`kill`, a job scheduler) ends the race as Ctrl-C does: leaving the pool's `with` terminates its
    # workers; by default only this process died and each worker went on replaying for minutes
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    for name in args.records:
        race_record(name, args.strategies, args.seeds, args.jobs, Path(args.figures) / f"search_{name}.png",
                    Saved(args.saved, _record(name), calibrated(_record(name))), commit_each=args.commit,
                    saved_only=args.saved_only)


COMMIT_EVERY_S = 900.0


def race_record(name: str, strategies: list[str], seeds: int, jobs: int, figure: Path, saved: Saved,
                commit_each: bool = False, saved_only: bool = False) -> None:
    record = _record(name)  # loaded once per process (main loaded it for the policy)
    grid = len(record.runs) * record.epochs
    best = record.best_cell()
    runs = sum(map(len, record.runs.values()))
    print(f"record {record.name}: {runs} runs, {len(record.runs)} cells, {record.epochs} epochs; grid = {grid} "
          f"epochs ({record.seconds / runs / 60:.1f} min per run recorded); best cell "
          f"{dict(zip(record.axes, best, strict=True))}: {record.truth(best):.4f}")
    hard = difficulty(record)
    print(f"{hard['near']:.0%} of the cells within 1 point of the best; seed noise {100 * hard['noise']:.2f} "
          f"points per run (median over the {hard['repeated']} cells with 2 or more seeds)")
    print(f"noise floor: a search that ran every cell once and answered the best run it saw has a regret of "
          f"{100 * noise_floor(record, seeds):.2f} points (mean over the {seeds} replay seeds)")
    print(f"calibrated policy: {saved.policy}")
    done = {s: saved.load(s) for s in strategies}
    if saved_only:
        missing = [s for s in strategies if any(seed not in done[s] for seed in range(seeds))]
        print(f"not in the table (fewer than {seeds} seeds saved): {', '.join(missing) or 'none'}")
        strategies = [s for s in strategies if s not in missing]
    tasks = [(name, s, seed, saved.policy) for s in strategies for seed in range(seeds) if seed not in done[s]]
    print(f"{len(tasks)} replays to run, {sum(len(d) for d in done.values())} saved", flush=True)
    tic = committed = time.perf_counter()
    # Replays are independent: each process runs its share on a local Ray of its own (one replay at a time, so
    # each replay stays deterministic).
    if tasks:  # (a Ray per process: nothing to start for a table of saved replays)
        with multiprocessing.get_context("spawn").Pool(jobs, initializer=_start_ray) as pool:
            for (_, s, seed, _), ended in zip(tasks, pool.imap(_replay, tasks), strict=True):
                done[s][seed] = ended
                saved.save(s, done[s])
                finished = all(k in done[s] for k in range(seeds))
                if finished:
                    print(f"  {s}: done at {time.perf_counter() - tic:.0f} s", flush=True)
                if commit_each and (finished or time.perf_counter() - committed > COMMIT_EVERY_S):
                    from record_runs import commit  # the recorder's: one way to commit a result
                    commit(saved.folder, f"race on {name}: {s} {'done' if finished else 'in progress'} "
                                         f"({sum(map(len, done.values()))} of {len(strategies) * seeds} replays)")
                    committed = time.perf_counter()
            pool.close()  # let the workers exit (and shut their Ray down) instead of terminating them
            pool.join()
    curves = {s: [done[s][seed] for seed in range(seeds)] for s in strategies}
    print(f"\n{seeds} replay seeds; compute as a fraction of the grid ({grid} epochs); regret in kNN points, "
          f"mean +- standard error; score: 0 = {REFERENCE}'s regret, 1 = the best cell; p: paired Wilcoxon "
          f"signed-rank test against {BASELINE}")
    print(report(race(curves, record)))
    print(f"\nfigure: {plot(curves, record, figure)}\n")


if __name__ == "__main__":
    main()
