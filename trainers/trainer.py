"""One run's pretraining: a :class:`Trainer` (build, step, evaluate, state) and the :class:`Callback` protocol.

The Trainer owns what every run has: the model (DDP and global-batch BatchNorm across workers), the
optimiser with the per-iteration warmup-cosine rate and cosine momentum, autocast and the grad scaler, the
per-epoch kNN evaluation and the checkpoint state. Everything else a run watches or does on the side is a
callback (trainers/callbacks.py): the dense kNN monitor, the instability signals, the online probe, the trace
and the policy's verdict, so a new signal is one new class. Nothing here imports Ray or FFCV at module level:
the Ray Train worker (trainers/worker.py) wraps a Trainer with a device, checkpoint restore and reporting, a
test runs one in a plain process, and ``bench/trainer.py`` times :meth:`Trainer.train_step` on any torch.
"""

from __future__ import annotations

import errno
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from trainers import distributed as dist
from trainers.backbones import create_backbone
from trainers.config import PRECISIONS, TrainConfig
from trainers.evaluation import evaluate
from trainers.host import keep_freed_memory
from trainers.methods import build_method
from trainers.optim import create_optimizer
from trainers.records import EpochRecord, halted
from trainers.schedules import cosine_momentum, scaled_lr, warmup_cosine
from trainers.sync_batchnorm import convert_sync_batchnorm

# The data subsets are part of the dataset, not of the run: the same images for every seed, so that the
# spread between seeds measures training (the paper's 0.1-0.3 points), not which 1,000 test images were drawn.
DATA_SEED = 0
STATE_FILE = "state.pt"


@dataclass
class StepState:
    """What a callback sees each step: after backward (gradients unscaled), before the optimiser step.

    Callbacks run in order and may leave results for the later ones: ``dense_knn`` (the dense kNN monitor's
    value on the steps it measures) and ``halt`` (end training now: non-finite gradients).
    """

    epoch: int
    step: int
    loss: Tensor
    features: Tensor
    labels: Tensor
    model: nn.Module
    lr: float
    moco_m: float
    dense_knn: float | None = None
    halt: bool = False


class Callback:
    """A per-step and per-epoch job of training whose state survives a restart; override what you need.

    ``name`` is its key in the checkpoint. Every rank calls every hook (some all-reduce).
    """

    name: ClassVar[str] = ""

    def on_step(self, state: StepState) -> None:
        """Each training step (see :class:`StepState`)."""

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        """After the epoch's evaluation: add this callback's numbers to ``metrics`` (the earlier callbacks' are
        already there)."""

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`."""

    def save_files(self, directory: Path) -> None:
        """Write files of its own next to the checkpoint's state (rank 0 only)."""


class Loaders(NamedTuple):
    train: object  # batches (view 1, view 2, labels)
    bank: object  # kNN bank: (images, labels)
    test: object  # kNN queries: (images, labels)
    num_classes: int


def subset(n: int | None, total: int, seed: int) -> list[int] | None:
    """A fixed random subset of ``n`` indices (the same on every worker), or None for all."""
    if n is None or n >= total:
        return None
    return np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False)).tolist()


def ffcv_loaders(cfg: TrainConfig, device: torch.device) -> Loaders:
    """The run's FFCV loaders, built once and reused every epoch (each new one costs a numba compile)."""
    from data.convert import read_metadata
    from data.loaders import eval_loader, ssl_loader
    from data.remote import local_beton

    # An object-storage URI (data_dir: s3://...) becomes this node's copy: FFCV memory-maps local files only.
    train, test = Path(local_beton(cfg.train_path)), Path(local_beton(cfg.test_path))
    meta, test_count = read_metadata(train), read_metadata(test)["count"]
    world = dist.world_size()
    common = {"num_workers": cfg.loader_workers, "distributed": world > 1, "device": device}
    loaders = Loaders(
        ssl_loader(train, batch_size=cfg.batch_size // world, views=cfg.views, seed=cfg.seed,
                   indices=subset(cfg.train_subset, meta["count"], DATA_SEED), **common),
        eval_loader(train, batch_size=256, crop_ratio=1.0,
                    indices=subset(cfg.knn_bank_subset, meta["count"], DATA_SEED + 1), **common),
        eval_loader(test, batch_size=256, crop_ratio=1.0,
                    indices=subset(cfg.knn_eval_subset, test_count, DATA_SEED + 2), **common),
        meta["num_classes"])
    torch.set_num_threads(cfg.threads)  # FFCV sets it to its worker count when a loader is built
    return loaders


def backbone_options(cfg: TrainConfig) -> dict:
    return {"stop_grad_conv1": cfg.stop_grad_conv1, "pos_embed": cfg.pos_embed, "mlp_norm": cfg.mlp_norm,
            "conv_stem": cfg.conv_stem}


def build_model(cfg: TrainConfig) -> nn.Module:
    backbone = create_backbone(cfg.backbone, **backbone_options(cfg))
    return build_method(cfg.method, backbone, dim=cfg.dim, mlp_dim=cfg.mlp_dim, temperature=cfg.temperature)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. "auto": bf16 on GPU, fp32 on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of: {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The CPU generators' states as tensors and plain values: numpy's key (a uint32 array) as an int64 tensor."""
    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    numpy_state = {"kind": str(kind), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])


class CheckpointError(Exception):
    """A file that is not an ssl-study checkpoint of tensors and plain values: refused, nothing of it is run."""


_PLAIN_SCALARS = (bool, int, float, str, type(None))


def _plain(value, where: str = "state"):
    """``value`` as ``torch.load(weights_only=True)`` reads it back: numpy scalars become Python ones (numpy's
    float64 is a float but pickles as numpy's); tensors, plain scalars and dicts, lists and tuples of them stay
    (a module state dict keeps its ``_metadata``). Anything else raises a TypeError naming where it is: written,
    it would make the checkpoint unloadable."""
    if type(value) in _PLAIN_SCALARS or isinstance(value, Tensor):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if type(value) in (dict, OrderedDict):
        plain = type(value)((_plain(k, where), _plain(v, f"{where}[{k!r}]")) for k, v in value.items())
        if hasattr(value, "_metadata"):
            plain._metadata = value._metadata
        return plain
    if type(value) in (list, tuple):
        return type(value)(_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"checkpoint {where}: {type(value).__module__}.{type(value).__qualname__} is not a tensor or a "
                    "plain value (dict, list, tuple, int, float, str, bool, None)")


class Trainer:
    """Pretrain ``cfg`` on this process (one rank of a torch.distributed group, or alone).

    ``loaders`` default to the run's FFCV files (:func:`ffcv_loaders`), ``model`` to the method and backbone
    ``cfg`` names (:func:`build_model`); ``callbacks`` run in their order (none by default:
    :func:`trainers.build.build_trainer` builds a run's parts, its callbacks among them, then its Trainer). Iterate
    :meth:`epochs` for each epoch's metrics: a dict with every field of ``record`` (trainers/records.py; a subclass
    adds metrics), its default where nothing measured it, and what callbacks add.
    """

    def __init__(self, cfg: TrainConfig, device: torch.device | str = "cpu", *, loaders: Loaders | None = None,
                 model: nn.Module | None = None, callbacks: Sequence[Callback] = (),
                 record: type[EpochRecord] = EpochRecord) -> None:
        seed_everything(cfg.seed)
        self.cfg, self.device, self.record = cfg, torch.device(device), record
        if self.device.type == "cpu":
            keep_freed_memory()  # each step reuses the last one's pages: trainers/host.py
        self.world, self.rank = dist.world_size(), dist.rank()
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} does not divide by the {self.world} workers")
        self.loaders = loaders or ffcv_loaders(cfg, self.device)

        self.net = (model if model is not None else build_model(cfg)).to(self.device)
        self.model: nn.Module = self.net  # what the step calls: maybe DDP, maybe compiled
        if self.world > 1:
            self.net = convert_sync_batchnorm(self.net, self.device)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.net, device_ids=ids)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.peak_lr = scaled_lr(cfg.base_lr, cfg.batch_size)
        self.optimizer = create_optimizer(self.net, cfg.optimizer, self.peak_lr, cfg.weight_decay,
                                          exclude_1d=cfg.exclude_1d, lamb_max_grad_norm=cfg.lamb_max_grad_norm)
        dtype = autocast_dtype(cfg.precision, self.device)
        self.autocast = torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=dtype == torch.float16)

        self.steps_per_epoch = len(self.loaders.train)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)
        self.callbacks = list(callbacks)
        self.epoch = 0  # the next epoch to train
        self.step_in_epoch = 0  # batches of that epoch already trained (a checkpoint taken mid-epoch)
        self.partial = [0.0, 0]  # that epoch's loss sum and images so far
        self.knn_init = math.nan  # kNN top-1 of the network at initialisation
        self.metrics: dict = {}  # the last epoch's
        self.halted = False  # a callback ended training mid-epoch: the weights are not finite
        # Called with the trainer every ``cfg.checkpoint_minutes`` inside an epoch (trainers/worker.py saves it).
        self.mid_epoch_checkpoint: Callable[[Trainer], None] | None = None

    # ---------------------------------------------------------------------------------------------- the step

    def train_step(self, step: int, x1: Tensor, x2: Tensor, labels: Tensor) -> StepState:
        """One optimiser step at global step ``step`` (schedules are per iteration); returns what callbacks saw."""
        lr = warmup_cosine(step, self.total_steps, self.warmup_steps, self.peak_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        moco_m = cosine_momentum(step / self.total_steps, self.cfg.moco_m)
        if hasattr(self.net, "update_momentum"):  # here, not in the (maybe compiled) forward: see MoCoV3.forward
            self.net.update_momentum(moco_m)
        with self.autocast:
            loss, features = self.model(x1, x2)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        state = StepState(step // self.steps_per_epoch, step, loss.detach(), features, labels, self.model, lr, moco_m)
        for callback in self.callbacks:
            callback.on_step(state)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return state

    def train_epoch(self, epoch: int) -> dict:
        """Train one epoch, or its rest after ``step_in_epoch`` batches; its loss, schedule values and speed
        (stops early when a callback halts). Every ``cfg.checkpoint_minutes`` it hands itself to
        ``mid_epoch_checkpoint``."""
        self.model.train()
        start = steps = self.step_in_epoch
        loss_so_far, seen = self.partial
        loss_sum, seen_before, tic = torch.tensor(loss_so_far, device=self.device), seen, time.perf_counter()
        if start:
            self.loaders.train.skip_batches = start  # the same batches as a whole epoch, from batch ``start`` on
        saved, every_s = time.monotonic(), 60 * self.cfg.checkpoint_minutes
        for i, (x1, x2, y) in enumerate(self.loaders.train, start):
            state = self.train_step(epoch * self.steps_per_epoch + i, x1, x2, y)
            loss_sum += state.loss
            seen += x1.shape[0]
            steps = self.step_in_epoch = i + 1
            if state.halt:
                self.halted = True
                break
            if every_s and self.mid_epoch_checkpoint and steps < self.steps_per_epoch \
                    and time.monotonic() - saved >= every_s:
                self.partial = [loss_sum.item(), seen]  # a device sync, once a checkpoint
                self.mid_epoch_checkpoint(self)
                saved = time.monotonic()
        self.step_in_epoch, self.partial = 0, [0.0, 0]
        seconds = time.perf_counter() - tic
        return {"loss": loss_sum.item() / steps, "lr": state.lr, "moco_m": state.moco_m,
                "images_per_s": (seen - seen_before) * self.world / seconds, "step_time_s": seconds / (steps - start)}

    def evaluate(self) -> dict:
        """kNN top-1 at k and at 200, and RankMe (trainers/evaluation.py), of the backbone now."""
        return evaluate(self.net.backbone, self.loaders.bank, self.loaders.test, self.loaders.num_classes,
                        k=self.cfg.knn_k, temperature=self.cfg.knn_t, autocast=self.autocast)

    # -------------------------------------------------------------------------------------------- the epochs

    def epochs(self) -> Iterator[dict]:
        """Train from :attr:`epoch` to the end, yielding each epoch's metrics; ends early on a stop verdict or
        after the epoch a callback halted."""
        if self.epoch == 0 and math.isnan(self.knn_init):
            self.knn_init = self.evaluate()["knn_top1"]
        while self.epoch < self.cfg.epochs:
            tic = time.perf_counter()
            # Every field, so that every run reports one schema; a callback that is off leaves its default (NaN).
            metrics = {**self.record(epoch=self.epoch + 1).report(), **self.train_epoch(self.epoch)}
            metrics = halted(metrics) if self.halted else {**metrics, **self.evaluate()}
            metrics.update(knn_top1_init=self.knn_init, epoch_time_s=time.perf_counter() - tic)
            for callback in self.callbacks:
                callback.on_epoch_end(self.epoch, metrics)
            self.metrics, self.epoch = metrics, self.epoch + 1
            yield metrics
            if metrics.get("stopped") or self.halted:
                return

    # ------------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Everything a restarted run needs to continue exactly: weights, optimiser, RNG, callbacks."""
        state = {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "rng": rng_state(), "epoch": self.epoch - 1,
                 "step": self.epoch * self.steps_per_epoch + self.step_in_epoch - 1, "knn_top1_init": self.knn_init,
                 "metrics": self.metrics, "step_in_epoch": self.step_in_epoch, "partial": list(self.partial)}
        for callback in self.callbacks:
            state[callback.name] = callback.state_dict()
        return _plain(state)  # what torch.load(weights_only=True) reads: see load

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        for callback in self.callbacks:
            if state.get(callback.name) is not None:
                callback.load_state_dict(state[callback.name])
        set_rng_state(state["rng"])
        self.epoch, self.knn_init, self.metrics = state["epoch"] + 1, state["knn_top1_init"], state["metrics"]
        self.step_in_epoch, self.partial = state.get("step_in_epoch", 0), list(state.get("partial", [0.0, 0]))
        if hasattr(self.loaders.train, "next_epoch"):  # FFCV seeds each epoch's order with its epoch counter
            self.loaders.train.next_epoch = self.epoch

    def save(self, directory: Path) -> None:
        """Write the checkpoint (``state.pt`` and the callbacks' files) into ``directory``."""
        torch.save(self.state_dict(), Path(directory) / STATE_FILE)
        for callback in self.callbacks:
            callback.save_files(Path(directory))

    def load(self, directory: Path) -> None:
        """Restore the checkpoint :meth:`save` wrote into ``directory``.

        ``state.pt`` is read with ``weights_only=True``: tensors and plain values only, so a foreign file runs
        nothing of what it pickled. FileNotFoundError if it is missing; :class:`CheckpointError` (one line, the
        file and why) if it is not such a checkpoint: a pickle of anything else, truncated, another torch file.
        """
        path = Path(directory) / STATE_FILE
        refused = f"{path}: refused: not an ssl-study checkpoint of tensors and plain values"
        try:
            # To the CPU first: a checkpoint mapped straight to the GPU would put the CPU RNG state there
            # (set_rng_state then raises) and leave AdamW's step counters on the GPU (a host sync per parameter).
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"no checkpoint state ({STATE_FILE}) there", str(path)) from None
        except Exception as e:  # also an OSError: a zip cut short can fail a seek ("[Errno 22] Invalid argument")
            # torch's message runs over lines of advice; the reason is after "WeightsUnpickler error:", if any.
            text = str(e).split("WeightsUnpickler error:", 1)[-1]
            reason = next((line.strip() for line in text.splitlines() if line.strip()), "").split(". ")[0]
            reason = f"{type(e).__name__}: {reason}" if reason else type(e).__name__
            raise CheckpointError(f"{refused} (torch.load weights_only: {reason})") from e
        if not isinstance(state, dict):
            raise CheckpointError(f"{refused} (a {type(state).__name__}, not the trainer's state)")
        missing = [k for k in ("model", "optimizer", "scaler", "rng", "epoch", "knn_top1_init", "metrics")
                   if k not in state]
        if missing:
            raise CheckpointError(f"{refused} (no {', '.join(missing)})")
        self.load_state_dict(state)
