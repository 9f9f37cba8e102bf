"""bench/gpu_checks.py, the checks bench/gpu.sh runs first on a GPU, run here with --device cpu (gloo): the
script stays runnable for the machine that has a GPU, and every check passes on the CPU."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_checks_pass_on_cpu():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_checks.py"), "--device", "cpu"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    lines = [line.strip() for line in done.stdout.splitlines() if line.startswith("  ")]
    assert done.returncode == 0, done.stdout + done.stderr
    names = [line.split()[1].rstrip(":") for line in lines]
    assert all(line.startswith("ok") for line in lines), lines
    assert names == ["bf16_step", "process_group", "global_batchnorm", "resume", "device_normalize",
                     "device_colour_ops"]
