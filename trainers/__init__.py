"""Models, self-supervised methods, the training loop, evaluation and instability signals.

Importing this package first makes torchvision (and so timm) importable next to a CPU-only torch, without
importing torch itself (trainers/compat.py).
"""

from trainers import compat

compat.install()
