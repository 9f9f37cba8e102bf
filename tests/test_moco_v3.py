"""Heads, the contrastive loss (one process and two gloo processes), collectives and the MoCo v3 module."""

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import trainers  # noqa: F401  (compat shim before timm)
from trainers import distributed
from trainers.backbones import create_backbone
from trainers.heads import mlp
from trainers.losses import CtrLoss
from trainers.methods import MoCoV3

WORLD = 2
N, C = 8, 16  # global batch, feature dim of the distributed test


def test_mlp_structure():
    head = mlp(3, 8, 16, 4)
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear, nn.BatchNorm1d]
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 16), (16, 16), (16, 4)]
    assert all(m.bias is None for m in linears)
    assert all(m.affine for m in head[:-1] if isinstance(m, nn.BatchNorm1d))
    assert head[-1].num_features == 4 and not head[-1].affine
    no_last = mlp(2, 4, 8, 4, last_bn=False)
    assert [type(m) for m in no_last] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head(torch.randn(5, 8)).shape == (5, 4)


def ctr_reference(q: torch.Tensor, k: torch.Tensor, t: float) -> torch.Tensor:
    """Eq. (1) written per row: -log softmax of the positive (the diagonal), averaged, times 2T."""
    q = q / q.norm(dim=1, keepdim=True)
    k = k / k.norm(dim=1, keepdim=True)
    losses = []
    for i in range(q.shape[0]):
        sims = torch.stack([q[i].dot(k[j]) for j in range(k.shape[0])]) / t
        losses.append(-(sims[i] - torch.logsumexp(sims, dim=0)))
    return torch.stack(losses).mean() * 2 * t


def test_ctr_matches_reference():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    for t in (0.2, 1.0):
        torch.testing.assert_close(CtrLoss(t)(q, k), ctr_reference(q, k, t))


def test_ctr_identical_keys_tiny_temperature_is_near_zero():
    q = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    assert CtrLoss(0.01)(q, q.clone()).item() < 1e-6
    assert CtrLoss(0.2)(q, q.clone()).item() > 1e-3  # not trivially zero at the usual T


def test_ctr_gives_no_gradient_to_keys():
    q = torch.randn(4, 8, requires_grad=True)
    k = torch.randn(4, 8, requires_grad=True)
    CtrLoss()(q, k).backward()
    assert q.grad is not None and k.grad is None


def _global_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(N, C, generator=g), torch.randn(N, C, generator=g)
    return q, k, torch.randn(WORLD, N, 3, generator=g)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        q, k, w = _global_tensors()
        n = N // WORLD
        local = slice(rank * n, (rank + 1) * n)
        q_local = q[local].clone().requires_grad_(True)
        loss = CtrLoss(0.2)(q_local, k[local])
        loss.backward()

        # all_gather_with_grad: each rank's loss weighs the whole gathered tensor with its own w[rank].
        x = torch.arange(N * 3, dtype=torch.float32).reshape(N, 3)
        x_local = x[local].clone().requires_grad_(True)
        gathered = distributed.all_gather_with_grad(x_local)
        (gathered * w[rank]).sum().backward()

        torch.save(
            {
                "rank": distributed.rank(), "world": distributed.world_size(), "loss": loss.detach(),
                "grad_q": q_local.grad, "gathered_k": distributed.concat_all_gather(k[local]),
                "gathered_x": gathered.detach(), "grad_x": x_local.grad,
            },
            f"{out_dir}/{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_ctr_two_processes_match_one(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    q, k, w = _global_tensors()
    q_full = q.clone().requires_grad_(True)
    full = CtrLoss(0.2)(q_full, k)
    full.backward()

    n = N // WORLD
    assert [(r["rank"], r["world"]) for r in res] == [(0, 2), (1, 2)]
    # Each rank averages over its own rows, so the mean over ranks is the mean over the global batch.
    torch.testing.assert_close(torch.stack([r["loss"] for r in res]).mean(), full.detach())
    for r, out in enumerate(res):
        torch.testing.assert_close(out["gathered_k"], k)
        # Rank r's loss is (1/n) sum over its rows, the full loss (1/N) sum over all rows, so d(rank loss)/dq
        # is WORLD times the matching slice of the full gradient. DDP averages parameter gradients over ranks,
        # which divides by WORLD again: the trained parameters see exactly the one-process gradient.
        torch.testing.assert_close(out["grad_q"], WORLD * q_full.grad[r * n:(r + 1) * n])
        x = torch.arange(N * 3, dtype=torch.float32).reshape(N, 3)
        torch.testing.assert_close(out["gathered_x"], x)
        # The gradient reaching rank r's slice is the sum over every rank's loss of its weights on that slice.
        torch.testing.assert_close(out["grad_x"], w.sum(dim=0)[r * n:(r + 1) * n])


def test_collectives_on_one_process():
    t = torch.randn(3, 2, requires_grad=True)
    assert distributed.rank() == 0 and distributed.world_size() == 1
    gathered = distributed.concat_all_gather(t)
    assert torch.equal(gathered, t) and not gathered.requires_grad
    assert distributed.all_gather_with_grad(t) is t


def tiny_moco(seed: int = 0) -> MoCoV3:
    torch.manual_seed(seed)
    return MoCoV3(create_backbone("vit_test_patch4_32"), dim=32, mlp_dim=64)


def views(b: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 3, 32, 32, generator=g), torch.randn(b, 3, 32, 32, generator=g)


def pairs(model: MoCoV3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    base = [*model.backbone.parameters(), *model.projector.parameters()]
    momentum = [*model.momentum_backbone.parameters(), *model.momentum_projector.parameters()]
    assert len(base) == len(momentum)
    return list(zip(base, momentum, strict=True))


@torch.no_grad()
def perturb(module: nn.Module) -> None:
    """Move the trainable parameters, as an optimiser step would (frozen ones stay equal to their twins)."""
    for p in module.parameters():
        if p.requires_grad:
            p.add_(torch.randn_like(p) * 0.01)


def test_structure_and_initial_momentum_copy():
    model = tiny_moco()
    assert model.projector[0].in_features == 64 and model.projector[-2].out_features == 32
    assert model.predictor[0].in_features == 32 and model.predictor[-2].out_features == 32
    assert len([m for m in model.projector if isinstance(m, nn.Linear)]) == 3
    assert len([m for m in model.predictor if isinstance(m, nn.Linear)]) == 2
    for p, pm in pairs(model):
        assert torch.equal(p, pm) and p is not pm and not pm.requires_grad
    assert model.criterion.temperature == 0.2


def test_forward_backward():
    model = tiny_moco()
    x1, x2 = views()
    loss, feats = model(x1, x2, 0.99)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert 0 < loss.item() < 2 * 2 * 0.2 * math.log(64)  # two terms, each at most ~2T log(N) at init-ish
    assert feats.shape == (8, 64) and not feats.requires_grad
    torch.testing.assert_close(feats, model.backbone(x1))  # class tokens of view 1, no BN in the backbone
    loss.backward()
    for name, p in [*model.backbone.named_parameters(), *model.projector.named_parameters(),
                    *model.predictor.named_parameters()]:
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad is None for p in [*model.momentum_backbone.parameters(),
                                        *model.momentum_projector.parameters()])


def test_update_momentum_extremes():
    model = tiny_moco()
    perturb(model.backbone)
    perturb(model.projector)
    before = [pm.clone() for _, pm in pairs(model)]
    model.update_momentum(1.0)
    assert all(torch.equal(pm, b) for (_, pm), b in zip(pairs(model), before, strict=True))
    model.update_momentum(0.0)
    assert all(torch.equal(pm, p) for p, pm in pairs(model))


def test_update_momentum_interpolates():
    model = tiny_moco()
    perturb(model.backbone)
    expected = [0.9 * pm + 0.1 * p for p, pm in pairs(model)]
    model.update_momentum(0.9)
    for (_, pm), e in zip(pairs(model), expected, strict=True):
        torch.testing.assert_close(pm, e)


def _loss_with_momentum_as_is(model: MoCoV3, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    q1 = model.predictor(model.projector(model.backbone(x1)))
    q2 = model.predictor(model.projector(model.backbone(x2)))
    k1 = model.momentum_projector(model.momentum_backbone(x1))
    k2 = model.momentum_projector(model.momentum_backbone(x2))
    return model.criterion(q1, k2) + model.criterion(q2, k1)


def test_forward_updates_momentum_before_keys():
    model = tiny_moco()
    perturb(model.backbone)
    perturb(model.projector)
    x1, x2 = views()
    stale = copy.deepcopy(model)
    updated = copy.deepcopy(model)
    updated.update_momentum(0.5)

    loss, _ = model(x1, x2, 0.5)
    for (_, pm), (_, pu) in zip(pairs(model), pairs(updated), strict=True):
        torch.testing.assert_close(pm, pu)
    torch.testing.assert_close(loss, _loss_with_momentum_as_is(updated, x1, x2))
    assert not torch.allclose(loss, _loss_with_momentum_as_is(stale, x1, x2))


@pytest.mark.parametrize("frozen", [True, False])
def test_stop_grad_conv1_in_moco(frozen):
    torch.manual_seed(0)
    model = MoCoV3(create_backbone("vit_test_patch4_32", stop_grad_conv1=frozen), dim=32, mlp_dim=64)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ids = {id(p) for p in trainable}
    assert (id(model.backbone.patch_embed.proj.weight) in ids) is not frozen
    assert not any(id(p) in ids for p in model.momentum_backbone.parameters())
    w0 = model.backbone.patch_embed.proj.weight.detach().clone()
    opt = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.1)
    x1, x2 = views()
    model(x1, x2, 0.99)[0].backward()
    opt.step()
    assert torch.equal(model.backbone.patch_embed.proj.weight, w0) is frozen
    for m in (0.99, 0.5, 0.99):
        model.update_momentum(m)
    # Frozen tensors are equal on both branches and stay bit-equal (the EMA skips them: no rounding drift).
    assert torch.equal(model.momentum_backbone.patch_embed.proj.weight, w0) is frozen
    assert torch.equal(model.momentum_backbone.pos_embed, model.backbone.pos_embed)


def test_contrastive_logits_are_fp32_under_bf16_autocast():
    from trainers.losses import NTXentLoss

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = [CtrLoss(0.2)(q.bfloat16(), k.bfloat16()), NTXentLoss(0.2)(q.bfloat16(), k.bfloat16())]
    exact = [CtrLoss(0.2)(q.bfloat16().float(), k.bfloat16().float()),
             NTXentLoss(0.2)(q.bfloat16().float(), k.bfloat16().float())]
    for loss, ref in zip(losses, exact, strict=True):
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, ref)  # the same as fp32 on the same (bf16) inputs
