"""GlobalBatchNorm on 2 gloo processes equals one BatchNorm over the concatenated batch."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from trainers.sync_batchnorm import GlobalBatchNorm, convert_sync_batchnorm

WORLD, N, C = 2, 6, 5


def batch() -> torch.Tensor:
    return torch.randn(WORLD * N, C, generator=torch.Generator().manual_seed(0)) * 3 + 1


def reference():
    bn = nn.BatchNorm1d(C)
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    x = batch().requires_grad_()
    y = bn(x)
    (y * torch.arange(C)).sum().backward()
    return bn, x, y


def _worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    ref_bn, _, _ = reference()
    torch.manual_seed(0)
    bn = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(C)), torch.device("cpu"))[0]
    bn.load_state_dict(nn.BatchNorm1d(C).state_dict())
    with torch.no_grad():
        bn.weight.copy_(ref_bn.weight)
    x = batch()[rank * N: (rank + 1) * N].requires_grad_()
    y = bn(x)
    (y * torch.arange(C)).sum().backward()
    torch.save({"y": y.detach(), "grad": x.grad, "mean": bn.running_mean, "var": bn.running_var,
                "wgrad": bn.weight.grad, "type": type(bn).__name__}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_two_workers_match_one_batchnorm(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    torch.manual_seed(0)
    bn, x, y = reference()
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    assert all(p["type"] == "GlobalBatchNorm" for p in parts)
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([p["grad"] for p in parts]), x.grad, rtol=1e-4, atol=1e-5)
    for p in parts:
        torch.testing.assert_close(p["mean"], bn.running_mean)
        torch.testing.assert_close(p["var"], bn.running_var)
    # Each rank's weight gradient is its own share; DDP's average times WORLD gives the full-batch one.
    torch.testing.assert_close(sum(p["wgrad"] for p in parts), bn.weight.grad, rtol=1e-4, atol=1e-5)


def test_single_process_and_eval_are_plain_batchnorm():
    torch.manual_seed(0)
    ref = nn.BatchNorm1d(C)
    ours = GlobalBatchNorm(C)
    x = batch()
    torch.testing.assert_close(ours(x), ref(x))
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))
    # Every device gets ours (no host sync per call), PyTorch's SyncBatchNorm included.
    assert type(convert_sync_batchnorm(nn.SyncBatchNorm(C), torch.device("cpu"))) is GlobalBatchNorm


def test_conversion_keeps_frozen_parameters_frozen():
    frozen = nn.Sequential(nn.Linear(C, C), nn.BatchNorm1d(C)).requires_grad_(False)
    converted = convert_sync_batchnorm(frozen, torch.device("cpu"))
    assert isinstance(converted[1], GlobalBatchNorm)
    assert not any(p.requires_grad for p in converted.parameters())
