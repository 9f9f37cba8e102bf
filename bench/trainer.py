"""Training-step throughput per method: images/s, step time and (on GPU) model FLOPs utilisation.

One process, synthetic batches already on the device (the data pipeline is benchmarked in bench/loader.py),
timing the trainer's own step (``trainers.trainer.Trainer.train_step``: schedules, forward of both views,
backward, callbacks, optimiser step, momentum update). Imports neither Ray nor FFCV.

    .venv/bin/python bench/trainer.py                      # CPU config: ViT nano, patch 4, 32 px, batch 64
    .venv/bin/python bench/trainer.py --gpu-config          # ViT-S/16 at 224 px, bf16, with/without compile
    .venv/bin/python bench/trainer.py --signals --methods moco_v3   # cost of the instability signals per step
    .venv/bin/python bench/trainer.py --official ../moco-v3         # ours against the official MoCo v3 step
    .venv/bin/python bench/trainer.py --official ../moco-v3 --compile   # ... and ours under torch.compile too

The baseline of each row is MoCo v3 in the same configuration, measured in the same run. ``--official DIR``
times the official facebookresearch/moco-v3 step (a checkout you point at; a scratch copy gets the two small
patches timm 1.x and a CPU need, nothing of it enters this project) beside ours on the same architecture and
batch (ViT img 32 / patch 4 / dim 192 / 3 heads, heads' hidden 4096, frozen patch projection, AdamW, fp32), in
interleaved rounds, at depth 4 / batch 256 and depth 12 / batch 64.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import trainers  # noqa: F401  (compat shim before timm)
from trainers.backbones import create_backbone
from trainers.callbacks import Signals
from trainers.config import TrainConfig
from trainers.host import keep_freed_memory
from trainers.methods import METHODS, build_method
from trainers.signals import InstabilityMonitor
from trainers.trainer import Loaders, Trainer

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM


def peak_tflops() -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def measure(method: str, backbone: str, img: int, batch: int, steps: int, device: torch.device,
            precision: str, compile: bool, mlp_dim: int, signals: bool = False) -> dict:
    x1, x2 = (torch.randn(batch, 3, img, img, device=device) for _ in range(2))
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    warmup = 3  # steps (and compilation) before timing
    loaders = Loaders(train=[(x1, x2, labels)] * (1 + warmup + steps), bank=[], test=[], num_classes=10)
    cfg = TrainConfig(method=method, backbone=backbone, batch_size=batch, mlp_dim=mlp_dim, precision=precision,
                      compile=compile, epochs=1, warmup_epochs=0.0, base_lr=1e-4)
    # The trainer's per-step signals (every step: gradient norms per layer group, loss, collapse std)
    callbacks = [Signals(InstabilityMonitor(), halt_on_nonfinite=False)] if signals else []
    trainer = Trainer(cfg, device, loaders=loaders, callbacks=callbacks)
    eager = trainer.model
    trainer.model = trainer.net
    with FlopCounterMode(display=False) as counter:  # counted eagerly: compiled kernels are not seen
        trainer.train_step(0, x1, x2, labels)
    trainer.model = eager
    for step in range(1, 1 + warmup):
        trainer.train_step(step, x1, x2, labels)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    tic = time.perf_counter()
    for step in range(1 + warmup, 1 + warmup + steps):
        trainer.train_step(step, x1, x2, labels)
    sync()
    step_time = (time.perf_counter() - tic) / steps
    tflops = counter.get_total_flops() / step_time / 1e12
    peak = peak_tflops()
    return {"method": method + ("+signals" if signals else ""), "compile": compile, "step_s": step_time,
            "images_per_s": batch / step_time,
            "tflops": tflops, "mfu": tflops / peak if peak and precision != "fp32" else float("nan")}


# The only changes the official code needs here: timm 1.x moved its layers and renamed num_tokens, and the
# labels go to the logits' device instead of .cuda().
OFFICIAL_PATCHES = {
    "vits.py": [("from timm.models.layers.helpers import to_2tuple", "from timm.layers import to_2tuple"),
                ("from timm.models.layers import PatchEmbed", "from timm.layers import PatchEmbed"),
                ("self.num_tokens == 1", "self.num_prefix_tokens == 1")],
    "moco/builder.py": [(").cuda()", ").to(logits.device)")],
    "moco/__init__.py": [],
}


def load_official(checkout: Path):
    """The official ``vits`` and ``moco.builder`` modules, imported from a patched scratch copy of ``checkout``."""
    scratch = Path(tempfile.mkdtemp(prefix="moco-v3-"))
    for rel, patches in OFFICIAL_PATCHES.items():
        text = (checkout / rel).read_text()
        for old, new in patches:
            if old not in text:
                raise SystemExit(f"{checkout / rel}: expected {old!r}; is this a facebookresearch/moco-v3 checkout?")
            text = text.replace(old, new)
        (scratch / rel).parent.mkdir(parents=True, exist_ok=True)
        (scratch / rel).write_text(text)
    sys.path.insert(0, str(scratch))
    import moco.builder
    import vits

    return vits, moco.builder


CONTESTANTS = ("official", "official, memory kept", "ours", "ours compiled")


def contestant(name: str, checkout: Path, depth: int, batch: int):
    """``(step(i), trainable parameter count)`` of one contestant, built in the calling process."""
    arch = dict(img_size=32, patch_size=4, embed_dim=192, depth=depth, num_heads=3)
    x1, x2 = torch.randn(batch, 3, 32, 32), torch.randn(batch, 3, 32, 32)
    labels = torch.zeros(batch, dtype=torch.long)
    torch.manual_seed(0)
    if name.startswith("official"):
        if name == "official, memory kept":
            keep_freed_memory()  # what our Trainer does on CPU, given to the official step too
        vits, builder = load_official(checkout)
        model = builder.MoCo_ViT(partial(vits.VisionTransformerMoCo, **arch, mlp_ratio=4, qkv_bias=True,
                                         norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), stop_grad_conv1=True),
                                 dim=256, mlp_dim=4096, T=0.2)
        opt = torch.optim.AdamW(model.parameters(), 1e-4, weight_decay=0.1)  # main_moco.py for ViTs

        def step(i: int) -> None:  # main_moco.py's train() step, fp32 (its GradScaler is then a no-op)
            for group in opt.param_groups:
                group["lr"] = 1e-4
            loss = model(x1, x2, 0.99)
            opt.zero_grad()
            loss.backward()
            opt.step()
    else:
        cfg = TrainConfig(backbone="vit_tiny_patch4_32", batch_size=batch, mlp_dim=4096, dim=256, temperature=0.2,
                          stop_grad_conv1=True, epochs=1, warmup_epochs=0.0, precision="fp32",
                          compile=name == "ours compiled")
        trainer = Trainer(cfg, loaders=Loaders([(x1, x2, labels)] * 10**6, [], [], 10), callbacks=[],
                          model=build_method("moco_v3", create_backbone(cfg.backbone, depth=depth,
                                                                         stop_grad_conv1=True),
                                             dim=256, mlp_dim=4096, temperature=0.2))
        model = trainer.net
        def step(i: int) -> None:
            trainer.train_step(i, x1, x2, labels)
    return step, sum(p.numel() for p in model.parameters() if p.requires_grad)


def serve_contestant(conn, name: str, checkout: Path, depth: int, batch: int) -> None:
    """A contestant's own process: build, warm up, then time ``n`` steps per request until told to stop."""
    import torch.distributed as dist

    torch.set_num_threads(os.cpu_count())
    # The official loss all-gathers its keys: a one-process gloo group, as a 1-GPU run of it has.
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    step, n_params = contestant(name, checkout, depth, batch)
    for i in range(2):  # warm-up: allocator, first-call costs, compilation
        step(i)
    conn.send(n_params)
    while (n := conn.recv()) is not None:
        tic = time.perf_counter()
        for i in range(n):
            step(i)
        conn.send(batch * n / (time.perf_counter() - tic))


def receive(name: str, conn):
    try:
        return conn.recv()
    except EOFError:
        raise SystemExit(f"the process of contestant {name!r} died; its error is above") from None


def official_vs_ours(checkout: Path, depth: int, batch: int, rounds: int, steps: int, names: list[str]) -> dict:
    """Median images/s of each contestant, same architecture and batch, each in its own process, in rounds
    interleaved across them (their order reversed every other round) while the others wait.

    Own processes, because the allocator is per process: in one process, once ours had raised glibc's thresholds
    (trainers/host.py) the official step ran at 1.5x at depth 4, and ours 15% slower after each official step
    (135 -> 116 img/s: its 51 MB blocks reshuffle the heap ours reuses); a user running either one sees neither.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    conns, procs = {}, []
    for name in names:
        parent, child = ctx.Pipe()
        procs.append(ctx.Process(target=serve_contestant, args=(child, name, checkout, depth, batch), daemon=True))
        procs[-1].start()
        conns[name] = parent
    try:
        n_params = {name: receive(name, conn) for name, conn in conns.items()}
        if len(set(n_params.values())) > 1:  # the same model on every side, or the ratio means nothing
            raise SystemExit(f"trainable parameters differ: {n_params}")
        rates: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            for name in names[:: 1 if r % 2 == 0 else -1]:
                conns[name].send(steps)
                rates[name].append(receive(name, conns[name]))
    finally:
        for conn in conns.values():
            with contextlib.suppress(OSError):  # that contestant's process died: its error is above
                conn.send(None)
        for proc in procs:
            proc.join(timeout=30)
    return {"depth": depth, "batch": batch, **{name: statistics.median(r) for name, r in rates.items()}}


def compare_official(checkout: Path, rounds: int, steps: int | None, compiled: bool) -> None:
    missing = [rel for rel in OFFICIAL_PATCHES if not (checkout / rel).is_file()]
    if missing:
        print(f"--official {checkout}: no {', '.join(missing)}; expected a facebookresearch/moco-v3 checkout "
              f"(git clone https://github.com/facebookresearch/moco-v3)", file=sys.stderr)
        raise SystemExit(2)
    names = [n for n in CONTESTANTS if compiled or n != "ours compiled"]
    print(f"official {checkout} vs ours on CPU ({os.cpu_count()} threads), fp32, median of {rounds} rounds "
          f"interleaved across one process per contestant; 'memory kept': glibc keeps freed pages "
          f"(trainers/host.py, which our Trainer sets on CPU)")
    cols = [("official", "official img/s"), ("official, memory kept", "kept img/s"), ("ours", "ours img/s"),
            ("ours compiled", "compiled img/s")][: len(names)]
    print(f"{'depth':>5} {'batch':>5} " + " ".join(f"{c:>15}" for _, c in cols)
          + f" {'ours/official':>14} {'ours/kept':>10}" + (f" {'compiled/kept':>14}" if compiled else ""))
    for depth, batch, n in ((4, 256, steps or 2), (12, 64, steps or 2)):
        r = official_vs_ours(checkout, depth, batch, rounds, n, names)
        kept = r["official, memory kept"]
        print(f"{depth:5d} {batch:5d} " + " ".join(f"{r[name]:15.1f}" for name, _ in cols)
              + f" {r['ours'] / r['official']:14.2f} {r['ours'] / kept:10.2f}"
              + (f" {r['ours compiled'] / kept:14.2f}" if compiled else ""), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu-config", action="store_true", help="ViT-S/16, 224 px, bf16 (needs CUDA)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--signals", action="store_true", help="also each method with the instability signals hook")
    p.add_argument("--backbones", nargs="+", default=None,
                   help="with --gpu-config: the backbones to time (default vit_small_patch16_224)")
    p.add_argument("--official", type=Path, metavar="DIR", help="a facebookresearch/moco-v3 checkout to compare with")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of --official")
    p.add_argument("--compile", action="store_true", help="with --official: also ours under torch.compile")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    if args.official:
        return compare_official(args.official, args.rounds, args.steps, args.compile)
    if args.gpu_config:
        device, precision = torch.device("cuda"), "bf16"
        backbones, img, batch, steps, mlp_dim, compiles = args.backbones or ["vit_small_patch16_224"], 224, \
            args.batch or 128, args.steps or 20, 4096, (False, True)
    else:
        device, precision = torch.device("cpu"), "fp32"
        backbones, img, batch, steps, mlp_dim, compiles = ["vit_nano_patch4_32"], 32, args.batch or 64, \
            args.steps or 10, 1024, (False,)
    for backbone in backbones:
        print(f"{backbone} {img}px batch {batch} on "
              f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'} ({torch.get_num_threads()} "
              f"threads), {steps} timed steps, {precision}")
        rows = [measure(m, backbone, img, batch, steps, device, precision, c, mlp_dim, signals=sig)
                for c in compiles for m in args.methods for sig in ((False, True) if args.signals else (False,))]
        base = {r["compile"]: r["images_per_s"] for r in rows if r["method"] == "moco_v3"}
        print(f"{'method':>16} {'compile':>7} {'step s':>8} {'img/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'vs moco_v3':>10}")
        for r in rows:
            ratio = r["images_per_s"] / base[r["compile"]] if r["compile"] in base else float("nan")
            print(f"{r['method']:>16} {r['compile']!s:>7} {r['step_s']:8.3f} {r['images_per_s']:9.1f} "
                  f"{r['tflops']:8.2f} {r['mfu']:6.1%} {ratio:10.2f}", flush=True)


if __name__ == "__main__":
    main()
