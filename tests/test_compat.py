"""The torchvision-on-CPU-torch shim: applied where torchvision's library cannot load, inert elsewhere."""

import subprocess
import sys
from pathlib import Path

import torch

from trainers import compat


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_timm_and_torchvision_work_after_import_trainers():
    code = """
import trainers, torch, timm, torchvision
from torchvision.transforms import v2
x = torch.rand(2, 3, 32, 32)
y = v2.functional.adjust_hue(x, 0.1)
assert y.shape == x.shape and not torch.equal(x, y)
m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, num_classes=0)
print(tuple(m(x).shape))
"""
    out = run_python(code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("(2, 192)")


def test_shim_matches_whether_torchvision_library_loads():
    lib = compat.torchvision_library()
    assert lib is not None and lib.exists()
    # In this process `import trainers` ran apply(): the shim is active exactly when the library fails.
    assert (compat._library is not None) == (not compat.library_loads(lib))


def test_without_shim_torchvision_import_fails_only_when_library_cannot_load():
    out = run_python("import torchvision")
    assert (out.returncode == 0) == compat.library_loads(compat.torchvision_library())
    if out.returncode:
        assert "torchvision::nms" in out.stderr


def test_inert_when_the_library_loads():
    loadable = next(Path(torch.__file__).parent.joinpath("lib").glob("libc10.so*"))
    out = run_python(f"""
from pathlib import Path
import torch
from trainers import compat  # importing the package applies the shim for the real library...
compat._library = None       # ...so forget that and ask again about a library that loads
assert compat.apply(Path({str(loadable)!r})) is False
assert compat._library is None
""")
    assert out.returncode == 0, out.stderr[-2000:]


def test_defines_schemas_when_the_library_cannot_load(tmp_path):
    broken = tmp_path / "_C.so"
    broken.write_bytes(b"not a shared library")
    out = run_python(f"""
import importlib, sys
from pathlib import Path
import torch
sys.modules.pop("trainers", None)
spec = importlib.util.spec_from_file_location("compat", {str(Path(compat.__file__))!r})
c = importlib.util.module_from_spec(spec); spec.loader.exec_module(c)
assert not hasattr(torch.ops.torchvision, "nms")
assert c.apply(Path({str(broken)!r})) is True
assert c.apply(Path({str(broken)!r})) is True  # idempotent
assert hasattr(torch.ops.torchvision, "nms") and hasattr(torch.ops.torchvision, "qnms")
""")
    assert out.returncode == 0, out.stderr[-2000:]
