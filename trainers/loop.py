"""The training loop: one Ray Train worker function (Train V2 API), with per-step hooks.

Each worker builds its loaders and model once, trains with DDP (gloo on CPU, NCCL on GPU) and global-batch
BatchNorm, feeds the dense kNN monitor from the features the method already computed, evaluates a weighted
kNN on the eval split after every epoch and reports the epoch's metrics. Only rank 0's metrics reach Tune,
but every rank reports (a report is a barrier).

The instability policy (``trainers.policy``) judges every epoch's signal summary; in ``enforce`` mode a verdict
ends the run after that epoch's report, and non-finite gradients end it at once, mid-epoch. Each report carries
the epoch's verdict (``verdict``, ``verdict_reason``, ``stopped``) and its instability ``events``.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.train
import ray.train.torch
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from data.convert import read_metadata
from data.loaders import eval_loader, ssl_loader
from data.recipes import views_for
from trainers import distributed as dist
from trainers.backbones import create_backbone
from trainers.config import PRECISIONS, TrainConfig
from trainers.export import export_backbone
from trainers.knn import knn_predict
from trainers.linear_probe import OnlineLinearProbe
from trainers.methods import build_method
from trainers.monitor import DenseKnnMonitor
from trainers.optim import create_optimizer
from trainers.policy import StopPolicy, verdict
from trainers.rankme import rankme
from trainers.schedules import cosine_momentum, scaled_lr, warmup_cosine
from trainers.signals import SUMMARY_KEYS, InstabilityMonitor
from trainers.sync_batchnorm import convert_sync_batchnorm


@dataclass
class StepState:
    """What a per-step hook sees: after backward (gradients unscaled), before the optimiser step."""

    epoch: int
    step: int
    loss: torch.Tensor
    features: torch.Tensor
    labels: torch.Tensor
    model: nn.Module
    lr: float
    moco_m: float


StepHook = Callable[[StepState], None]

# The data subsets are part of the dataset, not of the run: the same images for every seed, so that the
# spread between seeds measures training (the paper's 0.1-0.3 points), not which 1,000 test images were drawn.
DATA_SEED = 0


def backbone_options(cfg: TrainConfig) -> dict:
    return {"stop_grad_conv1": cfg.stop_grad_conv1, "pos_embed": cfg.pos_embed, "mlp_norm": cfg.mlp_norm,
            "conv_stem": cfg.conv_stem}


def build_model(cfg: TrainConfig) -> nn.Module:
    backbone = create_backbone(cfg.backbone, **backbone_options(cfg))
    return build_method(cfg.method, backbone, dim=cfg.dim, mlp_dim=cfg.mlp_dim, temperature=cfg.temperature)


def subset(n: int | None, total: int, seed: int) -> list[int] | None:
    """A fixed random subset of ``n`` indices (the same on every worker), or None for all."""
    if n is None or n >= total:
        return None
    return np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False)).tolist()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. "auto": bf16 on GPU, fp32 on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of: {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


@torch.no_grad()
def extract(backbone: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features and labels of a loader's shard, gathered from every worker."""
    feats, labels = [], []
    for images, y in loader:
        feats.append(backbone(images).float())
        labels.append(y.clone())  # FFCV reuses its batch buffers
    return dist.gather_uneven(torch.cat(feats)), dist.gather_uneven(torch.cat(labels))


def evaluate(backbone: nn.Module, bank_loader, test_loader, num_classes: int, cfg: TrainConfig) -> dict:
    """Weighted kNN top-1 on the eval split (``knn_top1`` at k = cfg.knn_k, ``knn_top1_k200`` at k = 200) and
    the label-free ``rankme`` of the bank's features (trainers/rankme.py)."""
    was_training = backbone.training
    backbone.eval()
    bank, bank_labels = extract(backbone, bank_loader)
    feats, labels = extract(backbone, test_loader)
    backbone.train(was_training)
    accuracy = {"rankme": rankme(bank)}
    for key, k in (("knn_top1", cfg.knn_k), ("knn_top1_k200", 200)):
        pred = knn_predict(feats, bank, bank_labels, num_classes, k=min(k, len(bank)), temperature=cfg.knn_t)
        accuracy[key] = (pred == labels).float().mean().item()
    return accuracy


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def trace_row(signals: InstabilityMonitor, step: int, epoch: int, dense_knn: float | None) -> dict:
    """One measured step of the trace: gradient norm per layer group, its ratio to the running median, and
    the dense kNN when the monitor measured it this step."""
    return {"step": step, "epoch": epoch + 1, **{f"grad_{k}": v for k, v in signals.last_norms.items()},
            **{f"ratio_{k}": v for k, v in signals.last_ratios.items()},
            "dense_knn": math.nan if dense_knn is None else dense_knn}


def diverged(signals: InstabilityMonitor | None, policy: StopPolicy, scaler: torch.amp.GradScaler) -> bool:
    """Non-finite gradients at the last measured step, and the policy stops on them.

    Gradients are all-reduced, so every rank sees the same norms and breaks at the same step. Under fp16 the
    grad scaler skips inf steps by design: there a diverged run is caught by the epoch's verdict instead.
    """
    return (signals is not None and policy.mode == "enforce" and not scaler.is_enabled()
            and signals.nonfinite_gradients)


def fit(cfg: TrainConfig, hooks: Sequence[StepHook] = ()) -> None:
    """Train ``cfg`` on this worker; call inside a Ray Train worker."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    world, rank = dist.world_size(), dist.rank()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} does not divide by the {world} workers")
    device = ray.train.torch.get_device()
    sharded = world > 1

    # Loaders are built once and reused every epoch: each new one costs a numba compile.
    train, test = Path(cfg.train_path), Path(cfg.test_path)
    meta, test_count = read_metadata(train), read_metadata(test)["count"]
    views = views_for(cfg.method, cfg.crop_min, cfg.augment or None)
    common = {"num_workers": cfg.loader_workers, "distributed": sharded, "device": device}
    train_loader = ssl_loader(train, batch_size=cfg.batch_size // world, views=views, seed=cfg.seed,
                              indices=subset(cfg.train_subset, meta["count"], DATA_SEED), **common)
    bank_loader = eval_loader(train, batch_size=256, crop_ratio=1.0,
                              indices=subset(cfg.knn_bank_subset, meta["count"], DATA_SEED + 1), **common)
    test_loader = eval_loader(test, batch_size=256, crop_ratio=1.0,
                              indices=subset(cfg.knn_eval_subset, test_count, DATA_SEED + 2), **common)
    torch.set_num_threads(cfg.threads)  # FFCV sets it to its worker count when a loader is built

    net = build_model(cfg).to(device)
    model: nn.Module = net
    if sharded:
        net = convert_sync_batchnorm(net, device)
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    peak_lr = scaled_lr(cfg.base_lr, cfg.batch_size)
    optimizer = create_optimizer(net, cfg.optimizer, peak_lr, cfg.weight_decay, exclude_1d=cfg.exclude_1d)
    dtype = autocast_dtype(cfg.precision, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    monitor = DenseKnnMonitor(cfg.monitor_bank, meta["num_classes"], cfg.monitor_every, k=cfg.knn_k,
                              temperature=cfg.knn_t) if cfg.monitor_every else None
    policy = StopPolicy(**cfg.stopping)
    signals = InstabilityMonitor(every=cfg.signals_every, **policy.monitor_options()) if cfg.signals_every else None
    hooks = (*hooks, signals) if signals is not None else tuple(hooks)
    probe = OnlineLinearProbe(net.backbone.num_features, meta["num_classes"]).to(device) if cfg.online_probe else None

    start_epoch, knn_init, history, reported_events = 0, math.nan, [], 0
    trace: list[dict] | None = [] if cfg.trace and signals is not None and rank == 0 else None
    # The run's own latest checkpoint (a restarted trial) wins over an explicit one to start from.
    own = ray.train.get_checkpoint()
    checkpoint = own or (ray.train.Checkpoint(cfg.resume_from) if cfg.resume_from else None)
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = torch.load(Path(d) / "state.pt", map_location=device, weights_only=False)
        net.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        if monitor is not None:
            monitor.load_state_dict(saved["monitor"])
        if signals is not None:
            signals.load_state_dict(saved["signals"])
        if probe is not None:
            probe.load_state_dict(saved["probe"])
            probe.optimizer.load_state_dict(saved["probe_optimizer"])
        set_rng_state(saved["rng"])
        start_epoch, knn_init, history = saved["epoch"] + 1, saved["knn_top1_init"], saved["history"]
        trace = saved["trace"] if trace is not None else None
        reported_events = len(signals.events) if signals is not None else 0
        train_loader.next_epoch = start_epoch  # FFCV seeds each epoch's order with its epoch counter
        if own is not None:
            # Report the checkpointed epoch again: a driver killed between this checkpoint's upload and its
            # report never saw it (the results tables replace a repeated epoch, so a second copy is harmless).
            ray.train.report({**saved["metrics"], "checkpoint_path": own.path})
            if saved["metrics"].get("stopped"):
                return
    else:
        knn_init = evaluate(net.backbone, bank_loader, test_loader, meta["num_classes"], cfg)["knn_top1"]

    steps_per_epoch = len(train_loader)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        loss_sum, dense, probed, seen, tic = torch.zeros((), device=device), [], [], 0, time.perf_counter()
        for i, (x1, x2, y) in enumerate(train_loader):
            step = epoch * steps_per_epoch + i
            lr = warmup_cosine(step, total_steps, warmup_steps, peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            moco_m = cosine_momentum(step / total_steps, cfg.moco_m)
            with autocast:
                loss, features = model(x1, x2, moco_m)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            for hook in hooks:
                hook(StepState(epoch, step, loss.detach(), features, y, model, lr, moco_m))
            scaler.step(optimizer)
            scaler.update()
            if monitor is not None and (acc := monitor.update(step, features.float(), y)) is not None:
                dense.append(acc)
                if signals is not None:
                    signals.on_dense_knn(step, epoch, acc)
            if trace is not None and step % cfg.signals_every == 0:
                trace.append(trace_row(signals, step, epoch, acc if monitor is not None else None))
            if probe is not None:  # accuracy on the batch before the probe trains on it
                probed.append(probe.accuracy(features, y))
                probe.step(features, y)
            loss_sum += loss.detach()
            seen += x1.shape[0]
            if diverged(signals, policy, scaler):
                break
        train_time = time.perf_counter() - tic
        steps = i + 1
        # A diverged model has non-finite weights: its kNN is meaningless, so it is not computed.
        knn = ({"knn_top1": math.nan, "knn_top1_k200": math.nan, "rankme": math.nan}
               if diverged(signals, policy, scaler) else
               evaluate(net.backbone, bank_loader, test_loader, meta["num_classes"], cfg))
        metrics = {
            "epoch": epoch + 1,
            "loss": loss_sum.item() / steps,
            "lr": lr,
            "moco_m": moco_m,
            **knn,
            "knn_top1_init": knn_init,
            "online_probe_top1": sum(probed) / len(probed) if probed else math.nan,
            "dense_knn_last": dense[-1] if dense else math.nan,
            "dense_knn_min": min(dense) if dense else math.nan,
            "images_per_s": seen * world / train_time,
            "step_time_s": train_time / steps,
            "epoch_time_s": time.perf_counter() - tic,  # training and evaluation: the compute a replay counts
        }
        if signals is not None:  # instability summary and events of the epoch (trainers/signals.py)
            if math.isfinite(metrics["knn_top1"]):
                signals.on_epoch_knn(step, epoch, metrics["knn_top1"])
            metrics.update(signals.epoch_summary())
            metrics["events"] = [{**asdict(e), "epoch": e.epoch + 1} for e in signals.events[reported_events:]]
            reported_events = len(signals.events)
        history.append({k: metrics.get(k) for k in ("epoch", "knn_top1", "knn_top1_init", *SUMMARY_KEYS)})
        judged = dist.broadcast_object(verdict(history, policy), device)  # rank 0's signals decide for all ranks
        stop = judged is not None and policy.mode == "enforce"
        metrics.update(verdict=judged[0] if judged else "", verdict_reason=judged[1] if judged else "",
                       stopped=int(stop))
        last = epoch + 1 == cfg.epochs
        due = last or (cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0)
        with tempfile.TemporaryDirectory() as tmp:
            saved = None
            if due and rank == 0:
                state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "monitor": monitor.state_dict() if monitor else None,
                         "probe": probe.state_dict() if probe else None,
                         "signals": signals.state_dict() if signals else None,
                         "probe_optimizer": probe.optimizer.state_dict() if probe else None,
                         "rng": rng_state(), "epoch": epoch, "step": step, "knn_top1_init": knn_init,
                         "history": history, "trace": trace, "metrics": metrics}
                torch.save(state, Path(tmp) / "state.pt")
                if trace is not None:
                    pq.write_table(pa.Table.from_pylist(trace), Path(tmp) / "trace.parquet")
                if last and cfg.export:
                    export_backbone(net.backbone, cfg.backbone, Path(tmp) / "backbone.safetensors",
                                    **backbone_options(cfg))
                saved = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=saved)
        if stop:
            return


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: ``config`` holds the fields of :class:`TrainConfig`."""
    fit(TrainConfig(**config))
