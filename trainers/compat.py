"""Let torchvision (and so timm) import next to a CPU-only torch.

PyPI's torchvision 0.28 is a CUDA build: its ``_C`` library links libtorch_cuda and cannot load beside the
CPU torch wheel. torchvision then fails at import time, in ``_meta_registrations``, because the
``torchvision::nms`` / ``qnms`` operators it registers fake kernels for were never defined. Defining just
their schemas lets transforms, transforms.v2 and models import; the C++ ops (nms, decode_jpeg) stay
unavailable and nothing here uses them.

``apply()`` must run before the first ``import torchvision`` / ``import timm`` in every process (the driver
and each Ray worker): importing the ``trainers`` package installs a hook (:func:`install`) that runs it just
before torchvision is first imported, so that a process which never touches torchvision (the CLI reading a
study file: 0.1 s instead of 4 s) never imports torch either. Where torchvision's library loads (GPU
machines, matching builds) it does nothing.
"""

from __future__ import annotations

import ctypes
import importlib.abc
import importlib.util
import sys
from pathlib import Path

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # kept alive: dropping it would deregister the schemas


def torchvision_library() -> Path | None:
    """Path of torchvision's compiled ``_C`` library, or None when torchvision is not installed."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("_C*.so"))
    return found[0] if found else None


def library_loads(path: Path) -> bool:
    """True when the shared library at ``path`` can be loaded into this process."""
    try:
        ctypes.CDLL(str(path))
    except OSError:
        return False
    return True


def apply(library: Path | None = None) -> bool:
    """Define torchvision's operator schemas if its compiled library cannot load. Idempotent.

    Returns True when the schemas are (now) defined by this module, False when nothing was needed.
    """
    global _library
    import torch

    if _library is not None:
        return True
    library = library or torchvision_library()
    if library is None or library_loads(library):
        return False
    if hasattr(torch.ops.torchvision, "nms"):  # defined already by someone else: leave it alone
        return False
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS.values():
        _library.define(schema)
    return True


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs :func:`apply` when ``torchvision`` is first imported, then leaves the import to the usual finders."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            apply()
        return None


def install() -> None:
    """Make the next ``import torchvision`` (timm's, or anyone's) run :func:`apply` first. Idempotent."""
    if "torchvision" in sys.modules:
        apply()
    elif not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
