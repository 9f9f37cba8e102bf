"""The training loop: one Ray Train worker function (Train V2 API), with per-step hooks.

Each worker builds its loaders and model once, trains with DDP (gloo on CPU, NCCL on GPU), evaluates a
weighted kNN on the eval split after every epoch and reports the epoch's metrics to Ray Train. Only rank
0's metrics reach Tune, but every rank reports (a report is a barrier).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from data.convert import read_metadata
from data.loaders import ViewRecipe, eval_loader, ssl_loader
from trainers import distributed as dist
from trainers.backbones import create_backbone
from trainers.config import TrainConfig
from trainers.knn import knn_predict
from trainers.methods import MoCoV3
from trainers.schedules import cosine_momentum, scaled_lr, warmup_cosine
from trainers.sync_batchnorm import convert_sync_batchnorm


@dataclass
class StepState:
    """What a per-step hook sees: after backward, before the optimiser step (gradients are live)."""

    epoch: int
    step: int
    loss: torch.Tensor
    features: torch.Tensor
    model: nn.Module
    lr: float
    moco_m: float


StepHook = Callable[[StepState], None]


def build_model(cfg: TrainConfig) -> MoCoV3:
    if cfg.method != "moco_v3":
        raise ValueError(f"method {cfg.method!r} is not available yet; accepted: 'moco_v3'")
    backbone = create_backbone(cfg.backbone, stop_grad_conv1=cfg.stop_grad_conv1, pos_embed=cfg.pos_embed)
    return MoCoV3(backbone, dim=cfg.dim, mlp_dim=cfg.mlp_dim, temperature=cfg.temperature)


def subset(n: int | None, total: int, seed: int) -> list[int] | None:
    """A fixed random subset of ``n`` indices (the same on every worker), or None for all."""
    if n is None or n >= total:
        return None
    return np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False)).tolist()


@torch.no_grad()
def extract(backbone: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features and labels of a loader's shard, gathered from every worker."""
    feats, labels = [], []
    for images, y in loader:
        feats.append(backbone(images).float())
        labels.append(y.clone())  # FFCV reuses its batch buffers
    return dist.gather_uneven(torch.cat(feats)), dist.gather_uneven(torch.cat(labels))


def knn_top1(backbone: nn.Module, bank_loader, test_loader, num_classes: int, cfg: TrainConfig) -> float:
    was_training = backbone.training
    backbone.eval()
    bank, bank_labels = extract(backbone, bank_loader)
    feats, labels = extract(backbone, test_loader)
    backbone.train(was_training)
    pred = knn_predict(feats, bank, bank_labels, num_classes, k=cfg.knn_k, temperature=cfg.knn_t)
    return (pred == labels).float().mean().item()


def save_checkpoint(model: nn.Module, optimizer, epoch: int, knn_init: float, directory: Path) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
             "knn_top1_init": knn_init}
    torch.save(state, directory / "state.pt")


def fit(cfg: TrainConfig, hooks: Sequence[StepHook] = ()) -> None:
    """Train ``cfg`` on this worker; call inside a Ray Train worker (or a single plain process)."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    world, rank = dist.world_size(), dist.rank()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} does not divide by the {world} workers")
    device = ray.train.torch.get_device()
    sharded = world > 1

    meta = read_metadata(Path(cfg.train_path))
    views = (ViewRecipe(crop_min=cfg.crop_min),) * 2
    train_loader = ssl_loader(Path(cfg.train_path), batch_size=cfg.batch_size // world, views=views,
                              num_workers=cfg.loader_workers, seed=cfg.seed, distributed=sharded,
                              indices=subset(cfg.train_subset, meta["count"], cfg.seed), device=device)
    bank_loader = eval_loader(Path(cfg.train_path), batch_size=256, num_workers=cfg.loader_workers,
                              distributed=sharded, device=device,
                              indices=subset(cfg.knn_bank_subset, meta["count"], cfg.seed + 1))
    test_meta = read_metadata(Path(cfg.test_path))
    test_loader = eval_loader(Path(cfg.test_path), batch_size=256, num_workers=cfg.loader_workers,
                              distributed=sharded, device=device,
                              indices=subset(cfg.knn_eval_subset, test_meta["count"], cfg.seed + 2))

    net = build_model(cfg).to(device)
    model: nn.Module = net
    if sharded:
        net = convert_sync_batchnorm(net, device)
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    backbone = net.backbone
    params = [p for p in net.parameters() if p.requires_grad]
    peak_lr = scaled_lr(cfg.base_lr, cfg.batch_size)
    optimizer = torch.optim.AdamW(params, lr=peak_lr, weight_decay=cfg.weight_decay)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    start_epoch, knn_init = 0, math.nan
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", map_location=device, weights_only=False)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, knn_init = state["epoch"] + 1, state.get("knn_top1_init", math.nan)
    else:
        knn_init = knn_top1(backbone, bank_loader, test_loader, meta["num_classes"], cfg)

    steps_per_epoch = len(train_loader)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        loss_sum, seen, tic = torch.zeros((), device=device), 0, time.perf_counter()
        for i, (x1, x2, _) in enumerate(train_loader):
            step = epoch * steps_per_epoch + i
            lr = warmup_cosine(step, total_steps, warmup_steps, peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            moco_m = cosine_momentum(step / total_steps, cfg.moco_m)
            with autocast:
                loss, features = model(x1, x2, moco_m)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            state = StepState(epoch, step, loss.detach(), features, model, lr, moco_m)
            for hook in hooks:
                hook(state)
            optimizer.step()
            loss_sum += loss.detach()
            seen += x1.shape[0]
        train_time = time.perf_counter() - tic
        acc = knn_top1(backbone, bank_loader, test_loader, meta["num_classes"], cfg)
        metrics = {
            "epoch": epoch + 1,
            "loss": loss_sum.item() / steps_per_epoch,
            "lr": lr,
            "moco_m": moco_m,
            "knn_top1": acc,
            "knn_top1_init": knn_init,
            "images_per_s": seen * world / train_time,
            "step_time_s": train_time / steps_per_epoch,
        }
        last = epoch + 1 == cfg.epochs
        due = last or (cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if due and rank == 0:
                save_checkpoint(net, optimizer, epoch, knn_init, Path(tmp))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: ``config`` holds the fields of :class:`TrainConfig`."""
    fit(TrainConfig(**config))
