"""Loader soak: many short processes that each build loaders, read a few batches, and exit.

Each process builds a two-view loader (MoCo v3's, SimCLR's or MoCo v3's views swapped, in a random order,
with a random seed) and an evaluation loader on the checkout's Fashion-MNIST files, reads 3 batches of each
(leaving the two-view epoch mid-way, as a trial that stops does) and exits. The soak counts processes that
hang (no exit within ``--timeout``) and that crash (any other exit code than 0), on numba's warm cache (the
checkout's) or a cold one (an empty NUMBA_CACHE_DIR per process). Issue 25 measured 3 hangs in 20 processes
on a warm cache (the loader thread's ``'descr' is NULL``) and a SIGSEGV / SIGABRT at exit.

    .venv/bin/python bench/soak.py --processes 50            # warm cache, 2 at a time
    .venv/bin/python bench/soak.py --processes 20 --cold
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import random, sys
from pathlib import Path
from data.loaders import eval_loader, ssl_loader
from data.recipes import MOCO_V3_VIEWS, SIMCLR_VIEW

rng = random.Random(int(sys.argv[1]))
root = Path(sys.argv[2])
views = list(rng.choice([MOCO_V3_VIEWS, (SIMCLR_VIEW, SIMCLR_VIEW), (MOCO_V3_VIEWS[1], MOCO_V3_VIEWS[0])]))
rng.shuffle(views)
loaders = [ssl_loader(root / "fashion_mnist_train.beton", batch_size=64, views=views, seed=rng.randrange(100)),
           eval_loader(root / "fashion_mnist_test.beton", batch_size=256)]
rng.shuffle(loaders)
for loader in loaders:
    for i, batch in enumerate(loader):
        if i == 2:
            break
    assert batch[-1].shape[0] in (64, 256), batch[-1].shape
"""


def run_one(index: int, data_dir: Path, cold: bool, timeout: float) -> tuple[int, float, str]:
    """(exit code, or -1 for a hang; seconds; the stderr's last line)."""
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="soak-numba-") as cache:
        if cold:
            env["NUMBA_CACHE_DIR"] = cache
        start = time.monotonic()
        try:
            out = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CHILD, str(index), str(data_dir)],
                                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return -1, time.monotonic() - start, f"no exit within {timeout:.0f} s"
        lines = out.stderr.strip().splitlines()
        return out.returncode, time.monotonic() - start, lines[-1] if lines else ""


def soak(processes: int, data_dir: Path, *, cold: bool = False, parallel: int = 2, timeout: float = 120.0,
         seed: int = 0) -> list[tuple[int, float, str]]:
    """Run ``processes`` children, ``parallel`` at a time, with seeds drawn from ``seed``."""
    seeds = random.Random(seed).sample(range(1_000_000), processes)
    with ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(lambda s: run_one(s, data_dir, cold, timeout), seeds))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=50)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--cold", action="store_true", help="an empty numba cache in every process")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a process counts as hung")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "datasets")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from data.datasets import prepare

    prepare("fashion_mnist", args.data_dir)
    if not args.cold:
        soak(1, args.data_dir, timeout=args.timeout, seed=args.seed + 1)  # warm the cache first
    start = time.monotonic()
    results = soak(args.processes, args.data_dir, cold=args.cold, parallel=args.parallel, timeout=args.timeout,
                   seed=args.seed)
    hangs = sum(rc == -1 for rc, _, _ in results)
    crashes = [(rc, why) for rc, _, why in results if rc not in (0, -1)]
    times = sorted(t for rc, t, _ in results if rc == 0)
    median = times[len(times) // 2] if times else float("nan")
    print(f"{args.processes} processes ({'cold' if args.cold else 'warm'} numba cache, {args.parallel} at a time): "
          f"{hangs} hung, {len(crashes)} crashed, median {median:.1f} s per process, "
          f"{time.monotonic() - start:.0f} s in all")
    for rc, why in crashes:
        print(f"  exit code {rc}: {why}")
    return 0 if hangs == 0 and not crashes else 1


if __name__ == "__main__":
    sys.exit(main())
