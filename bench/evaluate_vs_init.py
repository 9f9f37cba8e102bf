"""The linear probe of `ssl-study evaluate` on a study's best trial against the same backbone at random
initialisation (the trial's config, a fresh init with its seed), both through the same evaluation code.

    .venv/bin/python bench/evaluate_vs_init.py                       # the size of tests/test_evaluate.py
    .venv/bin/python bench/evaluate_vs_init.py --epochs 3 --train-subset 4096 --probe-epochs 10 --probe-subset 4096

It runs a tiny real study (2 trials over the base lr, 1 worker each, on a local Ray), evaluates its best trial with
``ssl-study evaluate``, then the random-init backbone in this process with the same settings. ``random_init_rows``
and ``pixel_rows`` (the baselines) are also bench/rank_agreement.py's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

import trainers  # noqa: F401  (compat shim before timm)
from study import evaluate, results
from study.cli import main
from study.spec import Evaluate, StudySpec, load_spec
from trainers.backbones import create_backbone
from trainers.export import export_backbone
from trainers.trainer import backbone_options

ROOT = Path(__file__).resolve().parents[1]


def random_init_rows(spec: StudySpec, trial: dict, ev: Evaluate, data_paths: dict[str, str], workdir: Path,
                     cpus: float = 1) -> list[dict]:
    """``ev``'s evaluation (study/evaluate.py, in this process) of ``trial``'s backbone at random initialisation:
    the trial's config (its searched parameters, ``trial`` a trials-table row), a fresh init with its seed (the
    trial's own start), exported under ``workdir``. Its rows, as ``ssl-study evaluate`` writes them."""
    cfg = spec.trial_config(trial)
    torch.manual_seed(cfg.seed)  # the trial's own start: the same seed, the same init
    fresh = Path(workdir) / "init" / "backbone.safetensors"
    export_backbone(create_backbone(cfg.backbone, **backbone_options(cfg)), cfg.backbone, fresh,
                    **backbone_options(cfg))
    job = evaluate.Job("random-init", str(fresh), ev.protocol, evaluate.settings(ev, cfg.backbone))
    return evaluate.evaluate_backbone(job, data_paths, cpus=cpus, gpu=False)


def pixel_rows(ev: Evaluate, backbone: str, data_paths: dict[str, str], cpus: float = 1) -> list[dict]:
    """``ev``'s evaluation of raw pixels, by the same code as a backbone's: the images the backbones see (the eval
    loader's crop, normalised, 3 x 32 x 32 on Fashion-MNIST), flattened (3,072 features; ``nn.Flatten`` as the
    frozen module). ``backbone``: the name whose probe settings apply (the default base lr)."""
    job = evaluate.Job("raw-pixels", "", ev.protocol, evaluate.settings(ev, backbone))
    return evaluate.evaluate_backbone(job, data_paths, cpus=cpus, gpu=False, module=torch.nn.Flatten())


def run() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=1, help="pretraining epochs")
    p.add_argument("--train-subset", type=int, default=512, help="pretraining images")
    p.add_argument("--probe-epochs", type=int, default=2)
    p.add_argument("--probe-subset", type=int, default=512, help="probe training images")
    p.add_argument("--probe-batch", type=int, default=128)
    p.add_argument("--probe-base-lr", type=float, default=0.5, help="random-init ViTs diverge at the paper's 3.0")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        study = {"name": "vs-init", "storage": f"{tmp}/runs", "data_dir": str(ROOT / "datasets"),
                 "train": {"backbone": "vit_test_patch4_32", "epochs": args.epochs, "batch_size": 64, "mlp_dim": 64,
                           "dim": 32, "warmup_epochs": 0.0, "train_subset": args.train_subset,
                           "knn_bank_subset": 256, "knn_eval_subset": 256},
                 "resources": {"workers": 1, "cpus_per_worker": 0.9, "driver_cpus": 0.1},
                 "search": {"space": {"base_lr": {"choice": [1.5e-4, 1.5e-3]}}, "sampler": "grid",
                            "num_samples": 2, "max_concurrent": 2},
                 "scheduler": {"type": "fifo"}}
        (Path(tmp) / "s.yaml").write_text(yaml.safe_dump(study))
        tic = time.perf_counter()
        assert main(["launch", f"{tmp}/s.yaml"]) == 0
        pretrain = time.perf_counter() - tic
        probe = ["--epochs", str(args.probe_epochs), "--batch-size", str(args.probe_batch), "--base-lr",
                 str(args.probe_base_lr), "--train-subset", str(args.probe_subset)]
        tic = time.perf_counter()
        assert main(["evaluate", "vs-init", "--storage", f"{tmp}/runs", "--top", "1", *probe]) == 0
        evaluated = time.perf_counter() - tic
        spec = load_spec(Path(tmp) / "runs" / "vs-init" / "study.yaml")
        [row] = results.open(spec.study_dir).table("evaluations").to_pylist()
        trial = next(t for t in results.open(spec.study_dir).table("trials").to_pylist()
                     if t["trial_id"] == row["trial_id"])

        ev = Evaluate(top=1, epochs=args.probe_epochs, batch_size=args.probe_batch, base_lr=args.probe_base_lr,
                      train_subset=args.probe_subset)
        tic = time.perf_counter()
        [init] = random_init_rows(spec, trial, ev, {"train_path": str(ROOT / "datasets/fashion_mnist_train.beton"),
                                                    "test_path": str(ROOT / "datasets/fashion_mnist_test.beton")},
                                  Path(tmp))
        init_s = time.perf_counter() - tic
    print(f"\nstudy: {args.epochs} epochs on {args.train_subset} images, 2 trials ({pretrain:.0f} s with Ray); best "
          f"trial {row['trial_id']} (base_lr {trial['base_lr']:g}, per-epoch kNN {trial['knn_top1']:.4f})")
    print(f"probe: {json.loads(row['settings'])}, test split whole (10,000 images)")
    print(f"{'backbone':>12} {'top-1':>7} {'top-5':>7} {'seconds':>8}")
    print(f"{'trained':>12} {row['top1']:7.4f} {row['top5']:7.4f} {row['seconds']:8.1f}  "
          f"(ssl-study evaluate: {evaluated:.0f} s with Ray)")
    print(f"{'random init':>12} {init['top1']:7.4f} {init['top5']:7.4f} {init_s:8.1f}")
    print(f"trained - random init: top-1 {100 * (row['top1'] - init['top1']):+.1f} points")


if __name__ == "__main__":
    run()
