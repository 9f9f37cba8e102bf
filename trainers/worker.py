"""The Ray Train worker (Train V2 API) around a :class:`~trainers.trainer.Trainer`: device, restore, report.

Every rank reports each epoch (a report is a barrier); only rank 0's metrics reach Tune, and rank 0 writes
the checkpoint: every ``checkpoint_every`` epochs and at the end, where it also carries the exported
backbone. A restarted trial continues from its own latest checkpoint; a new one may start from
``resume_from``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import ray.train
import ray.train.torch

from trainers.config import TrainConfig


def fit(cfg: TrainConfig) -> None:
    """Train ``cfg`` on this Ray Train worker, reporting every epoch."""
    # Imported here, not above: Tune's trial actor and Train's controller import this module to unpickle
    # train_loop_per_worker, and neither needs the model (timm and the Trainer: about 1.5 s each on 2 cores).
    from trainers.export import export_backbone
    from trainers.trainer import Trainer, backbone_options

    trainer = Trainer(cfg, ray.train.torch.get_device())
    own = ray.train.get_checkpoint()  # the run's own latest checkpoint (a restarted trial) wins
    checkpoint = own or (ray.train.Checkpoint(cfg.resume_from) if cfg.resume_from else None)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.load(directory)
        if own is not None:
            # Report the checkpointed epoch again: a driver killed between this checkpoint's upload and its
            # report never saw it (the results tables replace a repeated epoch, so a second copy is harmless).
            ray.train.report({**trainer.metrics, "checkpoint_path": own.path})
            if trainer.metrics.get("stopped"):
                return
    for metrics in trainer.epochs():
        last = trainer.epoch == cfg.epochs
        due = last or (cfg.checkpoint_every and trainer.epoch % cfg.checkpoint_every == 0)
        with tempfile.TemporaryDirectory() as tmp:
            saved = None
            if due and trainer.rank == 0:
                trainer.save(Path(tmp))
                if last and cfg.export:
                    export_backbone(trainer.net.backbone, cfg.backbone, Path(tmp) / "backbone.safetensors",
                                    **backbone_options(cfg))
                saved = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=saved)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: ``config`` holds the fields of :class:`TrainConfig` (``TrainConfig.as_dict``)."""
    fit(TrainConfig(**config))
