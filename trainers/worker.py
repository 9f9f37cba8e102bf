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
    from trainers.build import build_trainer
    from trainers.export import export_backbone
    from trainers.trainer import backbone_options

    trainer = build_trainer(cfg, ray.train.torch.get_device())
    own = ray.train.get_checkpoint()  # the run's own latest checkpoint (a restarted trial) wins
    checkpoint = own or (ray.train.Checkpoint(cfg.resume_from) if cfg.resume_from else None)
    mid_epoch = MidEpoch(ray.train.get_context().get_storage()) if cfg.checkpoint_minutes else None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.load(directory)
    if mid_epoch is not None:
        mid_epoch.restore(trainer)  # a checkpoint inside the epoch after ``checkpoint``'s, if there is one
        if trainer.rank == 0:
            trainer.mid_epoch_checkpoint = mid_epoch.save
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
        if saved is not None and mid_epoch is not None:
            mid_epoch.clear()  # the epoch's own checkpoint supersedes them


class MidEpoch:
    """Checkpoints inside an epoch (``train.checkpoint_minutes``), beside Ray Train's own: ``mid_epoch/step-N``
    in the run's folder of the study's storage (a local or shared path, or object storage), N the global step.

    They are not reported to Ray Train: Tune, ASHA, Optuna and the tables see one report per epoch. Each is
    written under a temporary name and moved into place, the older ones removed after; an epoch's own checkpoint
    clears them. A restarted worker group restores the newest one that lies after its epoch checkpoint.
    """

    def __init__(self, storage) -> None:
        self.fs, self.root = storage.storage_filesystem, f"{storage.experiment_fs_path}/mid_epoch"

    def _steps(self) -> list[int]:
        from pyarrow import fs

        infos = self.fs.get_file_info(fs.FileSelector(self.root, allow_not_found=True))
        return sorted(int(i.base_name[5:]) for i in infos if i.base_name.startswith("step-")
                      and i.base_name[5:].isdigit())

    def save(self, trainer) -> None:
        from pyarrow import fs

        step = trainer.epoch * trainer.steps_per_epoch + trainer.step_in_epoch
        with tempfile.TemporaryDirectory() as tmp:
            trainer.save(Path(tmp))
            staging = f"{self.root}/.step-{step}.tmp"
            self.fs.create_dir(staging, recursive=True)
            fs.copy_files(tmp, staging, destination_filesystem=self.fs)
            self.fs.move(staging, f"{self.root}/step-{step}")
        for old in self._steps():
            if old != step:
                self.fs.delete_dir(f"{self.root}/step-{old}")

    def restore(self, trainer) -> None:
        from pyarrow import fs

        done = trainer.epoch * trainer.steps_per_epoch  # the first step after the epoch checkpoint
        later = [s for s in self._steps() if s > done]
        if later:
            with tempfile.TemporaryDirectory() as tmp:
                fs.copy_files(f"{self.root}/step-{later[-1]}", tmp, source_filesystem=self.fs)
                trainer.load(Path(tmp))

    def clear(self) -> None:
        self.fs.delete_dir_contents(self.root, missing_dir_ok=True)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: ``config`` holds the fields of :class:`TrainConfig` (``TrainConfig.as_dict``)."""
    fit(TrainConfig(**config))
