"""Linear probe on real FFCV Fashion-MNIST, the frozen-backbone guards, two ranks, and the online probe.

Only one test iterates FFCV loaders (numba compiles each loader's pipeline on its first batch); the guard and
distributed tests drive ``train_linear_head`` with in-memory batches.
"""

import copy
import gc
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import trainers  # noqa: F401  (compat shim before timm)
import trainers.linear_probe as lp
from data.convert import read_metadata, to_rgb32, write_beton
from data.fashion_mnist import CLASSES, load_fashion_mnist
from trainers.backbones import create_backbone
from trainers.linear_probe import (
    OnlineLinearProbe,
    check_unchanged,
    cosine_epoch_lr,
    init_head_,
    linear_probe,
    snapshot,
    train_linear_head,
)

# numba's dispatcher finalizers print "KeyError: (Array(uint8, ..." as loaders are collected: harmless noise.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:Exception ignored in. <finalize object:pytest.PytestUnraisableExceptionWarning"
)

N_TRAIN, N_TEST = 1024, 512


@pytest.fixture(scope="module")
def betons(tmp_path_factory) -> tuple[Path, Path]:
    """The first 1024 real training and 512 real test images of Fashion-MNIST (32x32 RGB) as FFCV files."""
    root = tmp_path_factory.mktemp("probe")
    paths = []
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        images, labels = load_fashion_mnist(split)
        paths.append(write_beton(to_rgb32(images[:n]), labels[:n], root / f"{split}.beton",
                                 source=f"fashion-mnist {split}[:{n}]", classes=CLASSES))
    return paths[0], paths[1]


# ---------------------------------------------------------------------------------------------- real data


def test_linear_probe_on_real_fashion_mnist_leaves_the_backbone_bit_identical(betons):
    torch.manual_seed(0)
    backbone = create_backbone("vit_test_patch4_32")  # random init: its features are weak but not useless
    backbone.train()
    before = copy.deepcopy(backbone.state_dict())
    flags = [p.requires_grad for p in backbone.parameters()]
    # 10 epochs at batch 128 (80 steps). Random-init ViT features diverge at the ViT base lr of 3.0, so 0.5.
    result = linear_probe(backbone, *betons, epochs=10, batch_size=128, base_lr=0.5)
    assert set(result) == {"top1", "top5", "train_loss", "epochs"} and result["epochs"] == 10
    assert result["top1"] <= result["top5"] <= 1.0
    assert result["top1"] > 0.3, result  # chance is 0.1; measured 0.44-0.47
    assert math.isfinite(result["train_loss"]) and result["train_loss"] < math.log(10)
    after = backbone.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert backbone.training and all(m.training for m in backbone.modules())  # modes restored
    assert [p.requires_grad for p in backbone.parameters()] == flags
    gc.collect()  # collect the loaders here, where their numba finalizer noise is filtered


def test_linear_probe_wiring(betons, monkeypatch):
    """lr scaling, head size, loaders and subsets, without iterating the loaders (no numba compile)."""
    seen = {}

    def fake(backbone, train_batches, test_batches, **kwargs):
        seen.update(kwargs, train=train_batches, test=test_batches)
        return {"top1": 0.0, "train_loss": 0.0, "epochs": kwargs["epochs"]}

    monkeypatch.setattr(lp, "train_linear_head", fake)
    backbone = create_backbone("vit_test_patch4_32")
    linear_probe(backbone, *betons, epochs=3, batch_size=512, train_indices=range(700), test_indices=range(300))
    assert seen["lr"] == pytest.approx(3.0 * 512 / 256)  # base 3 (ViT) scaled by batch / 256
    assert (seen["num_features"], seen["num_classes"], seen["epochs"]) == (64, 10, 3)
    assert len(seen["train"]) == 2  # 700 images in batches of 512, the short batch kept
    assert len(seen["test"]) == 1
    # A backbone without num_features gets its width from an eval-mode forward; its BN does not move.
    conv = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    before = snapshot(conv)
    linear_probe(conv, *betons, epochs=1, batch_size=256, base_lr=0.1)
    assert seen["num_features"] == 5 and seen["lr"] == pytest.approx(0.1)
    check_unchanged(conv, before)
    assert conv.training

    other = betons[1].with_name("other.beton")
    images, labels = load_fashion_mnist("test")
    write_beton(to_rgb32(images[:20]), labels[:20] % 2, other, source="two classes", classes=["a", "b"])
    with pytest.raises(ValueError, match="different classes"):
        linear_probe(backbone, betons[0], other)
    assert read_metadata(betons[0])["num_classes"] == 10


def test_cosine_epoch_lr_and_head_init():
    assert cosine_epoch_lr(0, 90, 12.0) == 12.0
    assert cosine_epoch_lr(45, 90, 12.0) == pytest.approx(6.0)
    assert 0 < cosine_epoch_lr(89, 90, 12.0) < 0.01
    head = init_head_(nn.Linear(384, 1000), torch.Generator().manual_seed(0))
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.02) and abs(head.weight.mean().item()) < 1e-3
    assert not head.bias.any()


# ---------------------------------------------------------------------------------------------- guards

C, RES = 4, 8


def separable_batches(n_batches: int, size: int, seed: int, num_classes: int = C):
    """Images whose class sets one channel's brightness: easy for conv + BN + pooling features."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        y = torch.randint(num_classes, (size,), generator=g)
        x = 0.3 * torch.randn(size, 3, RES, RES, generator=g)
        x[:, 0] += y.view(-1, 1, 1).float()
        out.append((x, y))
    return out


def bn_backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


class RefusesEval(nn.Sequential):
    """A backbone whose .eval() does nothing: it stays in training mode, so its BN statistics move."""

    def train(self, mode: bool = True):
        return super().train(True)


class Drifts(nn.Module):
    """A backbone that nudges its own weight on every forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3 * RES * RES, 8)

    def forward(self, x):
        with torch.no_grad():
            self.lin.weight.add_(1e-6)
        return self.lin(x.flatten(1))


def probe(backbone: nn.Module, epochs: int = 3) -> dict:
    return train_linear_head(backbone, separable_batches(8, 32, seed=0), separable_batches(4, 50, seed=1),
                             num_features=8, num_classes=C, epochs=epochs, lr=1.0)


def test_guard_function_catches_moving_batchnorm_statistics():
    backbone = bn_backbone()
    x = torch.randn(16, 3, RES, RES)
    before = snapshot(backbone)
    backbone.eval()
    with torch.no_grad():
        backbone(x)
    check_unchanged(backbone, before)  # eval mode: nothing moved
    backbone.train()
    with torch.no_grad():  # no gradient, no optimiser: BN in train mode still updates its running statistics
        backbone(x)
    with pytest.raises(RuntimeError, match=r"1\.running_mean.*1\.running_var"):
        check_unchanged(backbone, before)


def test_guard_is_bitwise():
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
        lin.bias[0] = 0.0
    before = snapshot(lin)
    check_unchanged(lin, before)  # NaN equals itself bit for bit
    with torch.no_grad():
        lin.bias[0] = -0.0
    with pytest.raises(RuntimeError, match="bias"):
        check_unchanged(lin, before)


def test_probe_on_a_bn_backbone_learns_and_changes_nothing():
    backbone = bn_backbone()
    backbone.train()
    before = snapshot(backbone)
    result = probe(backbone, epochs=5)
    assert result["top1"] > 0.9, result
    check_unchanged(backbone, before)
    assert all(m.training for m in backbone.modules())
    assert all(p.requires_grad and p.grad is None for p in backbone.parameters())


def test_probe_refuses_a_backbone_that_stays_in_training_mode(monkeypatch):
    torch.manual_seed(0)
    sneaky = RefusesEval(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(RuntimeError, match="eval mode"):
        probe(sneaky)
    # Without the mode check, the end-of-run comparison still catches the moved BN statistics.
    monkeypatch.setattr(lp, "check_eval_mode", lambda module: None)
    with pytest.raises(RuntimeError, match=r"changed during the linear probe: 1\.num_batches_tracked, 1\.running_mean"):
        probe(sneaky)


def test_probe_refuses_a_backbone_whose_weights_change():
    drifting = Drifts()
    with pytest.raises(RuntimeError, match=r"changed during the linear probe: lin\.weight$"):
        probe(drifting, epochs=1)
    assert drifting.training and drifting.lin.weight.requires_grad  # restored even when raising


# ---------------------------------------------------------------------------------------------- two ranks

WORLD = 2


def _split(batches, rank: int):
    return [(x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]) for x, y in batches]


def _probe_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        backbone = bn_backbone()
        before = snapshot(backbone)
        train = _split(separable_batches(8, 32, seed=0, num_classes=6), rank)
        test = separable_batches(1, 101, seed=1, num_classes=6)[0]  # 101 images: uneven slices
        test = [(test[0][rank::WORLD], test[1][rank::WORLD])]
        result = train_linear_head(backbone, train, test, num_features=8, num_classes=6, epochs=2, lr=0.5)
        check_unchanged(backbone, before)
        torch.save(result, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process(tmp_path):
    mp.spawn(_probe_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    expected = train_linear_head(bn_backbone(), separable_batches(8, 32, seed=0, num_classes=6),
                                 separable_batches(1, 101, seed=1, num_classes=6), num_features=8, num_classes=6,
                                 epochs=2, lr=0.5)
    assert 0.3 < expected["top1"] < 1.0  # not saturated, so a wrong count or a wrong gradient would show
    assert expected["top1"] * 101 == pytest.approx(round(expected["top1"] * 101))
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert got["top1"] == pytest.approx(expected["top1"], abs=1e-12)
        assert got["top5"] == pytest.approx(expected["top5"], abs=1e-12)
        assert got["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-5)


# ---------------------------------------------------------------------------------------------- online probe


def test_online_probe_learns_separable_features_without_touching_the_encoder():
    g = torch.Generator().manual_seed(0)
    centres = 2 * torch.randn(10, 32, generator=g)

    def sample(n):
        y = torch.randint(10, (n,), generator=g)
        return centres[y] + torch.randn(n, 32, generator=g), y

    torch.manual_seed(0)
    encoder = nn.Linear(32, 32)  # stands in for the backbone producing the features
    probe_ = OnlineLinearProbe(32, 10, lr=0.1)
    test_x, test_y = sample(500)
    start = probe_.accuracy(encoder(test_x), test_y)
    losses = []
    for _ in range(150):
        x, y = sample(64)
        feats = encoder(x)  # requires grad: the probe must detach it
        losses.append(probe_.step(feats, y))
    assert encoder.weight.grad is None
    assert start < 0.5 and probe_.accuracy(encoder(test_x), test_y) > 0.95
    assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:10])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a loop's autocast region does not reach the probe
        assert math.isfinite(probe_.step(encoder(test_x[:64]).bfloat16(), test_y[:64]))
    assert probe_.head.weight.dtype == torch.float32
