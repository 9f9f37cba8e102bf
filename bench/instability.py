"""Evidence for the instability signals and the stopping policy (issue 5; MoCo v3 paper Sec. 4.1-4.2).

A learning-rate sweep of MoCo v3 on Fashion-MNIST that reaches rates too high for stable training, each rate
with and without the frozen random patch projection (``stop_grad_conv1``), run as a real study in observe mode
(every run goes to the end; the policy's verdicts are recorded, not acted on) with per-step traces. Then:

- a figure in the style of the paper's Fig. 4-5: dense kNN with dips, and first / last layer gradient norms
  with spikes, for a stable and an unstable run;
- whether first-layer spikes come before the last layer's and before the kNN dips (lead time);
- whether the frozen patch projection lowers the spike count and raises the final accuracy at high rates;
- the policy's quality: replaying its enforce-mode verdicts (trainers.policy.verdict, the function the trainer
  applies) on each run's epoch history: which runs it stops, when, the compute saved, and the mistakes. A run's
  "stable counterpart" is the same rate with the frozen patch projection; "degraded" = ends 2+ points below it,
  or below the kNN of the same network at random initialisation (when both arms of a rate fail).

    .venv/bin/python bench/instability.py                  # 6 runs of 6 epochs: about 20 minutes on 2 cores
    .venv/bin/python bench/instability.py --epochs 2 --rates 1e-3 1e-1 --train-subset 1024   # smoke run
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyarrow.parquet as pq
import ray

from study import cluster, runner
from study.replay import first_verdict
from study.spec import Resources, Scheduler, Search, StudySpec, validate
from trainers.policy import StopPolicy
from trainers.registry import VIT_CONFIGS


def sweep_spec(args: argparse.Namespace) -> StudySpec:
    train = {"method": "moco_v3", "backbone": args.backbone, "epochs": args.epochs, "batch_size": args.batch_size,
             "warmup_epochs": args.warmup_epochs, "mlp_dim": 1024, "train_subset": args.train_subset,
             "knn_bank_subset": 2000, "knn_eval_subset": 1000, "monitor_every": 4, "monitor_bank": 1024,
             "trace": True}
    spec = StudySpec(
        name=args.name, storage=args.storage, train=train,
        # one worker per trial, two trials at a time: each run has one core, and no DDP overhead on the CPU
        resources=Resources(workers=1, cpus_per_worker=0.9, driver_cpus=0.05),
        search=Search(space={"base_lr": {"choice": args.rates}, "stop_grad_conv1": {"choice": [False, True]}},
                      sampler="grid", num_samples=2 * len(args.rates), max_concurrent=2, seed=0),
        scheduler=Scheduler(type="fifo"), stopping=StopPolicy(mode="observe"), source="bench/instability.py")
    return validate(spec)


def load(spec: StudySpec) -> tuple[list[dict], dict[str, list[dict]], dict[str, list[dict]], list[dict]]:
    out = spec.study_dir / "results"
    trials = pq.read_table(out / "trials.parquet").to_pylist()
    epochs: dict[str, list[dict]] = {}
    for row in sorted(pq.read_table(out / "epochs.parquet").to_pylist(), key=lambda r: r["epoch"]):
        epochs.setdefault(row["trial_id"], []).append(row)
    traces = {t["trial_id"]: pq.read_table(Path(t["checkpoint"]) / "trace.parquet").to_pylist()
              for t in trials if t["checkpoint"]}
    return trials, epochs, traces, pq.read_table(out / "events.parquet").to_pylist()


def degradation(trial: dict, by_key: dict) -> float:
    """How far the run ends below its stable counterpart (same rate, frozen patch projection); inf if NaN."""
    counterpart = by_key.get((trial["base_lr"], True))
    if math.isnan(trial["knn_top1"]):
        return math.inf
    return counterpart["knn_top1"] - trial["knn_top1"] if counterpart else math.nan


def is_degraded(trial: dict, by_key: dict) -> bool:
    """Ends 2+ points below its stable counterpart, or below the same network at random initialisation."""
    return degradation(trial, by_key) >= 0.02 or trial["knn_top1"] < trial["knn_top1_init"]


def quality(trials: list[dict], epochs: dict, by_key: dict, policy: StopPolicy, dim: int, budget: int) -> dict:
    """Replay ``policy`` on every run: degraded runs caught by half the budget, healthy runs stopped, epochs saved."""
    q = {"degraded": 0, "caught": 0, "healthy": 0, "mistakes": 0, "saved": 0, "budget": budget * len(trials)}
    for t in trials:
        decided = first_verdict(epochs[t["trial_id"]], policy, dim)
        stop = decided[0] if decided else None
        q["saved"] += budget - (stop or budget)
        if is_degraded(t, by_key):
            q["degraded"] += 1
            q["caught"] += int(stop is not None and stop <= budget / 2)
        else:
            q["healthy"] += 1
            q["mistakes"] += int(stop is not None)
    return q


def leads(trace: list[dict], events: list[dict], window: int) -> dict[str, list[int]]:
    """For each last-block spike and each dense-kNN dip: steps since the latest first-layer spike (within
    ``window`` steps), and None when no first-layer spike came before it."""
    first = "patch_embed" if any("grad_patch_embed" in r for r in trace) else "first_block"
    spikes = {e["layer"]: [] for e in events}
    for e in events:
        if e["kind"] == "grad_spike":
            spikes[e["layer"]].append(e["step"])
    dips = [e["step"] for e in events if e["kind"] == "knn_dip" and e["layer"] == "dense_knn"]

    def lead(step: int) -> int | None:
        before = [s for s in spikes.get(first, []) if step - window <= s <= step]
        return step - max(before) if before else None

    return {"last_block": [lead(s) for s in spikes.get("last_block", [])], "dense_knn": [lead(s) for s in dips]}


def plot(runs: list[tuple[str, dict, list[dict], list[dict]]], threshold: float, path: Path) -> Path:
    """Per run (a column): dense kNN with its dips, then first and last layer gradient norms with spikes."""
    fig, axes = plt.subplots(2, len(runs), figsize=(6 * len(runs), 6.5), sharex="col", squeeze=False)
    for col, (title, trial, trace, events) in enumerate(runs):
        knn = [(r["step"], r["dense_knn"]) for r in trace if not math.isnan(r["dense_knn"])]
        ax = axes[0, col]
        ax.plot(*zip(*knn, strict=True), lw=1.2, color="tab:blue", label="dense kNN top-1")
        dips = [e["step"] for e in events if e["kind"] == "knn_dip" and e["layer"] == "dense_knn"]
        for s in dips:
            ax.axvline(s, color="tab:red", alpha=0.25, lw=1)
        ax.set_title(f"{title}: base_lr {trial['base_lr']:.2g}, frozen patch proj. {trial['stop_grad_conv1']}\n"
                     f"final kNN {trial['knn_top1']:.3f}, {int(trial['spike_episodes'])} spike episodes, "
                     f"{len(dips)} dips", fontsize=9)
        ax.set_ylabel("dense kNN top-1 (dips red)")
        ax = axes[1, col]
        for layer, colour in (("patch_embed", "tab:orange"), ("first_block", "tab:green"),
                              ("last_block", "tab:purple")):
            key = f"grad_{layer}"
            if not any(key in r for r in trace):
                continue
            steps = [r["step"] for r in trace if key in r]
            ax.plot(steps, [r[key] for r in trace if key in r], lw=1, color=colour, label=layer)
            spiked = [(r["step"], r[key]) for r in trace if r.get(f"ratio_{layer}", 0) > threshold]
            if spiked:
                ax.scatter(*zip(*spiked, strict=True), color=colour, marker="v", s=30, zorder=3)
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"gradient norm (▼ spike > {threshold:g}x median)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", type=float, nargs="+", default=[1e-3, 5e-3, 2e-2])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--train-subset", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--backbone", default="vit_nano_patch4_32")
    p.add_argument("--storage", default="runs")
    p.add_argument("--name", default="bench-instability")
    p.add_argument("--lead-window", type=int, default=20, help="steps a first-layer spike may precede")
    p.add_argument("--skip-run", action="store_true", help="analyse an existing sweep")
    args = p.parse_args()

    spec = sweep_spec(args)
    tic = time.perf_counter()
    if not args.skip_run:
        cluster.start_ray(None)
        try:
            runner.run_study(spec)
        finally:
            ray.shutdown()
    wall = time.perf_counter() - tic
    trials, epochs, traces, events = load(spec)
    trials.sort(key=lambda t: (t["stop_grad_conv1"], t["base_lr"]))
    policy = StopPolicy()
    by_key = {(t["base_lr"], t["stop_grad_conv1"]): t for t in trials}

    print(f"\nsweep: {len(trials)} runs, {args.epochs} epochs of {args.train_subset} images, batch {args.batch_size}, "
          f"{args.backbone}; {wall / 60:.1f} min wall\n")
    print(f"{'base_lr':>8} {'frozen':>6} {'final':>6} {'best':>6} {'spk_ep':>6} {'dips':>4} {'led%':>5} "
          f"{'lead':>5} {'vs_cp':>6}  policy (enforce replay)")
    dim = VIT_CONFIGS[args.backbone]["embed_dim"]
    lead_last, lead_dip = [], []
    for t in trials:
        tid, history = t["trial_id"], epochs[t["trial_id"]]
        ev = [e for e in events if e["trial_id"] == tid]
        found = leads(traces.get(tid, []), ev, args.lead_window)
        lead_last += found["last_block"]
        lead_dip += found["dense_knn"]
        led = [r["first_layer_led_frac"] for r in history if not math.isnan(r["first_layer_led_frac"])]
        lead_steps = [r["first_layer_lead_steps"] for r in history if not math.isnan(r["first_layer_lead_steps"])]
        gap = degradation(t, by_key)
        degraded = is_degraded(t, by_key)
        decided = first_verdict(history, policy, dim)
        said = f"{decided[1]} at epoch {decided[0]}: {decided[2]}" if decided else "runs to the end"
        print(f"{t['base_lr']:8.2g} {t['stop_grad_conv1']!s:>6} {t['knn_top1']:6.3f} {t['knn_top1_best']:6.3f} "
              f"{t['spike_episodes']:6.0f} {t['knn_dips']:4.0f} "
              f"{100 * statistics.mean(led) if led else math.nan:5.0f} "
              f"{statistics.median(lead_steps) if lead_steps else math.nan:5.1f} {gap:6.3f}  "
              f"{'DEGRADED ' if degraded else ''}{said}")

    def frac(xs: list) -> str:
        known = [x for x in xs if x is not None]
        return f"{len(known)}/{len(xs)}" + (f", median lead {statistics.median(known):.0f} steps" if known else "")

    print(f"\nlast-block spikes preceded by a first-layer spike (<= {args.lead_window} steps): {frac(lead_last)}")
    print(f"dense-kNN dips preceded by a first-layer spike (<= {args.lead_window} steps): {frac(lead_dip)}")
    for frozen in (False, True):
        arm = [t for t in trials if t["stop_grad_conv1"] == frozen and t["base_lr"] >= sorted(args.rates)[-2]]
        print(f"high rates, frozen patch projection {frozen}: spike episodes "
              f"{sum(t['spike_episodes'] for t in arm):.0f}, mean final kNN "
              f"{statistics.mean(t['knn_top1'] for t in arm if not math.isnan(t['knn_top1'])):.3f}"
              if arm else "")
    print(f"\npolicy quality (enforce-mode replay; degraded = 2+ points below its counterpart or below random init):"
          f"\n  default: {policy}")
    for name, variant in (("default", policy), ("max_spikes=1", replace(policy, max_spikes=1)),
                          ("max_spikes=0", replace(policy, max_spikes=0))):
        q = quality(trials, epochs, by_key, variant, dim, args.epochs)
        print(f"  {name:>12}: degraded runs caught by half budget {q['caught']}/{q['degraded']}; healthy runs "
              f"stopped by mistake {q['mistakes']}/{q['healthy']}; compute saved {q['saved']}/{q['budget']} epochs")

    unfrozen = [t for t in trials if not t["stop_grad_conv1"] and t["trial_id"] in traces]
    stable = min(unfrozen, key=lambda t: (t["spike_episodes"] + t["knn_dips"], -t["knn_top1"]))
    unstable = max(unfrozen, key=lambda t: (t["spike_episodes"] + t["knn_dips"], t["base_lr"]))

    def label(t: dict) -> str:
        return "degraded" if is_degraded(t, by_key) else "stable"

    figure = plot([(label(t), t, traces[t["trial_id"]], [e for e in events if e["trial_id"] == t["trial_id"]])
                   for t in (stable, unstable)],
                  policy.spike_threshold, spec.study_dir / "instability.png")
    print(f"\nfigure: {figure}")


if __name__ == "__main__":
    main()
