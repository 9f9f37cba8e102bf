"""Backbones: registry, sin-cos embedding, MoCo v3 init, frozen patch projection, pooling."""

import math

import numpy as np
import pytest
import torch

import trainers  # noqa: F401  (compat shim before timm)
from trainers.backbones import VIT_CONFIGS, build_2d_sincos_position_embedding, create_backbone

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
