"""trainers/host.py: freed memory stays in a CPU training process, so a step does not fault its pages in again."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from trainers.config import TrainConfig
from trainers.host import keep_freed_memory
from trainers.trainer import Loaders, Trainer

# A fresh process runs five "steps" after three of warm-up: a forward keeps eight 8 MB activations for its
# backward, then frees them all, as a training step does, and prints the minor page faults per step.
FAULTS = """
import resource, sys, torch
from trainers.host import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
w = torch.randn(768, 192)
def step():
    x, saved = torch.randn(2730, 192), []
    for _ in range(8):
        h = (x @ w.t()).relu()
        saved.append(h)
        x = h @ w
    del saved
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


def page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_kept_memory_is_reused_without_page_faults():
    default, kept = page_faults("default"), page_faults("kept")
    # glibc by default gives blocks back and faults them in again: 2,035-18,769 4-KiB pages per step measured
    # (its mmap threshold adapts to what was freed before); kept: 0
    assert default > 1000 and kept < default / 20, (default, kept)


def test_a_cpu_trainer_keeps_freed_memory():
    x, y = torch.zeros(8, 3, 32, 32), torch.zeros(8, dtype=torch.long)
    cfg = TrainConfig(backbone="vit_test_patch4_32", batch_size=8, mlp_dim=32, dim=16, epochs=1)
    keep_freed_memory.cache_clear()
    Trainer(cfg, "cpu", loaders=Loaders([(x, x, y)], [], [], 10), callbacks=[])
    assert keep_freed_memory.cache_info().currsize == 1  # called once in this process, by the Trainer
