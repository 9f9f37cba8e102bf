"""Both views through a LayerNorm ViT as one batch: loss and every gradient equal the per-view path (to fp32
rounding), for MoCo v3, BYOL and SimCLR, in one process and in two; backbones with BatchNorm keep per-view."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import trainers  # noqa: F401  (compat shim before timm)
from trainers.backbones import create_backbone
from trainers.methods import METHODS, build_method
from trainers.sync_batchnorm import convert_sync_batchnorm

WORLD, BATCH = 2, 8


def model(method: str, fused: bool, backbone: str = "vit_test_patch4_32", **options) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_method(method, create_backbone(backbone, **options), dim=16, mlp_dim=32, temperature=0.2)
    net.fuse_views = fused
    return net


def views(rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x1, x2 = torch.randn(BATCH, 3, 32, 32, generator=g), torch.randn(BATCH, 3, 32, 32, generator=g)
    n = BATCH // world
    return x1[rank * n:(rank + 1) * n], x2[rank * n:(rank + 1) * n]


def step(net: torch.nn.Module, x1, x2) -> dict[str, torch.Tensor]:
    """Loss, features and every gradient of one training step (two steps: the momentum encoder moves too)."""
    for m in (0.9, 0.99):
        net.zero_grad(set_to_none=True)
        loss, features = net(x1, x2, m)
        loss.backward()
    grads = {f"grad.{k}": p.grad for k, p in net.named_parameters() if p.grad is not None}
    buffers = {f"buffer.{k}": b for k, b in net.named_buffers()}  # BN running statistics of the heads
    return {"loss": loss.detach(), "features": features, **grads, **buffers}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)  # gradients ~0.1-1: rounding is ~1e-6


@pytest.mark.parametrize("method", METHODS)
def test_fused_views_equal_per_view_views_in_one_process(method):
    auto = model(method, fused=True)
    assert build_method(method, create_backbone("vit_test_patch4_32"), dim=16, mlp_dim=32,
                        temperature=0.2).fuse_views  # on by default for a LayerNorm ViT
    assert_same(step(auto, *views()), step(model(method, fused=False), *views()))


@pytest.mark.parametrize(("backbone", "options"), [("vit_test_patch4_32", {"mlp_norm": "bn"}), ("resnet50", {})])
def test_backbones_with_batchnorm_keep_per_view_statistics(backbone, options):
    net = build_method("moco_v3", create_backbone(backbone, **options), dim=16, mlp_dim=32, temperature=0.2)
    assert not net.fuse_views


def _worker(rank: int, init_file: str, out_dir: str, method: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        out = {}
        for fused in (True, False):
            net = convert_sync_batchnorm(model(method, fused), torch.device("cpu"))
            ddp = torch.nn.parallel.DistributedDataParallel(net)
            result = step(ddp, *views(rank, WORLD))
            out[fused] = {k.replace("module.", ""): v for k, v in result.items()}
        torch.save(out, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", METHODS)
def test_fused_views_equal_per_view_views_in_two_processes(tmp_path, method):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), method), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        out = torch.load(tmp_path / f"{rank}.pt")
        assert_same(out[True], out[False])
