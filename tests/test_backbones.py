"""Backbones: registry, sin-cos embedding, MoCo v3 init, frozen patch projection, pooling, ViT-BN, conv stem,
ResNet-50."""

import math

import numpy as np
import pytest
import torch

import trainers  # noqa: F401  (compat shim before timm)
from trainers.backbones import (
    BACKBONES,
    VIT_CONFIGS,
    BatchNormTokens,
    ConvStem,
    build_2d_sincos_position_embedding,
    create_backbone,
    stop_grad_conv1_,
)
from trainers.sync_batchnorm import GlobalBatchNorm, convert_sync_batchnorm

TEST = "vit_test_patch4_32"


def images(b: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def sincos_reference(h: int, w: int, d: int) -> np.ndarray:
    """The recipe's formula written out per patch, row-major over (row, col), class-token row zero."""
    q = d // 4
    omega = 1.0 / 10000 ** (np.arange(q) / q)
    rows = [np.zeros(d)]
    for r in range(h):
        for c in range(w):
            rows.append(np.concatenate([np.sin(r * omega), np.cos(r * omega),
                                        np.sin(c * omega), np.cos(c * omega)]))
    return np.stack(rows)


def test_output_is_class_token_after_final_norm():
    torch.manual_seed(0)
    model = create_backbone(TEST).eval()
    x = images()
    out = model(x)
    assert out.shape == (4, 64) and model.num_features == 64
    assert isinstance(model.norm, torch.nn.LayerNorm) and model.norm.eps == 1e-6
    torch.testing.assert_close(out, model.forward_features(x)[:, 0])


def test_avg_pool_has_no_final_norm():
    torch.manual_seed(0)
    model = create_backbone(TEST, global_pool="avg").eval()
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in (model.norm, model.fc_norm))
    x = images()
    out = model(x)
    assert out.shape == (4, 64)
    torch.testing.assert_close(out, model.forward_features(x)[:, 1:].mean(dim=1))


def test_paper_vit_small_has_12_heads():
    model = create_backbone("vit_small_patch16_224")
    assert model.embed_dim == 384 and model.num_features == 384 and len(model.blocks) == 12
    assert all(b.attn.num_heads == 12 for b in model.blocks)
    assert model.blocks[0].mlp.fc1.out_features == 4 * 384 and model.blocks[0].attn.qkv.bias is not None
    assert model.patch_embed.patch_size == (16, 16) and model.pos_embed.shape == (1, 197, 384)


@pytest.mark.parametrize(
    ("name", "dim", "depth", "heads"),
    [("vit_base_patch16_224", 768, 12, 12), ("vit_large_patch16_224", 1024, 24, 16),
     ("vit_huge_patch16_224", 1280, 32, 16)],
)
def test_paper_configs_on_meta(name, dim, depth, heads):
    model = create_backbone(name, device="meta")
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (dim, depth, heads)


def test_unknown_name_lists_accepted():
    with pytest.raises(ValueError) as err:
        create_backbone("vit_small_patch16_224_typo")
    assert all(name in str(err.value) for name in VIT_CONFIGS)


def test_sincos_matches_formula_and_is_frozen():
    torch.manual_seed(0)
    model = create_backbone(TEST, pos_embed="sincos")
    pe = model.pos_embed.detach()[0].numpy()
    np.testing.assert_allclose(pe, sincos_reference(8, 8, 64), atol=1e-5)
    assert np.all(pe[0] == 0) and not model.pos_embed.requires_grad
    # Non-square grid: the first half must follow the row, the second the column.
    np.testing.assert_allclose(build_2d_sincos_position_embedding((2, 3), 8)[0].numpy(),
                               sincos_reference(2, 3, 8), atol=1e-6)

    before = model.pos_embed.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # all params, frozen ones included
    model(images()).square().mean().backward()
    opt.step()
    assert model.pos_embed.grad is None
    torch.testing.assert_close(model.pos_embed.detach(), before, rtol=0, atol=0)


def test_learned_and_none_pos_embed():
    torch.manual_seed(0)
    learned = create_backbone(TEST, pos_embed="learned")
    assert learned.pos_embed.requires_grad
    assert 0.015 < learned.pos_embed.std().item() < 0.025  # timm's trunc normal, std .02
    learned(images()).square().mean().backward()
    assert learned.pos_embed.grad is not None and learned.pos_embed.grad.abs().sum() > 0

    none = create_backbone(TEST, pos_embed="none")
    assert not none.pos_embed.requires_grad and torch.all(none.pos_embed == 0)
    with pytest.raises(ValueError):
        create_backbone(TEST, pos_embed="rope")


def test_moco_init_treats_qkv_as_three_matrices():
    torch.manual_seed(0)
    model = create_backbone(TEST, moco_init=True)
    d = model.embed_dim
    bound = math.sqrt(6 / (d + d))
    for block in model.blocks:
        qkv = block.attn.qkv
        for third in qkv.weight.detach().chunk(3, dim=0):
            assert third.abs().max() <= bound
            # Uniform(-b, b) has std b / sqrt(3) = sqrt(2 / 2d); a whole-matrix xavier init would give
            # sqrt(2 / 4d), a factor sqrt(2) smaller.
            assert third.std().item() == pytest.approx(math.sqrt(2 / (2 * d)), rel=0.05)
        assert torch.all(qkv.bias == 0)
        for lin in (block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            fan_out, fan_in = lin.weight.shape
            assert lin.weight.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.05)
            assert torch.all(lin.bias == 0)
    assert 0.5e-6 < model.cls_token.std().item() < 2e-6
    proj = model.patch_embed.proj
    val = math.sqrt(6 / float(3 * 4 * 4 + d))
    assert proj.weight.abs().max() <= val
    assert proj.weight.std().item() == pytest.approx(val / math.sqrt(3), rel=0.05)
    assert torch.all(proj.bias == 0)


def test_timm_init_when_moco_init_off():
    torch.manual_seed(0)
    model = create_backbone(TEST, moco_init=False)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)  # trunc normal .02


def _train_steps(model: torch.nn.Module, steps: int = 3) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    for i in range(steps):
        opt.zero_grad()
        model(images(seed=i)).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("frozen", [True, False])
def test_stop_grad_conv1(frozen):
    torch.manual_seed(0)
    model = create_backbone(TEST, stop_grad_conv1=frozen)
    proj = model.patch_embed.proj
    trainable_ids = {id(p) for p in model.parameters() if p.requires_grad}
    assert (id(proj.weight) in trainable_ids) is not frozen and (id(proj.bias) in trainable_ids) is not frozen
    w0, b0 = proj.weight.detach().clone(), proj.bias.detach().clone()
    qkv0 = model.blocks[0].attn.qkv.weight.detach().clone()
    _train_steps(model)
    assert torch.equal(proj.weight, w0) is frozen and torch.equal(proj.bias, b0) is frozen
    assert not torch.equal(model.blocks[0].attn.qkv.weight, qkv0)


def test_overrides_reach_timm():
    model = create_backbone(TEST, img_size=28, in_chans=1, drop_path_rate=0.1)
    assert model.patch_embed.grid_size == (7, 7) and model.pos_embed.shape == (1, 50, 64)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 64)
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)


# ---------------------------------------------------------------- ViT-BN


def test_vit_bn_replaces_mlp_and_final_norms_only():
    torch.manual_seed(0)
    model = create_backbone(TEST, mlp_norm="bn")
    for block in model.blocks:
        assert isinstance(block.norm2, BatchNormTokens) and isinstance(block.norm2.bn, torch.nn.BatchNorm1d)
        assert isinstance(block.norm1, torch.nn.LayerNorm)  # attention keeps its LayerNorm
    assert isinstance(model.norm, BatchNormTokens)  # official --vit-bn: "in ViT MLP blocks and in the end"
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in (model.blocks[0].norm2, model.norm))

    model.train()
    x = images()
    out = model(x)
    assert out.shape == (4, 64)
    out.square().mean().backward()
    assert model.blocks[0].norm2.bn.weight.grad is not None and model.blocks[0].attn.qkv.weight.grad is not None
    assert model.blocks[0].norm2.bn.num_batches_tracked.item() == 1
    assert not torch.allclose(model.blocks[0].norm2.bn.running_mean, torch.zeros(64))

    # Per channel, statistics over all B * N tokens: the output has zero mean / unit variance over them.
    tokens = torch.randn(4, 65, 64) * 3 + 1
    y = model.blocks[0].norm2(tokens).detach()
    torch.testing.assert_close(y.mean(dim=(0, 1)), torch.zeros(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(dim=(0, 1), unbiased=False), torch.ones(64), atol=1e-3, rtol=0)

    model.eval()  # running statistics: each image's output no longer depends on the rest of the batch
    torch.testing.assert_close(model(x)[:1], model(x[:1]))


def test_vit_bn_survives_sync_batchnorm_conversion():
    torch.manual_seed(0)
    model = convert_sync_batchnorm(create_backbone(TEST, mlp_norm="bn"), torch.device("cpu"))
    assert isinstance(model.blocks[0].norm2, BatchNormTokens) and isinstance(model.blocks[0].norm2.bn, GlobalBatchNorm)
    assert model(images()).shape == (4, 64)


def test_mlp_norm_validated_and_avg_pool_keeps_no_final_norm():
    with pytest.raises(ValueError, match="mlp_norm"):
        create_backbone(TEST, mlp_norm="gn")
    model = create_backbone(TEST, mlp_norm="bn", global_pool="avg")
    assert isinstance(model.norm, torch.nn.Identity) and isinstance(model.blocks[0].norm2, BatchNormTokens)


# ---------------------------------------------------------------- conv stem


def _stride_convs(stem: ConvStem) -> list[torch.nn.Conv2d]:
    return [m for m in stem.proj if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]


def test_conv_stem_total_stride_is_patch_size():
    torch.manual_seed(0)
    model = create_backbone(TEST, conv_stem=True)
    stem = model.patch_embed
    assert isinstance(stem, ConvStem)
    convs = _stride_convs(stem)
    assert len(convs) == 2 and math.prod(c.stride[0] for c in convs) == 4  # log2(4) stride-2 convs
    assert [c.out_channels for c in convs] == [64 // 8, 64 // 4]
    assert all(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.ReLU)) for m in stem.proj[1:3])
    last = stem.proj[-1]
    assert last.kernel_size == (1, 1) and last.out_channels == 64 and last.bias is not None
    assert stem.grid_size == (8, 8) and stem.num_patches == 64 and model.pos_embed.shape == (1, 65, 64)
    assert stem(images()).shape == (4, 64, 64)  # 8 x 8 tokens of dim 64
    assert len(model.blocks) == VIT_CONFIGS[TEST]["depth"] - 1

    x = images()
    out = model(x)
    assert out.shape == (4, 64)
    out.square().mean().backward()
    assert convs[0].weight.grad is not None and convs[0].weight.grad.abs().sum() > 0
    np.testing.assert_allclose(model.pos_embed.detach()[0].numpy(), sincos_reference(8, 8, 64), atol=1e-5)


def test_conv_stem_init_linears_xavier_convs_default():
    torch.manual_seed(0)
    model = create_backbone(TEST, conv_stem=True, moco_init=True)
    d = model.embed_dim
    qkv = model.blocks[0].attn.qkv.weight.detach()
    assert qkv.abs().max() <= math.sqrt(6 / (2 * d))
    fc1 = model.blocks[0].mlp.fc1.weight
    assert fc1.std().item() == pytest.approx(math.sqrt(2 / (d + 4 * d)), rel=0.05)
    conv = model.patch_embed.proj[0]  # PyTorch default: kaiming_uniform(a=sqrt(5)), bound 1 / sqrt(fan_in)
    assert conv.weight.abs().max() <= 1 / math.sqrt(3 * 9)


def test_conv_stem_paper_vit_small_on_meta():
    model = create_backbone("vit_small_patch16_224", conv_stem=True, device="meta")
    convs = _stride_convs(model.patch_embed)
    # Official vit_conv_small: 3 -> 48 -> 96 -> 192 -> 384, 1x1 384 -> 384, 11 blocks.
    assert [c.out_channels for c in convs] == [48, 96, 192, 384] and model.patch_embed.proj[-1].in_channels == 384
    assert len(model.blocks) == 11 and model.patch_embed.grid_size == (14, 14)


def test_conv_stem_rejects_stop_grad_conv1_and_bad_patch():
    with pytest.raises(ValueError, match="conv_stem"):
        create_backbone(TEST, conv_stem=True, stop_grad_conv1=True)
    with pytest.raises(ValueError, match="plain patch embedding"):
        stop_grad_conv1_(create_backbone(TEST, conv_stem=True))
    with pytest.raises(ValueError, match="power-of-2"):
        create_backbone(TEST, conv_stem=True, img_size=36, patch_size=6)
    with pytest.raises(ValueError, match="power-of-2"):
        ConvStem(img_size=224, patch_size=7, embed_dim=64)
    with pytest.raises(ValueError, match="divisible by 8"):
        ConvStem(img_size=32, patch_size=4, embed_dim=60)


# ---------------------------------------------------------------- ResNet-50


def test_registry_lists_vits_and_resnet50():
    assert (*VIT_CONFIGS, "resnet50") == BACKBONES
    with pytest.raises(ValueError, match="resnet50"):
        create_backbone("resnet5O")


def test_resnet50_pooled_features():
    torch.manual_seed(0)
    model = create_backbone("resnet50")
    assert model.num_features == 2048
    model.eval()
    with torch.no_grad():
        out = model(images(2))
    assert out.shape == (2, 2048)
    # timm's zero_init_last == torchvision's zero_init_residual=True (official MoCo v3 ResNet).
    assert torch.all(model.layer1[0].bn3.weight == 0)


@pytest.mark.parametrize(
    ("option", "value"),
    [("pos_embed", "learned"), ("stop_grad_conv1", True), ("mlp_norm", "bn"), ("conv_stem", True),
     ("global_pool", "token")],
)
def test_resnet50_rejects_vit_options(option, value):
    with pytest.raises(ValueError, match=option):
        create_backbone("resnet50", **{option: value})
