"""Models, self-supervised methods, the training loop, evaluation and instability signals.

Importing this package first makes torchvision (and so timm) importable next to a CPU-only torch.
"""

from trainers import compat

compat.apply()
