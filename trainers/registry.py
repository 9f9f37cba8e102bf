"""The names a study file may choose, and the shapes behind the backbone names: free of torch and timm, so
that the study file's checks (study/spec.py) read them in milliseconds. The modules that build each part
(backbones.py, methods/, optim.py) import their names from here.
"""

from __future__ import annotations

METHODS: tuple[str, ...] = ("moco_v3", "byol", "simclr")
OPTIMIZERS: tuple[str, ...] = ("adamw", "lars", "lamb")

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

# CNN baselines, built by timm with its own defaults (global average pooling, 2048-d for ResNet-50).
RESNETS: tuple[str, ...] = ("resnet50",)
BACKBONES: tuple[str, ...] = (*VIT_CONFIGS, *RESNETS)

POS_EMBEDS = ("sincos", "learned", "none")
GLOBAL_POOLS = ("token", "avg")
MLP_NORMS = ("ln", "bn")
