"""Self-supervised losses, one per file, each a pure nn.Module."""

from trainers.losses.byol import ByolLoss
from trainers.losses.ctr import CtrLoss
from trainers.losses.nt_xent import NTXentLoss

__all__ = ["ByolLoss", "CtrLoss", "NTXentLoss"]
