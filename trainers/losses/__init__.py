"""Self-supervised losses, one per file, each a pure nn.Module."""

from trainers.losses.ctr import CtrLoss

__all__ = ["CtrLoss"]
