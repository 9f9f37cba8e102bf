"""The paper's hyperparameter studies as study-file fragments (MoCo v3, Chen, Xie, He 2021; recipe.md).

A study file names one with ``preset: <name>`` and keeps what sets the scale (backbone, dataset, epochs,
resources); any key it sets overrides the preset's. ``preset_scale`` multiplies the batch sizes: the paper's
are 1024-6144 on 8-64 GPUs, which ``preset_scale: 0.0625`` turns into 64-384 for a CPU study. Learning rates are
base rates (lr = base_lr * batch / 256), so they carry over to any batch size.
"""

from __future__ import annotations

import copy
from typing import Any

# Each preset: what the paper varied, the sampler that reproduces it (a grid for ablations, TPE where the paper
# tuned). An ablation runs every cell to the end (FIFO, not ASHA, which would prune the very runs the paper
# compares) and only observes instability: the paper's point is to see the partial failures, not to hide them.
REPRODUCE = {"stopping": {"mode": "observe"}, "scheduler": {"type": "fifo"}}
PRESETS: dict[str, dict[str, Any]] = {
    # Sec. 4.1, Fig. 1-2: batch size x learning rate, ViT-B, AdamW; 4k shows dips, 6k large dips.
    "batch_lr": {
        "search": {"space": {"batch_size": {"choice": [1024, 2048, 4096, 6144]},
                             "base_lr": {"choice": [0.5e-4, 1.0e-4, 1.5e-4]}},
                   "sampler": "grid", "num_samples": 12},
        **REPRODUCE,
    },
    # Table 9 (momentum of the key encoder): m = 0, 0.9, 0.99, 0.999.
    "momentum": {
        "search": {"space": {"moco_m": {"choice": [0.0, 0.9, 0.99, 0.999]}}, "sampler": "grid", "num_samples": 4},
        "train": {"method": "moco_v3"},
        **REPRODUCE,
    },
    # The InfoNCE temperature tau (paper: 0.2 for ViT, 1.0 for ResNet), searched on a log scale.
    "temperature": {
        "search": {"space": {"temperature": {"log": [0.05, 1.0]}}, "sampler": "tpe", "num_samples": 8},
        "train": {"method": "moco_v3"},
    },
    # Sec. 4 / recipe: AdamW (lr 1.5e-4, wd 0.1) vs LAMB (lr 5e-4, wd 1e-3; degrades fast with lr) vs LARS (the
    # ResNet recipe: lr 0.3-0.6, wd 1e-6), each with its own lr range: conditional parameters.
    "optimizer": {
        "search": {"space": {"optimizer": {
            "choice": ["adamw", "lamb", "lars"],
            "when": {"adamw": {"base_lr": {"log": [5.0e-5, 5.0e-4]}, "weight_decay": {"log": [0.03, 0.3]}},
                     "lamb": {"base_lr": {"log": [1.5e-4, 1.5e-3]}, "weight_decay": {"log": [3.0e-4, 3.0e-3]}},
                     "lars": {"base_lr": {"log": [0.1, 1.0]}, "weight_decay": {"log": [3.0e-7, 3.0e-6]}}}}},
                   "sampler": "tpe", "num_samples": 12},
    },
    # Sec. 4.2, Fig. 6: random (frozen) patch projection on and off, at growing learning rates.
    "patch_projection": {
        "search": {"space": {"stop_grad_conv1": {"choice": [False, True]},
                             "base_lr": {"choice": [0.5e-4, 1.0e-4, 1.5e-4]}},
                   "sampler": "grid", "num_samples": 6},
        **REPRODUCE,
    },
    # Table 4 and Sec. 4.2: MoCo v3 / SimCLR / BYOL on the same ViT, each with and without the frozen projection.
    "frameworks": {
        "search": {"space": {"method": {"choice": ["moco_v3", "byol", "simclr"]},
                             "stop_grad_conv1": {"choice": [False, True]}},
                   "sampler": "grid", "num_samples": 6},
        **REPRODUCE,
    },
}


def _scale(space: dict, scale: float, multiple: int) -> None:
    entry = space.get("batch_size")
    if scale != 1.0 and isinstance(entry, dict) and "choice" in entry:
        entry["choice"] = [max(multiple, round(b * scale / multiple) * multiple) for b in entry["choice"]]


def merge(base: dict, override: dict) -> dict:
    """``base`` updated by ``override``, mappings merged key by key (a search space is replaced whole)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "space":
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_preset(data: dict) -> dict:
    """A study file's mapping with its ``preset`` expanded underneath it; raises KeyError for unknown names."""
    name = data.get("preset")
    if name is None:
        return data
    preset = copy.deepcopy(PRESETS[name])
    workers = (data.get("resources") or {}).get("workers", 1)
    _scale(preset["search"]["space"], float(data.get("preset_scale", 1.0)), max(1, int(workers)))
    return merge(preset, data)
