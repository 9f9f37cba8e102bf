"""A run's parts, built before the loop that uses them, as the official ``main_moco.py`` builds its model,
optimiser and loaders and then calls ``train(...)``: the loaders, the model, the callbacks (trainers/callbacks.py),
then the :class:`~trainers.trainer.Trainer` that loops over them. Nothing is built from a half-made Trainer."""

from __future__ import annotations

import torch
from torch import nn

from trainers.callbacks import default_callbacks
from trainers.config import TrainConfig
from trainers.records import EpochRecord
from trainers.trainer import Loaders, Trainer, build_model, ffcv_loaders, seed_everything


def build_trainer(cfg: TrainConfig, device: torch.device | str = "cpu", *, loaders: Loaders | None = None,
                  model: nn.Module | None = None, record: type[EpochRecord] = EpochRecord) -> Trainer:
    """The Trainer of ``cfg`` on ``device`` with the callbacks ``cfg`` asks for; ``loaders`` default to the run's
    FFCV files, ``model`` to the method and backbone ``cfg`` names (initialised from ``cfg.seed``)."""
    device = torch.device(device)
    seed_everything(cfg.seed)  # the model's initial weights
    loaders = loaders or ffcv_loaders(cfg, device)
    model = model if model is not None else build_model(cfg)
    callbacks = default_callbacks(cfg, loaders, model.backbone.num_features, device)
    return Trainer(cfg, device, loaders=loaders, model=model, callbacks=callbacks, record=record)
