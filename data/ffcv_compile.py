"""How FFCV's pipeline stages are compiled here: without fast-math, and each one once per machine where it can be.

FFCV compiles every operation's closure with numba in every new loader, and did so in every trial's worker:
2.0 s for MoCo v3's two-view pipeline and 1.5 s for the two kNN loaders on 2 cores (bench/trial_overhead.py),
although the pixel kernels themselves are module-level functions in numba's on-disk cache. ``compile_stage``
replaces ``Compiler.compile`` (data.augment, which every loader imports, installs it):

- Strict IEEE float32: FFCV's ``fastmath=True`` reached the kernels LLVM inlined into a stage and moved one
  level on about 1e-6 (hue, blur) to 1e-3 (saturation) of pixel values, and which values moved depended on
  the process that had compiled numba's cache, so one seed could give two sets of views. Strict arithmetic
  gives the same bits in every process and on the device (data/device_augment.py), at no measured cost: the
  stages are glue around the kernels and FFCV's C decoders (bench/loader.py).
- A closure defined in a file is compiled with ``cache=True``. numba keys a cached closure by its bytecode
  and the pickle of its closure cells, and a cell holding a dispatcher pickles that dispatcher's UUID,
  random per process: every process would miss and add an entry. So the module-level kernels a stage
  captures get their qualified names as UUIDs instead (``name_kernels``), and a stage whose cells hold any
  other dispatcher is not cached. numba itself declines to cache what calls C through ctypes (the JPEG
  decoders and FFCV's crop), and code FFCV generates with ``exec`` (a stage's glue) has no file: those still
  compile in every process.
- One source stamp for data/augment.py and data/ops/. numba drops a cache entry when the file that defines
  the function changes, yet the entry holds the compiled code of every function it calls: a stage cached
  before an edit to a kernel in another file kept running the old kernel. So every function of those files
  is stamped with all of them (``_Together``): editing one recompiles them all, as when they were
  one file.
- One compiled stage per distinct stage and process, named by its content. numba names a function's
  symbols after its qualified name, its argument types and a counter of the process that compiled it, and a
  cached entry keeps the compiling process's counter. LLVM's engine resolves a symbol to the first module
  that defined it, so an entry loaded twice in one process (FFCV's reader and label decoder, in every
  loader), or two entries whose counters happened to match in the processes that compiled them (views in
  another order), gave a later loader the first one's function and environment. When that environment's
  owner was collected, the stage's boxing read a freed constant: ``'descr' is NULL`` in the loader thread
  and a hang (3 of 20 processes; 4 of 20 here), or a crash. So a cachable stage gets a qualified name that
  ends in a digest of its bytecode and closure (different stages, different symbols in every process), and
  the process compiles or loads it once and keeps that dispatcher for its life (``_STAGES``; a few dozen
  small stages), so no symbol is ever defined twice and no finalizer removes code a later loader calls.
"""

from __future__ import annotations

import functools
import hashlib
import threading
import types
import warnings
from pathlib import Path

from ffcv.pipeline.compiler import Compiler
from numba import njit
from numba.core.caching import CacheImpl, InTreeCacheLocator, UserProvidedCacheLocator
from numba.core.errors import NumbaWarning
from numba.core.registry import CPUDispatcher
from numba.core.serialize import dumps

# numba says so once per uncachable stage (the ctypes decoders); that is expected, not the user's concern.
warnings.filterwarnings("ignore", message="Cannot cache compiled function", category=NumbaWarning)

_NAMED: set[str] = set()  # UUIDs given here, the same in every process
_STAGES: dict[tuple, CPUDispatcher] = {}  # a cachable stage's digest and options -> its one dispatcher
_STAGES_LOCK = threading.Lock()

_HERE = Path(__file__).resolve().parent
_TOGETHER = frozenset([_HERE / "augment.py", *(_HERE / "ops").glob("*.py")])  # call one another's functions


@functools.cache
def _together_stamp() -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(_TOGETHER))).hexdigest()


class _Together:
    """A numba cache locator for the functions of ``_TOGETHER``, stamped with all of its files."""

    def get_source_stamp(self):
        return _together_stamp()

    @classmethod
    def from_function(cls, py_func, py_file):
        return super().from_function(py_func, py_file) if Path(py_file).resolve() in _TOGETHER else None


class _TogetherUserDir(_Together, UserProvidedCacheLocator):  # NUMBA_CACHE_DIR, where set (bench/soak.py --cold)
    pass


class _TogetherInTree(_Together, InTreeCacheLocator):  # else beside the source
    pass


CacheImpl._locator_classes[:0] = [_TogetherUserDir, _TogetherInTree]  # tried before numba's own, in their order


def name_kernels(namespace: dict) -> None:
    """Give every numba dispatcher in a module's ``namespace`` (its ``globals()``) its qualified name as UUID."""
    for attr, obj in namespace.items():
        if isinstance(obj, CPUDispatcher) and obj.py_func.__module__ == namespace["__name__"]:
            name = f"{namespace['__name__']}.{attr}"
            obj._set_uuid(name)  # numba's own hook, for a dispatcher rebuilt from a pickle
            _NAMED.add(name)


def _captured(obj) -> list[CPUDispatcher]:
    """The dispatchers in a closure cell's value, looking into tuples and lists (an op's parameters)."""
    if isinstance(obj, CPUDispatcher):
        return [obj]
    return [d for item in obj for d in _captured(item)] if isinstance(obj, tuple | list) else []


def _cachable(code) -> bool:
    """Whether numba's key for ``code`` is the same in every process: it comes from a file and captures no
    dispatcher but named kernels."""
    if code.__code__.co_filename in ("", "<string>"):
        return False
    return all(d._uuid in _NAMED for d in _captured(tuple(c.cell_contents for c in code.__closure__ or ())))


def _digest(code) -> str:
    """What numba's cache index keys a closure by (its bytecode and its cells' pickle), as one hex digest."""
    cells = tuple(c.cell_contents for c in code.__closure__ or ())
    return hashlib.sha256(code.__code__.co_code + dumps(cells)).hexdigest()[:20]


def compile_stage(cls, code, signature=None):
    """``Compiler.compile``: ``code`` compiled without fast-math; a cachable stage once per process, from disk."""
    if not cls.is_enabled:
        return code
    parallel = getattr(code, "is_parallel", False) and cls.num_threads > 1
    options = dict(nogil=True, error_model="numpy", parallel=parallel)
    if "<locals>" not in code.__qualname__ or not _cachable(code):
        # A module's own function (FFCV's imdecode, get_center_crop): compiled here, so never loaded twice.
        # Shared between loaders, a ctypes one raised KeyError in numba's typing while two loaders compiled.
        # Its finalizer, when a loader is collected, can still raise that KeyError (a warning in the suite):
        # harmless, it only leaves that decoder's entries in numba's function table (kilobytes per loader).
        return njit(signature, **options)(code)
    f = code.__code__
    key = (f.co_filename, f.co_firstlineno, code.__qualname__, _digest(code), parallel, signature)
    with _STAGES_LOCK:
        if key not in _STAGES:
            named = types.FunctionType(f, code.__globals__, code.__name__, code.__defaults__, code.__closure__)
            named.__qualname__ = f"{code.__qualname__}_{key[3]}"  # numba's symbol names and cache file follow it
            _STAGES[key] = njit(signature, cache=True, **options)(named)
        return _STAGES[key]


Compiler.compile = classmethod(compile_stage)
