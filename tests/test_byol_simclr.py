"""BYOL and SimCLR: their losses (one process and two gloo processes), the methods, and the method registry."""

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import trainers  # noqa: F401  (compat shim before timm)
from trainers.losses import ByolLoss, NTXentLoss
from trainers.methods import BYOL, METHODS, MoCoV3, SimCLR, build_method

WORLD = 2
N, C = 8, 16  # global batch, feature dim of the distributed test


def vit() -> nn.Module:
    # Imported here, not at the top: the spawned gloo workers import this module and need no timm.
    from trainers.backbones import create_backbone

    return create_backbone("vit_test_patch4_32")  # num_features 64


class TinyConvNet(nn.Module):
    """A non-ViT backbone (no ``patch_embed``) with BN, standing in for a ResNet."""

    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def views(b: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 3, 32, 32, generator=g), torch.randn(b, 3, 32, 32, generator=g)


def linears(head: nn.Sequential) -> list[nn.Linear]:
    return [m for m in head if isinstance(m, nn.Linear)]


def has_last_bn(head: nn.Sequential) -> bool:
    return isinstance(head[-1], nn.BatchNorm1d)


@torch.no_grad()
def perturb(module: nn.Module) -> None:
    """Move the trainable parameters, as an optimiser step would."""
    for p in module.parameters():
        if p.requires_grad:
            p.add_(torch.randn_like(p) * 0.01)


# ---------------------------------------------------------------- BYOL loss


def test_byol_loss_hand_computed():
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    z = torch.tensor([[0.0, 2.0], [2.0, 2.0], [4.0, 3.0]])
    # cos = 0, 1, 24/25 -> 2 - 2cos = 2, 0, 2/25; mean over the batch.
    torch.testing.assert_close(ByolLoss()(p, z), torch.tensor((2 + 0 + 2 / 25) / 3))


def test_byol_loss_is_normalised_mse_and_extremes():
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    mse = ((p / p.norm(dim=1, keepdim=True) - z / z.norm(dim=1, keepdim=True)) ** 2).sum(dim=1).mean()
    torch.testing.assert_close(ByolLoss()(p, z), mse)  # eq. 2: ||p_bar - z_bar||^2 = 2 - 2 cos
    torch.testing.assert_close(ByolLoss()(3 * p, z), ByolLoss()(p, z))  # scale-free
    torch.testing.assert_close(ByolLoss()(p, p.clone()), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(ByolLoss()(p, -p), torch.tensor(4.0))


# ---------------------------------------------------------------- NT-Xent


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR eq. (1) on the classic 2N x 2N similarity matrix, views interleaved (2k, 2k + 1 = image k)."""
    n = z1.shape[0]
    z = torch.stack([z1, z2], dim=1).reshape(2 * n, -1)
    z = z / z.norm(dim=1, keepdim=True)
    sim = z @ z.T / t
    losses = []
    for i in range(2 * n):
        j = i + 1 if i % 2 == 0 else i - 1
        denom = sum(torch.exp(sim[i, k]) for k in range(2 * n) if k != i)
        losses.append(-torch.log(torch.exp(sim[i, j]) / denom))
    return torch.stack(losses).mean()  # 1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)]


def test_nt_xent_matches_reference_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(6, 10, generator=g, dtype=torch.float64)
    z2 = torch.randn(6, 10, generator=g, dtype=torch.float64)
    for t in (0.1, 0.5):
        a1, a2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
        b1, b2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
        loss, ref = NTXentLoss(t)(a1, a2), nt_xent_reference(b1, b2, t)
        torch.testing.assert_close(loss, ref)
        loss.backward()
        ref.backward()
        torch.testing.assert_close(a1.grad, b1.grad)
        torch.testing.assert_close(a2.grad, b2.grad)


def test_nt_xent_symmetric_in_views_and_checks_shapes():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    torch.testing.assert_close(NTXentLoss()(z1, z2), NTXentLoss()(z2, z1))
    assert NTXentLoss().temperature == 0.1
    with pytest.raises(ValueError, match="same shape"):
        NTXentLoss()(z1, z2[:3])


def _global_views() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, C, generator=g), torch.randn(N, C, generator=g)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        z1, z2 = _global_views()
        n = N // WORLD
        local = slice(rank * n, (rank + 1) * n)
        z1_local = z1[local].clone().requires_grad_(True)
        z2_local = z2[local].clone().requires_grad_(True)
        loss = NTXentLoss(0.1)(z1_local, z2_local)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad_z1": z1_local.grad, "grad_z2": z2_local.grad},
                   f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_nt_xent_two_processes_match_one(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    z1, z2 = _global_views()
    # The one-process side is the independent reference, so a gather without gradient cannot pass on both sides.
    z1_full, z2_full = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    full = nt_xent_reference(z1_full, z2_full, 0.1)
    full.backward()

    n = N // WORLD
    # Each rank averages over its own 2n rows, and every rank has 2n rows: the mean over ranks is the global mean.
    torch.testing.assert_close(torch.stack([r["loss"] for r in res]).mean(), full.detach())
    for r, out in enumerate(res):
        # Rank r's z1/z2 receive the gradient of every rank's loss (its own rows, and its views as negatives in
        # the other ranks' rows: the all-gather with gradient sums them back). Each rank's loss is a mean over
        # 2n rows, the one-process loss over 2N = WORLD * 2n rows, so the rank gradient is WORLD times the matching
        # slice of the one-process gradient; DDP then averages over the WORLD ranks, which divides by WORLD again,
        # so the trained parameters see exactly the one-process gradient.
        torch.testing.assert_close(out["grad_z1"], WORLD * z1_full.grad[r * n:(r + 1) * n])
        torch.testing.assert_close(out["grad_z2"], WORLD * z2_full.grad[r * n:(r + 1) * n])


# ---------------------------------------------------------------- BYOL


def tiny_byol(seed: int = 0) -> BYOL:
    torch.manual_seed(seed)
    return BYOL(vit(), dim=32, mlp_dim=64)


def byol_pairs(model: BYOL) -> list[tuple[torch.Tensor, torch.Tensor]]:
    online = [*model.backbone.parameters(), *model.projector.parameters()]
    target = [*model.momentum_backbone.parameters(), *model.momentum_projector.parameters()]
    assert len(online) == len(target)
    return list(zip(online, target, strict=True))


def _byol_loss_with_target_as_is(model: BYOL, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    p1 = model.predictor(model.projector(model.backbone(x1)))
    p2 = model.predictor(model.projector(model.backbone(x2)))
    z1 = model.momentum_projector(model.momentum_backbone(x1))
    z2 = model.momentum_projector(model.momentum_backbone(x2))
    return model.criterion(p1, z2) + model.criterion(p2, z1)


def test_byol_structure_and_initial_target_copy():
    model = tiny_byol()
    assert len(linears(model.projector)) == 2 and len(linears(model.predictor)) == 2
    assert model.projector[0].in_features == 64 and model.projector[-1].out_features == 32
    assert model.predictor[0].in_features == 32 and model.predictor[-1].out_features == 32
    for head in (model.projector, model.predictor):
        assert not has_last_bn(head) and isinstance(head[-1], nn.Linear)  # BN in hidden layers only
        assert any(isinstance(m, nn.BatchNorm1d) for m in head)
    for p, pt in byol_pairs(model):
        assert torch.equal(p, pt) and p is not pt and not pt.requires_grad
    assert not hasattr(model, "target_predictor")


def test_byol_forward_backward():
    model = tiny_byol()
    x1, x2 = (x.requires_grad_(True) for x in views())
    loss, feats = model(x1, x2, 0.99)
    assert loss.ndim == 0 and torch.isfinite(loss) and 0 < loss.item() < 8  # two terms, each in [0, 4]
    assert feats.shape == (8, 64) and not feats.requires_grad
    torch.testing.assert_close(feats, model.backbone(x1))
    loss.backward()
    for name, p in [*model.backbone.named_parameters(), *model.projector.named_parameters(),
                    *model.predictor.named_parameters()]:
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad is None for p in [*model.momentum_backbone.parameters(), *model.momentum_projector.parameters()])
    assert x1.grad.abs().sum() > 0 and x2.grad.abs().sum() > 0  # both online branches (p1 and p2) are trained


def test_byol_update_momentum():
    model = tiny_byol()
    perturb(model.backbone)
    perturb(model.projector)
    before = [pt.clone() for _, pt in byol_pairs(model)]
    model.update_momentum(1.0)
    assert all(torch.equal(pt, b) for (_, pt), b in zip(byol_pairs(model), before, strict=True))
    expected = [0.9 * pt + 0.1 * p for p, pt in byol_pairs(model)]
    model.update_momentum(0.9)
    for (_, pt), e in zip(byol_pairs(model), expected, strict=True):
        torch.testing.assert_close(pt, e)
    model.update_momentum(0.0)
    assert all(torch.equal(pt, p) for p, pt in byol_pairs(model))


def test_byol_forward_updates_target_before_loss_and_symmetrises():
    model = tiny_byol()
    perturb(model.backbone)
    perturb(model.projector)
    x1, x2 = views()
    stale = copy.deepcopy(model)
    updated = copy.deepcopy(model)
    updated.update_momentum(0.5)

    loss, _ = model(x1, x2, 0.5)
    for (_, pt), (_, pu) in zip(byol_pairs(model), byol_pairs(updated), strict=True):
        torch.testing.assert_close(pt, pu)
    # loss = L(p1, z2) + L(p2, z1), computed with the target as updated by this step.
    torch.testing.assert_close(loss, _byol_loss_with_target_as_is(updated, x1, x2))
    assert not torch.allclose(loss, _byol_loss_with_target_as_is(stale, x1, x2))


# ---------------------------------------------------------------- SimCLR


def test_simclr_forward_backward_reaches_backbone():
    torch.manual_seed(0)
    model = SimCLR(vit(), dim=32, mlp_dim=64)
    assert model.criterion.temperature == 0.1
    assert len(linears(model.projector)) == 2 and has_last_bn(model.projector)
    x1, x2 = (x.requires_grad_(True) for x in views())
    loss, feats = model(x1, x2, 0.99)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert 0 < loss.item() < 2 * math.log(2 * 8)  # near log(2N - 1) at init, well below twice that
    assert feats.shape == (8, 64) and not feats.requires_grad
    torch.testing.assert_close(feats, model.backbone(x1))
    torch.testing.assert_close(loss, model(x1, x2, 0.0)[0])  # moco_m is ignored
    torch.testing.assert_close(loss, model.criterion(model.projector(model.backbone(x1)),
                                                     model.projector(model.backbone(x2))))
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert x1.grad.abs().sum() > 0 and x2.grad.abs().sum() > 0  # both views are trained (no stop-gradient)


def test_simclr_has_no_momentum_encoder():
    model = SimCLR(vit(), dim=32, mlp_dim=64)
    assert {name for name, _ in model.named_children()} == {"backbone", "projector", "criterion"}
    assert not hasattr(model, "update_momentum")
    trained = {id(p) for m in (model.backbone, model.projector) for p in m.parameters()}
    assert all(id(p) in trained for p in model.parameters())


# ---------------------------------------------------------------- registry


def test_build_method_names_and_unknown():
    assert METHODS == ("moco_v3", "byol", "simclr")
    classes = {"moco_v3": MoCoV3, "byol": BYOL, "simclr": SimCLR}
    backbone = TinyConvNet()
    for name in METHODS:
        model = build_method(name, backbone, dim=8, mlp_dim=32, temperature=0.3)
        assert type(model) is classes[name] and model.backbone is backbone
        assert hasattr(model, "update_momentum") is (name != "simclr")
    with pytest.raises(ValueError, match="accepted: moco_v3, byol, simclr"):
        build_method("swav", backbone, dim=8, mlp_dim=32, temperature=0.3)


def test_build_method_vit_recipe():
    backbone = vit()
    moco = build_method("moco_v3", backbone, dim=32, mlp_dim=64, temperature=0.2)
    assert len(linears(moco.projector)) == 3 and has_last_bn(moco.projector) and not moco.projector[-1].affine
    assert len(linears(moco.predictor)) == 2 and has_last_bn(moco.predictor)
    assert moco.criterion.temperature == 0.2
    byol = build_method("byol", backbone, dim=32, mlp_dim=64, temperature=0.2)
    assert len(linears(byol.projector)) == 3 and len(linears(byol.predictor)) == 2
    assert not has_last_bn(byol.projector) and not has_last_bn(byol.predictor)
    simclr = build_method("simclr", backbone, dim=32, mlp_dim=64, temperature=0.15)
    assert len(linears(simclr.projector)) == 3 and has_last_bn(simclr.projector)
    assert simclr.criterion.temperature == 0.15


def test_build_method_resnet_recipe():
    torch.manual_seed(0)
    moco = build_method("moco_v3", TinyConvNet(), dim=8, mlp_dim=32, temperature=1.0)
    assert len(linears(moco.projector)) == 2 and has_last_bn(moco.projector)
    assert len(linears(moco.predictor)) == 2 and not has_last_bn(moco.predictor)
    assert moco.projector[0].in_features == 16 and moco.criterion.temperature == 1.0
    byol = build_method("byol", TinyConvNet(), dim=8, mlp_dim=32, temperature=1.0)
    assert len(linears(byol.projector)) == 2 and not has_last_bn(byol.projector) and not has_last_bn(byol.predictor)
    simclr = build_method("simclr", TinyConvNet(), dim=8, mlp_dim=32, temperature=0.1)
    assert len(linears(simclr.projector)) == 2 and has_last_bn(simclr.projector)
    x1, x2 = views(4)
    for model in (moco, byol, simclr):
        loss, feats = model(x1, x2, 0.99)
        assert torch.isfinite(loss) and feats.shape == (4, 16)
        loss.backward()
