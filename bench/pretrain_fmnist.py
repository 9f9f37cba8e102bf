"""Real data: MoCo v3 pretraining on Fashion-MNIST under Ray Train (2 gloo workers), then the same backbone
trained and at random initialisation compared by weighted kNN (k 20, T 0.07) and by the paper's linear
probe, next to kNN on raw pixels.

    .venv/bin/python bench/pretrain_fmnist.py --epochs 6          # about 15 minutes on 2 cores
    .venv/bin/python bench/pretrain_fmnist.py --epochs 1 --train-subset 2048 --probe-epochs 2   # smoke run

The baseline is the random-init backbone (same seed, same architecture), measured in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

import trainers  # noqa: F401  (compat shim before timm)
from data.convert import convert_fashion_mnist
from data.fashion_mnist import load_fashion_mnist
from data.loaders import eval_loader
from study import cluster
from trainers.backbones import create_backbone
from trainers.config import TrainConfig
from trainers.evaluation import extract
from trainers.export import load_exported
from trainers.knn import knn_accuracy
from trainers.linear_probe import linear_probe
from trainers.worker import train_loop_per_worker


def features(backbone: torch.nn.Module, path: Path, indices) -> tuple[torch.Tensor, torch.Tensor]:
    backbone.eval()
    return extract(backbone, eval_loader(path, batch_size=512, crop_ratio=1.0, num_workers=2, indices=indices))


def knn(backbone, paths, bank_idx, test_idx) -> float:
    bank, bank_y = features(backbone, paths["train"], bank_idx)
    test, test_y = features(backbone, paths["test"], test_idx)
    return knn_accuracy(test, test_y, bank, bank_y, 10)


def pixel_knn(bank_idx, test_idx) -> float:
    """Weighted kNN top-1 (k 20, T 0.07) on raw pixels: the IDX files' 28 x 28 images, unnormalised and flattened,
    the test images ``test_idx`` against the training images ``bank_idx`` (None: all of them)."""
    images, labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    bank_idx = np.arange(len(images)) if bank_idx is None else np.asarray(bank_idx)
    test_idx = np.arange(len(test_images)) if test_idx is None else np.asarray(test_idx)
    return knn_accuracy(torch.from_numpy(test_images[test_idx].reshape(len(test_idx), -1)).float(),
                        torch.from_numpy(test_labels[test_idx]),
                        torch.from_numpy(images[bank_idx].reshape(len(bank_idx), -1)).float(),
                        torch.from_numpy(labels[bank_idx]), 10)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--train-subset", type=int, default=None, help="pretraining images (default: all 60k)")
    p.add_argument("--base-lr", type=float, default=1.5e-3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--backbone", default="vit_nano_patch4_32")
    p.add_argument("--probe-epochs", type=int, default=10)
    p.add_argument("--eval-size", type=int, default=10000, help="kNN bank (train) and test images")
    p.add_argument("--data-dir", default="datasets")
    args = p.parse_args()

    paths = convert_fashion_mnist(Path(args.data_dir).resolve())
    cfg = TrainConfig(backbone=args.backbone, epochs=args.epochs, batch_size=args.batch_size, base_lr=args.base_lr,
                      mlp_dim=1024, train_subset=args.train_subset, knn_bank_subset=5000, knn_eval_subset=2000,
                      train_path=str(paths["train"]), test_path=str(paths["test"]), warmup_epochs=1)
    cluster.start_ray(None, num_cpus=2)
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as storage:
        result = TorchTrainer(train_loop_per_worker, train_loop_config=cfg.as_dict(),
                              scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.95}),
                              run_config=RunConfig(name="pretrain", storage_path=storage)).fit()
        train_min = (time.perf_counter() - tic) / 60
        with result.checkpoint.as_directory() as d:
            trained = load_exported(Path(d) / "backbone.safetensors")
    ray.shutdown()
    torch.set_num_threads(2)
    torch.manual_seed(cfg.seed)
    random_init = create_backbone(args.backbone)  # the same seed and init as the pretraining run's start

    rng = np.random.default_rng(0)
    bank_idx = np.sort(rng.choice(60000, min(args.eval_size, 60000), replace=False)).tolist()
    test_idx = list(range(min(args.eval_size, 10000)))
    rows = {"raw pixels": (pixel_knn(bank_idx, test_idx), float("nan"))}
    for name, backbone in (("random init", random_init), ("MoCo v3", trained)):
        probe = linear_probe(backbone, paths["train"], paths["test"], epochs=args.probe_epochs, batch_size=256,
                             base_lr=0.5, num_workers=2, train_indices=bank_idx, test_indices=test_idx)
        rows[name] = (knn(backbone, paths, bank_idx, test_idx), probe["top1"])
    print(f"\n{args.backbone}, {args.epochs} epochs on {args.train_subset or 60000} images, batch {args.batch_size},"
          f" base lr {args.base_lr}: pretraining took {train_min:.1f} min (2 workers, 2 cores)")
    print(f"kNN bank {len(bank_idx)} train images, {len(test_idx)} test images; linear probe "
          f"{args.probe_epochs} epochs on the bank images")
    print(f"{'features':>12} {'kNN top-1':>10} {'probe top-1':>12}")
    for name, (k, lp) in rows.items():
        print(f"{name:>12} {k:10.2%} {lp:12.2%}")
    print(f"MoCo v3 vs random init: kNN {100 * (rows['MoCo v3'][0] - rows['random init'][0]):+.1f} points")


if __name__ == "__main__":
    main()
