"""Self-supervised methods: backbone + heads + loss, forward returns (loss, features)."""

from trainers.methods.moco_v3 import MoCoV3

__all__ = ["MoCoV3"]
