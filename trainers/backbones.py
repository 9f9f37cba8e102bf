"""ViT backbones for MoCo v3: timm's VisionTransformer with the paper's position embedding, init and frozen
patch projection.

Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers" (arXiv 2104.02057),
Sec. 4 (stability: frozen random patch projection) and Sec. 5 / appendix (sin-cos position embedding, init),
following the official ``vits.py``. Each change is a function acting on a created timm model, so they compose
with anything timm builds.
"""

from __future__ import annotations

import math

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

_COMMON = dict(mlp_ratio=4.0, qkv_bias=True, num_classes=0)  # timm's LayerNorm default eps is 1e-6
_P16 = dict(img_size=224, patch_size=16, **_COMMON)

VIT_CONFIGS: dict[str, dict] = {
    # 32px models for CIFAR / Fashion-MNIST scale studies and tests (8 x 8 patch grid).
    "vit_test_patch4_32": dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, **_COMMON),
    "vit_nano_patch4_32": dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4, **_COMMON),
    "vit_tiny_patch4_32": dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, **_COMMON),
    "vit_small_patch4_32": dict(img_size=32, patch_size=4, embed_dim=384, depth=12, num_heads=12, **_COMMON),
    # The paper's ImageNet models. ViT-S has 12 heads in the paper (timm's and DeiT's have 6).
    "vit_small_patch16_224": dict(embed_dim=384, depth=12, num_heads=12, **_P16),
    "vit_base_patch16_224": dict(embed_dim=768, depth=12, num_heads=12, **_P16),
    "vit_large_patch16_224": dict(embed_dim=1024, depth=24, num_heads=16, **_P16),
    "vit_huge_patch16_224": dict(embed_dim=1280, depth=32, num_heads=16, **_P16),
}

POS_EMBEDS = ("sincos", "learned", "none")
GLOBAL_POOLS = ("token", "avg")


def build_2d_sincos_position_embedding(
    grid_size: tuple[int, int], dim: int, temperature: float = 10000.0
) -> Tensor:
    """Fixed 2D sin-cos position embedding with a zero row for the class token: [1, 1 + h * w, dim].

    Per patch: [sin(w * omega), cos(w * omega), sin(h * omega), cos(h * omega)] with
    omega_i = 1 / temperature^(i / (dim / 4)), i < dim / 4 (official ``build_2d_sincos_position_embedding``).
    The official code's ``meshgrid(grid_w, grid_h)`` (``ij`` indexing) makes its "w" the slow-varying index
    of the flattened tokens, i.e. the patch row in timm's row-major order. We keep that numerically (the first
    half encodes the row) but take the rows from the grid height so that non-square grids stay correct.
    """
    h, w = grid_size
    if dim % 4:
        raise ValueError(f"embed dim must be divisible by 4 for the 2D sin-cos embedding, got {dim}")
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    out_r = torch.outer(rows.flatten(), omega)
    out_c = torch.outer(cols.flatten(), omega)
    pe = torch.cat([out_r.sin(), out_r.cos(), out_c.sin(), out_c.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), pe], dim=0)[None]


@torch.no_grad()
def set_pos_embed_(model: VisionTransformer, kind: str) -> None:
    """Position embedding: ``sincos`` fixed (paper default), ``learned`` (timm's init), ``none`` (zeros).

    ``none`` keeps a frozen zero parameter rather than timm's ``pos_embed=None`` so that every ablation has
    the same state-dict keys.
    """
    if kind not in POS_EMBEDS:
        raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {kind!r}")
    if kind == "learned":
        return  # timm initialised it (trunc normal, std .02) and it is trainable
    pe = model.pos_embed
    if kind == "sincos":
        pe.copy_(build_2d_sincos_position_embedding(model.patch_embed.grid_size, pe.shape[-1]))
    else:
        pe.zero_()
    pe.requires_grad = False


@torch.no_grad()
def moco_init_(model: VisionTransformer) -> None:
    """MoCo v3 init (official ``VisionTransformerMoCo.__init__``): xavier-uniform Linears, zero biases.

    qkv is one [3d, d] Linear; xavier on the whole would use fan_out 3d, so the bound is computed for one
    d x d matrix (sqrt(6 / (d + d))), i.e. Q, K and V are each initialised as their own Linear.
    The patch projection is xavier-uniform of the conv seen as a Linear (fan_in = C * p * p; C = 3 in the
    official code).
    """
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            if "qkv" in name:
                val = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -val, val)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(model.cls_token, std=1e-6)
    if isinstance(model.patch_embed, PatchEmbed):
        proj = model.patch_embed.proj
        p = math.prod(model.patch_embed.patch_size)
        val = math.sqrt(6.0 / float(proj.in_channels * p + model.embed_dim))
        nn.init.uniform_(proj.weight, -val, val)
        nn.init.zeros_(proj.bias)


def stop_grad_conv1_(model: VisionTransformer) -> None:
    """Freeze the random patch projection (paper Sec. 4.2): it keeps its init and gets no gradient."""
    if not isinstance(model.patch_embed, PatchEmbed):
        raise ValueError("stop_grad_conv1 applies to the plain patch embedding only")
    for p in model.patch_embed.proj.parameters():
        p.requires_grad = False


def create_backbone(
    name: str,
    *,
    img_size: int | None = None,
    stop_grad_conv1: bool = False,
    pos_embed: str = "sincos",
    moco_init: bool = True,
    global_pool: str = "token",
    drop_path_rate: float = 0.0,
    **overrides,
) -> VisionTransformer:
    """Build a ViT from ``VIT_CONFIGS`` whose forward returns [B, D] (``model.num_features == D``).

    ``global_pool="token"``: the class token after the final LayerNorm (paper default).
    ``global_pool="avg"``: the paper's ablation, average of the patch tokens *without* a final LN; timm would
    put a LayerNorm after the pool (``fc_norm``), so ``final_norm=False`` removes both norms.
    ``overrides`` go to timm's VisionTransformer (e.g. ``in_chans``, ``num_heads``).
    """
    if name not in VIT_CONFIGS:
        raise ValueError(f"unknown backbone {name!r}; accepted: {', '.join(VIT_CONFIGS)}")
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
    if pos_embed not in POS_EMBEDS:
        raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}")
    kwargs = {**VIT_CONFIGS[name], "global_pool": global_pool, "drop_path_rate": drop_path_rate}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if global_pool == "avg":
        kwargs["final_norm"] = False
    kwargs.update(overrides)
    model = VisionTransformer(**kwargs)
    if moco_init:
        moco_init_(model)
    set_pos_embed_(model, pos_embed)
    if stop_grad_conv1:
        stop_grad_conv1_(model)
    return model
