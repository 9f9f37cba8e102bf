"""Import FFCV without numba compiling a typed dictionary: 0.4 s instead of 3.9 s after torch (bench/trial_overhead.py).

``ffcv.fields.rgb_image`` keeps ``IMAGE_MODES``, a two-entry table ``{"jpg": 0, "raw": 1}``, in a
``numba.typed.Dict``; its first ``__setitem__`` at import compiles numba's dictionary implementation, which numba
does not cache across processes, so each Ray Train worker of each trial paid it again. FFCV reads the table only
from Python (its decoders' ``generate_code`` and its writer; the compiled pipelines capture the ints), so a plain
``dict`` serves it the same. :func:`install` adds an import hook that runs that one module with
``numba.typed.Dict`` bound to ``dict`` and changes nothing else. Importing the ``data`` package installs it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

MODULE = "ffcv.fields.rgb_image"


class _PlainImageModes(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``MODULE`` with the usual path finder and executes it with ``numba.typed.Dict = dict``."""

    def find_spec(self, name, path=None, target=None):
        if name != MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        self.loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        import numba.typed

        typed_dict = numba.typed.Dict
        numba.typed.Dict = dict
        try:
            self.loader.exec_module(module)
        finally:
            numba.typed.Dict = typed_dict


def install() -> None:
    """Add the hook (idempotent); it only acts if FFCV's module has not been imported yet."""
    if MODULE not in sys.modules and not any(isinstance(f, _PlainImageModes) for f in sys.meta_path):
        sys.meta_path.insert(0, _PlainImageModes())
