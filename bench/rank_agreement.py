"""Does the study's cheap per-epoch kNN rank trials as a proper evaluation does? A real study on Fashion-MNIST,
its trials evaluated by ``ssl-study evaluate`` (linear probe and kNN on the whole test split), and the Kendall tau
of the rankings (issue 29).

    nice -n 5 .venv/bin/python bench/rank_agreement.py     # the measured run (docs/results-and-storage.md)
    .venv/bin/python bench/rank_agreement.py --name rank-smoke --lrs 1e-4 1e-3 --epochs 1 --train-subset 512 \\
        --probe-epochs 1 --probe-subset 512 --knn-subset 2000           # a smoke run, a few minutes

The study is study/default.yaml (MoCo v3, vit_nano_patch4_32) over a grid of base learning rates half a decade
apart (``--lrs``: 1e-5 .. 3e-2, so that the trials differ by more than the evaluations' noise; a first run drew 8
rates from 1e-4 .. 1e-2 by TPE, 7e-4 .. 6e-3, whose study kNN spanned 2.2 points on 1,000 test images and whose
full kNN spanned 1.1 points: a ranking of noise), every trial run to its budget: FIFO, and the instability policy
in observe mode (its verdicts recorded, nothing stopped), so that every trial completes and is ranked; 1 worker
per trial, 2 at a time, exported backbones. Then
``ssl-study evaluate NAME --top N`` by the linear probe and by kNN, and the best trial's probe against the same
backbone at random initialisation and raw pixels (bench/evaluate_vs_init.py's ``random_init_rows`` and
``pixel_rows``: the same evaluation code, in this process), with bench/pretrain_fmnist.py's kNN on the
unnormalised 28 x 28 pixels beside them.

Resumable: the study lives under ``--storage`` (default runs/); a run finds it there and resumes it (trials not
completed) or reuses it (all completed), ``ssl-study evaluate`` runs only the evaluations its table lacks, and the
baselines are kept in ``<storage>/<name>-baselines.json``. A study made with other settings is refused.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import yaml
from scipy.stats import kendalltau

import trainers  # noqa: F401  (compat shim before timm)
from study import evaluate, results, runner
from study.cli import main as cli
from study.spec import Evaluate
from trainers.trainer import DATA_SEED, subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate_vs_init import pixel_rows, random_init_rows  # bench/: the baselines, one definition
from pretrain_fmnist import pixel_knn

ROOT = Path(__file__).resolve().parents[1]
TRAIN_IMAGES = 60000  # Fashion-MNIST's training split


def study_file(args: argparse.Namespace) -> dict:
    """study/default.yaml, every trial to its budget, with this run's sizes."""
    s = yaml.safe_load((ROOT / "study" / "default.yaml").read_text())
    s.update(name=args.name, storage=str(Path(args.storage).resolve()), data_dir=str(ROOT / "datasets"))
    s["train"].update(epochs=args.epochs, train_subset=args.train_subset, export=True)
    s["resources"] = {"workers": 1, "cpus_per_worker": 0.9, "driver_cpus": 0.1}
    s["search"].update(space={"base_lr": {"choice": list(args.lrs)}}, sampler="grid", num_samples=len(args.lrs),
                       max_concurrent=2)
    s["scheduler"] = {"type": "fifo"}
    s["stopping"] = {"mode": "observe"}
    return s


def completed(spec) -> list[dict]:
    """The study's completed trials with a finite metric, best first (study/evaluate.py's plan's rule)."""
    from study.best import ranked

    try:
        trials = results.open(spec.study_dir).table("trials").to_pylist()
    except FileNotFoundError:
        return []
    metric = spec.search.metric
    return [r for r in ranked(trials, metric, spec.search.mode)
            if r["status"] == "completed" and math.isfinite(r[metric])]


def run_study(args: argparse.Namespace) -> tuple[object, float]:
    """Launch the study, or resume (or reuse) the one under ``--storage``; the spec and the seconds it took."""
    storage = Path(args.storage).resolve()
    wanted = study_file(args)
    saved = storage / f"{args.name}.yaml"
    tic = time.perf_counter()
    if (storage / args.name / "study.yaml").is_file():
        if not saved.is_file() or yaml.safe_load(saved.read_text()) != wanted:
            sys.exit(f"{storage / args.name}: a study made with other settings (or not by this script); give "
                     f"another --name, or remove it")
        spec = runner.open_study(args.name, str(storage))
        if len(completed(spec)) < len(args.lrs):
            print(f"resuming {args.name}: {len(completed(spec))} of {len(args.lrs)} trials completed")
            assert cli(["resume", args.name, "--storage", str(storage)]) == 0
        else:
            print(f"reusing {args.name}: its {len(args.lrs)} trials completed")
    else:
        storage.mkdir(parents=True, exist_ok=True)
        saved.write_text(yaml.safe_dump(wanted))
        assert cli(["launch", str(saved)]) == 0
    return runner.open_study(args.name, str(storage)), time.perf_counter() - tic


def baselines(args, spec, trial: dict, evs: dict[str, Evaluate], data_paths: dict[str, str]) -> dict:
    """Random init (``trial``'s backbone) and raw pixels, by each protocol of ``evs``: {name: {protocol: rows}},
    cached in ``<storage>/<name>-baselines.json`` under the settings they ran with."""
    cache = Path(args.storage).resolve() / f"{args.name}-baselines.json"
    key = json.dumps({"trial": trial["trial_id"], **{p: evaluate.settings(ev, spec.train_config().backbone)
                                                     for p, ev in evs.items()}}, sort_keys=True)
    if cache.is_file() and (had := json.loads(cache.read_text())).get("key") == key:
        return had["rows"]
    out: dict[str, dict] = {"random init": {}, "raw pixels": {}}
    for protocol, ev in evs.items():
        out["random init"][protocol] = random_init_rows(spec, trial, ev, data_paths, cache.parent / f"{args.name}-init",
                                                        cpus=2)
        out["raw pixels"][protocol] = pixel_rows(ev, spec.train_config().backbone, data_paths, cpus=2)
    out = json.loads(json.dumps(out, default=str))
    cache.write_text(json.dumps({"key": key, "rows": out}, indent=1))
    return out


def tau(a: list[float], b: list[float]) -> str:
    t = kendalltau(a, b)
    return f"tau {t.statistic:+.3f}, p {t.pvalue:.3g}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="rank-agreement-grid")
    p.add_argument("--storage", default=str(ROOT / "runs"))
    p.add_argument("--epochs", type=int, default=3, help="pretraining epochs per trial")
    p.add_argument("--train-subset", type=int, default=4096, help="pretraining images")
    p.add_argument("--lrs", type=float, nargs="+", default=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
                   help="the base learning rates, a trial each")
    p.add_argument("--probe-epochs", type=int, default=5)
    p.add_argument("--probe-subset", type=int, default=4096, help="linear probe training images")
    p.add_argument("--probe-batch", type=int, default=256)
    p.add_argument("--probe-base-lr", type=float, default=0.5, help="random-init ViTs diverge at the paper's 3.0")
    p.add_argument("--knn-subset", type=int, default=10000,
                   help="the kNN bank on the whole test split: a fixed subset of the train split (0: all 60,000)")
    args = p.parse_args()
    args.knn_subset = args.knn_subset or None
    start = time.perf_counter()

    spec, study_s = run_study(args)
    done = completed(spec)
    if len(done) < len(args.lrs):
        sys.exit(f"{args.name}: {len(done)} of {len(args.lrs)} trials completed; rerun to resume it")
    top = len(done)
    evs = {"linear": Evaluate(top=top, protocol="linear", epochs=args.probe_epochs, batch_size=args.probe_batch,
                              base_lr=args.probe_base_lr, train_subset=args.probe_subset),
           "knn": Evaluate(top=top, protocol="knn", train_subset=args.knn_subset)}
    probe = ["--epochs", str(args.probe_epochs), "--batch-size", str(args.probe_batch),
             "--base-lr", str(args.probe_base_lr), "--train-subset", str(args.probe_subset)]
    knn = ["--train-subset", str(args.knn_subset)] if args.knn_subset else []
    took = {}
    for protocol, extra in (("linear", probe), ("knn", knn)):
        tic = time.perf_counter()
        assert cli(["evaluate", args.name, "--storage", str(Path(args.storage).resolve()), "--top", str(top),
                    "--protocol", protocol, *extra]) == 0
        took[protocol] = time.perf_counter() - tic

    backbone = spec.train_config().backbone
    wanted = {p: [evaluate.settings_key(s) for s in evaluate.settings(ev, backbone)] for p, ev in evs.items()}
    mine = {(r["protocol"], r["settings"], r["trial_id"]): r for r in evaluate.read_rows(spec.study_dir)}

    def row(trial_id: str, protocol: str, i: int = 0) -> dict:
        """The evaluations table's row of ``trial_id`` by ``protocol`` with this run's settings (knn: i 0 is k 20)."""
        return mine[(protocol, wanted[protocol][i], trial_id)]

    tic = time.perf_counter()
    data_paths = runner.prepare_data(spec)
    base = baselines(args, spec, done[0], evs, data_paths)
    bank = subset(args.knn_subset, TRAIN_IMAGES, DATA_SEED + 1)  # the full kNN's bank (study/evaluate.py)
    pixels_28 = pixel_knn(bank, None)
    base_s = time.perf_counter() - tic

    t = spec.train_config()
    print(f"\nstudy {args.name}: {len(done)} trials completed, MoCo v3 {t.backbone}, {t.epochs} epochs on "
          f"{t.train_subset} images, base lr {', '.join(f'{x:g}' for x in args.lrs)}, FIFO, 1 worker each, 2 "
          f"at a time (trials' own time {sum(r['time_total_s'] for r in done) / 60:.0f} min; this run: "
          f"{study_s / 60:.1f} min)")
    print(f"study kNN: the per-epoch kNN of the last epoch (k 20, bank {t.knn_bank_subset}, "
          f"{t.knn_eval_subset} test images)")
    print(f"linear probe: {json.loads(wanted['linear'][0])}, whole test split "
          f"(this run: {took['linear'] / 60:.1f} min)")
    print(f"full kNN: k 20 and 200, T 0.07, bank {args.knn_subset or 60000} train images, whole test split "
          f"(this run: {took['knn'] / 60:.1f} min)")
    print(f"\n{'trial':>14} {'base_lr':>9} {'verdict':>9} {'study kNN':>10} {'probe top-1':>12} {'top-5':>7} "
          f"{'kNN k20':>8} {'kNN k200':>9}")
    cols: dict[str, list[float]] = {"study": [], "linear": [], "knn20": [], "knn200": []}
    for tr in done:
        lin, k20, k200 = row(tr["trial_id"], "linear"), row(tr["trial_id"], "knn", 0), row(tr["trial_id"], "knn", 1)
        for c, v in zip(cols, (tr["knn_top1"], lin["top1"], k20["top1"], k200["top1"]), strict=True):
            cols[c].append(v)
        print(f"{tr['trial_id']:>14} {tr['base_lr']:9.2e} {tr['verdict'] or '-':>9} {tr['knn_top1']:10.4f} "
              f"{lin['top1']:12.4f} {lin['top5']:7.4f} {k20['top1']:8.4f} {k200['top1']:9.4f}")
    print(f"\nKendall tau over {len(done)} trials (scipy.stats.kendalltau, tau-b, two-sided p):")
    print(f"  study kNN vs linear probe top-1: {tau(cols['study'], cols['linear'])}")
    print(f"  study kNN vs full kNN k 20:      {tau(cols['study'], cols['knn20'])}")
    print(f"  study kNN vs full kNN k 200:     {tau(cols['study'], cols['knn200'])}")
    print(f"  linear probe vs full kNN k 20:   {tau(cols['linear'], cols['knn20'])}")

    best = done[0]
    print(f"\nthe best trial by the study's kNN ({best['trial_id']}, base lr {best['base_lr']:.2e}) against its "
          f"baselines (this run: {base_s:.0f} s):")
    print(f"{'features':>13} {'probe top-1':>12} {'top-5':>7} {'kNN k20':>8} {'kNN k200':>9}")
    ours = {"linear": [row(best["trial_id"], "linear")], "knn": [row(best["trial_id"], "knn", i) for i in (0, 1)]}
    for name, rows in (("MoCo v3", ours), *base.items()):
        lin, k20, k200 = rows["linear"][0], rows["knn"][0], rows["knn"][1]
        print(f"{name:>13} {lin['top1']:12.4f} {lin['top5']:7.4f} {k20['top1']:8.4f} {k200['top1']:9.4f}")
    print(f"  (raw 28 x 28 pixels unnormalised, bench/pretrain_fmnist.py's kNN k 20: {pixels_28:.4f})")
    d = ours["linear"][0]["top1"]
    print(f"probe top-1, MoCo v3 - random init: {100 * (d - base['random init']['linear'][0]['top1']):+.1f} points;"
          f" MoCo v3 - raw pixels: {100 * (d - base['raw pixels']['linear'][0]['top1']):+.1f} points")
    print(f"\ntotal {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
