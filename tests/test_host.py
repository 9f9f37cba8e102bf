"""trainers/host.py: freed memory stays in a CPU training process, so a step does not fault its pages in again."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from trainers.config import TrainConfig
from trainers.host import keep_freed_memory
from trainers.trainer import Loaders, Trainer

# A fresh process allocates a 100 MB tensor and frees it, and prints what glibc's mallinfo2 says: the bytes in
# mmapped blocks while it lives, then the free bytes the heap holds once it is gone.
MALLINFO = """
import ctypes, sys, torch
from trainers.host import keep_freed_memory
FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "kept":
    assert keep_freed_memory()
block = torch.empty(25 * 2**20)
mapped = libc.mallinfo2().hblkhd
del block
print(mapped, libc.mallinfo2().fordblks)
"""
MB100 = 100 * 2**20


def mallinfo(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", MALLINFO, mode], capture_output=True, text=True, check=True)
    mapped, held = out.stdout.split()[-2:]
    return int(mapped), int(held)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_blocks_stay_in_the_process_for_the_next_step():
    # glibc's defaults: a block above 32 MiB is mmapped and given back to the kernel on free, so the next step
    # faults its pages in again (808,000 faults in an official MoCo v3 step at depth 4, trainers/host.py)
    mapped, held = mallinfo("default")
    assert mapped >= MB100 and held < MB100, (mapped, held)
    # kept: the block comes from the heap and stays there once freed, its pages mapped for the next step
    mapped, held = mallinfo("kept")
    assert mapped < MB100 <= held, (mapped, held)


def test_a_cpu_trainer_keeps_freed_memory():
    x, y = torch.zeros(8, 3, 32, 32), torch.zeros(8, dtype=torch.long)
    cfg = TrainConfig(backbone="vit_test_patch4_32", batch_size=8, mlp_dim=32, dim=16, epochs=1)
    keep_freed_memory.cache_clear()
    Trainer(cfg, "cpu", loaders=Loaders([(x, x, y)], [], [], 10), callbacks=[])
    assert keep_freed_memory.cache_info().currsize == 1  # called once in this process, by the Trainer
