"""The CLI imports ``study.report`` to build its parser: importing it must not pull in matplotlib."""

import subprocess
import sys


def test_package_import_leaves_matplotlib_out():
    code = "import sys; from study import report; print(sorted(m for m in sys.modules if m.startswith('matplotlib')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
