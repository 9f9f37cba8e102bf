"""What a GPU run needs and a CPU run hides, checked in one process on one device (bench/gpu.sh runs it).

    python bench/gpu_checks.py                # on a GPU: bf16 step, NCCL group, global BatchNorm, resume,
                                              # uint8 normalised and colour ops on the device
    python bench/gpu_checks.py --device cpu   # the same checks on CPU with gloo (to try the script anywhere)

Needs only torch and timm (and pyarrow): neither Ray nor FFCV. Each check prints one line, and the script exits 1
at the first that fails.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

import trainers  # noqa: F401  (compat shim before timm)
from trainers.config import TrainConfig
from trainers.sync_batchnorm import GlobalBatchNorm, convert_sync_batchnorm
from trainers.trainer import Loaders, Trainer


def synthetic(device: torch.device, batch: int = 8, img: int = 32) -> Loaders:
    x1, x2 = (torch.randn(batch, 3, img, img, device=device) for _ in range(2))
    labels = torch.randint(0, 10, (batch,), device=device)
    return Loaders([(x1, x2, labels)] * 4, [(x1, labels)], [(x2, labels)], 10)


def bf16_step(device: torch.device) -> str:
    """A training step under bf16 autocast: finite loss, fp32 master weights and gradients, fp32 logits."""
    cfg = TrainConfig(backbone="vit_test_patch4_32", batch_size=8, mlp_dim=64, dim=32, epochs=1, precision="bf16")
    trainer = Trainer(cfg, device, loaders=synthetic(device), callbacks=[])
    x1, x2, y = trainer.loaders.train[0]
    state = trainer.train_step(0, x1, x2, y)
    assert math.isfinite(state.loss.item()) and state.loss.dtype == torch.float32, state.loss
    assert all(p.dtype == torch.float32 for p in trainer.net.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in trainer.net.parameters())
    metrics = trainer.evaluate()
    assert 0 <= metrics["knn_top1"] <= 1
    return f"loss {state.loss.item():.4f} (fp32 under bf16 autocast), kNN {metrics['knn_top1']:.2f}"


def process_group(device: torch.device) -> str:
    """A one-process NCCL (gloo on CPU) group: the collectives the methods and the global BatchNorm use."""
    from trainers.distributed import broadcast_object, concat_all_gather

    x = torch.arange(6.0, device=device).reshape(3, 2)
    assert torch.equal(concat_all_gather(x), x)
    assert broadcast_object(("unstable", "why"), device) == ("unstable", "why")
    return f"{dist.get_backend()} world {dist.get_world_size()}: all_gather, broadcast_object"


def global_batchnorm(device: torch.device) -> str:
    """Every BatchNorm becomes GlobalBatchNorm (no host sync), equal to BatchNorm on one rank, in the group."""
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.BatchNorm1d(16)).to(device)
    converted = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.BatchNorm1d(16))
                                       .to(device), device)
    converted.load_state_dict(reference.state_dict())
    assert isinstance(converted[1], GlobalBatchNorm)
    x = torch.randn(32, 16, device=device)
    torch.testing.assert_close(converted(x), reference(x))
    return "BatchNorm -> GlobalBatchNorm, same output as BatchNorm on one rank"


def resume(device: torch.device) -> str:
    """A checkpoint saved on the device restores there: RNG state on the CPU, optimiser state on the device."""
    cfg = TrainConfig(backbone="vit_test_patch4_32", batch_size=8, mlp_dim=64, dim=32, epochs=2)
    trainer = Trainer(cfg, device, loaders=synthetic(device), callbacks=[])
    next(trainer.epochs())
    with tempfile.TemporaryDirectory() as tmp:
        trainer.save(Path(tmp))
        again = Trainer(cfg, device, loaders=synthetic(device), callbacks=[])
        again.load(Path(tmp))
    step = next(iter(again.optimizer.state.values()))["step"]
    assert step.device.type == "cpu", step.device  # AdamW keeps its step counters on the CPU: no sync per param
    assert again.epoch == 1
    return "saved and restored on the device (map_location cpu)"


def device_normalize(device: torch.device) -> str:
    """uint8 images normalised on the device: the bits of the loader's host table (data/normalize.py)."""
    from data.normalize import DeviceNormalize, normalize_table

    mean, std = (72.9, 80.1, 91.7), (55.2, 60.3, 66.8)
    images = torch.randint(0, 256, (4, 2, 16, 16, 3), dtype=torch.uint8)  # [B, V, H, W, 3], as the loader
    got = DeviceNormalize(mean, std, device)(images.to(device)[:, 1])
    want = torch.from_numpy(normalize_table(mean, std))[images[:, 1].long(), torch.arange(3)].permute(0, 3, 1, 2)
    assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == torch.float32
    assert torch.equal(got.cpu(), want), (got.cpu() - want).abs().max()
    return "uint8 view to the device, normalised there: the host table's bits, channels_last"


def device_colour_ops(device: torch.device) -> str:
    """The colour ops the loader leaves to the GPU (data/device_augment.py) give the CPU's bits there."""
    from data import device_augment as D
    from data.recipes import MOCO_V3_VIEWS, SIMCLR_VIEW

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 48, 40, 3), dtype=torch.uint8, generator=g)
    for recipe in (*MOCO_V3_VIEWS, SIMCLR_VIEW):
        params = torch.zeros(16, D.params_width(recipe), dtype=torch.float64)
        params[:, [D.COL_JITTER, D.COL_GRAY, D.COL_BLUR, D.COL_SOLARIZE]] = (
            torch.rand(16, 4, generator=g, dtype=torch.float64) < 0.6).double()
        params[:, D.COL_ORDER] = torch.stack([torch.randperm(4, generator=g) for _ in range(16)]).double()
        params[:, D.COL_FACTORS] = torch.rand(16, 4, generator=g, dtype=torch.float64) * 0.8 + 0.6
        params[:, D.COL_FACTORS.stop - 1] -= 1.0  # hue factor in [-0.4, 0.4]
        weights = torch.rand(16, params.shape[1] - D.COL_WEIGHTS, generator=g)
        params[:, D.COL_WEIGHTS:] = (weights / weights.sum(1, keepdim=True)).double()
        want = D.apply_view(images, params, recipe)
        got = D.apply_view(images.to(device), params, recipe)
        assert torch.equal(got.cpu(), want), (got.cpu().int() - want.int()).abs().max()
    return "jitter, grayscale, blur, solarize on uint8: the CPU's bits (MoCo v3 views 1 and 2, SimCLR)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    device = torch.device(p.parse_args().device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu to try the checks on CPU")
        return 2
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}")
    failed = 0
    for check in (bf16_step, process_group, global_batchnorm, resume, device_normalize, device_colour_ops):
        try:
            print(f"  ok   {check.__name__}: {check(device)}", flush=True)
        except Exception as e:  # report every check, then fail
            failed += 1
            print(f"  FAIL {check.__name__}: {type(e).__name__}: {e}", flush=True)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
