"""Training-step throughput per method: images/s, step time and (on GPU) model FLOPs utilisation.

One process, synthetic batches already on the device (the data pipeline is benchmarked in bench/loader.py),
the same step as trainers/loop.py: forward of both views, backward, optimiser step, momentum update.

    .venv/bin/python bench/trainer.py                      # CPU config: ViT nano, patch 4, 32 px, batch 64
    .venv/bin/python bench/trainer.py --gpu-config          # ViT-S/16 at 224 px, bf16, with/without compile
    .venv/bin/python bench/trainer.py --signals --methods moco_v3   # cost of the instability signals per step

The baseline of each row is MoCo v3 in the same configuration, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import trainers  # noqa: F401  (compat shim before timm)
from trainers.backbones import create_backbone
from trainers.loop import StepState
from trainers.methods import METHODS, build_method
from trainers.optim import create_optimizer
from trainers.signals import InstabilityMonitor

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM


def peak_tflops() -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def measure(method: str, backbone: str, img: int, batch: int, steps: int, device: torch.device,
            dtype: torch.dtype | None, compile: bool, mlp_dim: int, signals: bool = False) -> dict:
    torch.manual_seed(0)
    model = build_method(method, create_backbone(backbone), dim=256, mlp_dim=mlp_dim, temperature=0.2).to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer(model, "adamw", lr=1e-4, weight_decay=0.1)
    step_fn = torch.compile(model) if compile else model
    x1, x2 = (torch.randn(batch, 3, img, img, device=device).contiguous(memory_format=torch.channels_last)
              for _ in range(2))
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    # The trainer's per-step signals hook (every step: gradient norms per layer group, loss, collapse std)
    monitor = InstabilityMonitor() if signals else None
    steps_done = iter(range(10**9))

    def step(fn=step_fn) -> None:
        with autocast:
            loss, features = fn(x1, x2, 0.99)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if monitor is not None:
            monitor(StepState(0, next(steps_done), loss.detach(), features, None, model, 1e-4, 0.99))
        optimizer.step()

    with FlopCounterMode(display=False) as counter:  # counted eagerly: compiled kernels are not seen
        step(model)
    for _ in range(3):  # warm-up (and compilation)
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    step_time = (time.perf_counter() - tic) / steps
    tflops = counter.get_total_flops() / step_time / 1e12
    peak = peak_tflops()
    return {"method": method + ("+signals" if signals else ""), "compile": compile, "step_s": step_time,
            "images_per_s": batch / step_time,
            "tflops": tflops, "mfu": tflops / peak if peak and dtype is not None else float("nan")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu-config", action="store_true", help="ViT-S/16, 224 px, bf16 (needs CUDA)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--signals", action="store_true", help="also each method with the instability signals hook")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count())  # importing FFCV (through trainers.loop) sets it to 1
    if args.gpu_config:
        device, dtype = torch.device("cuda"), torch.bfloat16
        backbone, img, batch, steps, mlp_dim, compiles = "vit_small_patch16_224", 224, args.batch or 128, \
            args.steps or 20, 4096, (False, True)
    else:
        device, dtype = torch.device("cpu"), None
        backbone, img, batch, steps, mlp_dim, compiles = "vit_nano_patch4_32", 32, args.batch or 64, \
            args.steps or 10, 1024, (False,)
    print(f"{backbone} {img}px batch {batch} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}"
          f" ({torch.get_num_threads()} threads), {steps} timed steps, {dtype or 'fp32'}")
    rows = [measure(m, backbone, img, batch, steps, device, dtype, c, mlp_dim, signals=sig)
            for c in compiles for m in args.methods for sig in ((False, True) if args.signals else (False,))]
    base = {r["compile"]: r["images_per_s"] for r in rows if r["method"] == "moco_v3"}
    print(f"{'method':>16} {'compile':>7} {'step s':>8} {'img/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'vs moco_v3':>10}")
    for r in rows:
        ratio = r["images_per_s"] / base[r["compile"]] if r["compile"] in base else float("nan")
        print(f"{r['method']:>16} {r['compile']!s:>7} {r['step_s']:8.3f} {r['images_per_s']:9.1f} "
              f"{r['tflops']:8.2f} {r['mfu']:6.1%} {ratio:10.2f}")


if __name__ == "__main__":
    main()
