"""Backbones for MoCo v3: timm's VisionTransformer with the paper's position embedding, init, frozen patch
projection and architecture variants (ViT-BN, conv stem), plus timm's ResNet-50 baseline.

Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers" (arXiv 2104.02057),
Sec. 4 (stability: frozen random patch projection) and Sec. 5 / appendix (sin-cos position embedding, init,
ViT-BN, conv stem), following the official ``vits.py``. Each change is a function or module acting on a created
timm model, so they compose with anything timm builds.
"""

from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention, Format, PatchEmbed, nchw_to, to_2tuple
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from trainers.registry import (
    BACKBONES,
    GLOBAL_POOLS,
    MLP_NORMS,
    POS_EMBEDS,
    RESNETS,
    VIT_CONFIGS,
)


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
def moco_patch_init_(model: VisionTransformer) -> None:
    """The part of the MoCo v3 init (official ``VisionTransformerMoCo.__init__``) that timm's ``weight_init="moco"``
    leaves out ("minus fixed PatchEmbed"): the patch projection xavier-uniform as a Linear (fan_in = C * p * p).

    timm's mode does the rest as the official code: xavier-uniform Linears with Q, K and V each as its own
    d x d matrix (bound sqrt(6 / (d + d)), not the [3d, d] whole), zero biases, class token N(0, 1e-6).
    """
    if isinstance(model.patch_embed, PatchEmbed):
        proj = model.patch_embed.proj
        p = math.prod(model.patch_embed.patch_size)
        val = math.sqrt(6.0 / float(proj.in_channels * p + model.embed_dim))
        nn.init.uniform_(proj.weight, -val, val)
        nn.init.zeros_(proj.bias)


def stop_grad_conv1_(model: VisionTransformer) -> None:
    """Freeze the random patch projection (paper Sec. 4.2): it keeps its init and gets no gradient."""
    if not isinstance(model.patch_embed, PatchEmbed):
        raise ValueError(
            f"stop_grad_conv1 applies to the plain patch embedding only, not to {type(model.patch_embed).__name__}"
        )
    for p in model.patch_embed.proj.parameters():
        p.requires_grad = False


class BatchNormTokens(nn.Module):
    """BatchNorm over the channel dimension of tokens [..., D]: each channel is normalised with the statistics
    of every token of every image in the batch (class token included).

    The tokens are flattened to [M, D] for an inner ``nn.BatchNorm1d`` (``self.bn``). Composition rather than
    subclassing keeps it correct under ``SyncBatchNorm.convert_sync_batchnorm`` and
    ``trainers.sync_batchnorm.convert_sync_batchnorm``: they replace the inner BatchNorm, which still receives
    [M, D], whereas a BatchNorm1d subclass would be swapped for a plain (Sync/Global)BatchNorm and lose the
    reshape. State-dict keys are ``<name>.bn.weight``, ``.bn.bias``, ``.bn.running_mean``, ...
    """

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1, device=None, dtype=None) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, eps=eps, momentum=momentum, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(x.reshape(-1, x.shape[-1])).view(x.shape)


def set_mlp_norm_(model: VisionTransformer, kind: str) -> None:
    """ViT-BN (the paper's "ViT-BN" variant, about +1%): BatchNorm instead of LayerNorm before every
    MLP (each block's ``norm2``) and as the final norm; the LayerNorm before attention (``norm1``) stays.

    No official code implements it: an early version of the official repository's ``vits.py`` accepted a
    ``use_bn`` argument and ignored it, and the released one dropped it. That early ``main_moco.py`` documents
    the flag, though: "--vit-bn: use batch normalization instead of layer normalization in ViT MLP blocks and
    in the end". So the final norm becomes BN too (when there is one: ``global_pool="avg"`` has none); its
    statistics cover all tokens, as the final norm is applied before the class token is taken. BN eps 1e-5 /
    momentum 0.1 (PyTorch defaults, as in the MoCo v3 heads).
    """
    if kind not in MLP_NORMS:
        raise ValueError(f"mlp_norm must be one of {MLP_NORMS}, got {kind!r}")
    if kind == "ln":
        return
    ref = model.cls_token if model.cls_token is not None else next(model.parameters())
    dd = {"device": ref.device, "dtype": ref.dtype}
    for block in model.blocks:
        block.norm2 = BatchNormTokens(model.embed_dim, **dd)
    if not isinstance(model.norm, nn.Identity):
        model.norm = BatchNormTokens(model.embed_dim, **dd)


class ConvStem(nn.Module):
    """Convolutional stem replacing the patch projection (paper's ViT-C; official ``vits.ConvStem`` after Xiao et
    al., "Early Convolutions Help Transformers See Better", arXiv 2106.14881).

    log2(patch_size) x [conv3x3 stride 2 (no bias), BatchNorm2d, ReLU], then a 1x1 conv to ``embed_dim``: the total
    stride equals the patch size, so ``grid_size`` / ``num_patches`` and the position embedding are those of the
    plain patch embedding. Channels as in the official code: the first conv outputs ``embed_dim // 8`` and each
    next one doubles it (patch 16: D/8, D/4, D/2, D, then 1x1 D -> D; patch 4: D/8, D/4, then 1x1 D/4 -> D).
    The official code only allows patch 16; any power of two works here. Init: the convs keep PyTorch's default
    (kaiming-uniform) init, as officially (MoCo v3's xavier init only re-initialises a plain ``PatchEmbed``; timm's
    ViT init only touches Linears).

    Accepts the keyword arguments timm's ``VisionTransformer`` passes to ``embed_layer`` (``img_size``,
    ``patch_size``, ``in_chans``, ``embed_dim``, ``bias``, ``dynamic_img_pad``, ``strict_img_size``,
    ``output_fmt``, ``norm_layer``, ``device``, ``dtype``); ``bias`` applies to the final 1x1 conv.
    """

    output_fmt: Format

    def __init__(
        self,
        img_size: int | tuple[int, int] | None = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer=None,
        flatten: bool = True,
        output_fmt: str | None = None,
        bias: bool = True,
        strict_img_size: bool = True,
        dynamic_img_pad: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.patch_size = to_2tuple(patch_size)
        p = self.patch_size[0]
        if self.patch_size[1] != p or p < 2 or p & (p - 1):
            raise ValueError(f"ConvStem needs a square power-of-2 patch size (stride-2 convs), got {patch_size}")
        if embed_dim % 8:
            raise ValueError(f"ConvStem needs embed_dim divisible by 8, got {embed_dim}")
        if dynamic_img_pad:
            raise ValueError("ConvStem does not support dynamic_img_pad")
        self.img_size, self.grid_size, self.num_patches = self._init_img_size(img_size)
        if output_fmt is not None:
            self.flatten = False
            self.output_fmt = Format(output_fmt)
        else:
            self.flatten = flatten
            self.output_fmt = Format.NCHW
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = False

        layers: list[nn.Module] = []
        cin, cout = in_chans, embed_dim // 8
        for _ in range(p.bit_length() - 1):  # log2(p) stride-2 convs
            layers += [
                nn.Conv2d(cin, cout, kernel_size=3, stride=2, padding=1, bias=False, **dd),
                nn.BatchNorm2d(cout, **dd),
                nn.ReLU(inplace=True),
            ]
            cin, cout = cout, cout * 2
        layers.append(nn.Conv2d(cin, embed_dim, kernel_size=1, bias=bias, **dd))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim, **dd) if norm_layer else nn.Identity()

    def _init_img_size(self, img_size):
        if img_size is None:
            return None, None, None
        img_size = to_2tuple(img_size)
        grid_size = (img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1])
        return img_size, grid_size, grid_size[0] * grid_size[1]

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        if patch_size is not None and to_2tuple(patch_size) != self.patch_size:
            raise ValueError("ConvStem cannot change its patch size (the number of stride-2 convs)")
        if img_size is not None:
            self.img_size, self.grid_size, self.num_patches = self._init_img_size(img_size)

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if self.img_size is not None and self.strict_img_size:
            if (h, w) != self.img_size:
                raise ValueError(f"input size ({h}, {w}) does not match the model's {self.img_size}")
        elif h % self.patch_size[0] or w % self.patch_size[1]:
            raise ValueError(f"input size ({h}, {w}) must be divisible by the patch size {self.patch_size}")
        x = self.proj(x)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # NCHW -> NLC
        elif self.output_fmt != Format.NCHW:
            x = nchw_to(x, self.output_fmt)
        return self.norm(x)


def class_token_block(block: Block, x: Tensor) -> Tensor:
    """``block(x)[:, :1]`` computing only what the class token's output needs: its query against every token's
    key and value, then the attention projection and the MLP of that one token.

    In the last block of a class-token ViT the patch tokens' outputs are never read, so of the block's 12 d^2
    multiply-adds per token only the key and value (2 d^2) are needed for them: for 65 tokens (32 px, patch 4)
    that is 81% of the block's work, forward and backward, in the base and the momentum encoder alike. Equal
    to the full block to fp32 rounding; DropPath draws one value per sample either way, so it is equal too.
    """
    attn, (b, n, _) = block.attn, x.shape
    y = block.norm1(x)
    w_q, w_kv = attn.qkv.weight.split([attn.attn_dim, 2 * attn.attn_dim])
    b_q, b_kv = (None, None) if attn.qkv.bias is None else attn.qkv.bias.split([attn.attn_dim, 2 * attn.attn_dim])
    k, v = F.linear(y, w_kv, b_kv).reshape(b, n, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q = F.linear(y[:, :1], w_q, b_q).reshape(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    o = F.scaled_dot_product_attention(attn.q_norm(q), attn.k_norm(k), v,
                                       dropout_p=attn.attn_drop.p if attn.training else 0.0)
    o = attn.proj_drop(attn.proj(attn.norm(o.transpose(1, 2).reshape(b, 1, attn.attn_dim))))
    x = x[:, :1] + block.drop_path1(block.ls1(o))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class ClassTokenViT(VisionTransformer):
    """timm's VisionTransformer whose ``forward`` (the pooled class token) runs its last block for the class
    token only (``class_token_block``). ``forward_features`` and every other timm method are unchanged, and so
    are the parameters and state-dict keys: an exported backbone loads into plain timm.

    Only where that is exact: class-token pooling, and a last block and final norm that see each token on its
    own (a plain timm ``Block`` with ``Attention``, LayerNorm; not ViT-BN, whose BatchNorm statistics cover all
    tokens). Otherwise ``forward`` is timm's.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        last = self.blocks[-1] if len(self.blocks) else None
        self.class_token_only = (
            self.global_pool == "token" and self.attn_pool is None and type(last) is Block
            and type(last.attn) is Attention and last.attn.gate is None
        )

    def forward(self, x: Tensor) -> Tensor:
        if not self.class_token_only or self.grad_checkpointing or not (  # LayerNorms: set_mlp_norm_ may swap them
                isinstance(self.norm, nn.LayerNorm) and isinstance(self.blocks[-1].norm2, nn.LayerNorm)):
            return super().forward(x)
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        x = self.blocks[:-1](x)
        return self.forward_head(self.norm(class_token_block(self.blocks[-1], x)))


def _vit_kwargs(
    name: str, img_size: int | None, global_pool: str, drop_path_rate: float, conv_stem: bool, overrides: dict
) -> dict:
    """The VisionTransformer kwargs of ``create_backbone`` (``embed_layer`` added for the conv stem)."""
    kwargs = {**VIT_CONFIGS[name], "global_pool": global_pool, "drop_path_rate": drop_path_rate}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if global_pool == "avg":
        kwargs["final_norm"] = False
    if conv_stem:
        kwargs["depth"] -= 1  # paper / official vit_conv_*: one block fewer to compensate the stem's compute
        kwargs["embed_layer"] = ConvStem
    kwargs.update(overrides)  # an explicit depth= is the final depth, conv stem or not
    return kwargs


def _check_resnet_options(name: str, **options) -> None:
    vit_only = [k for k, is_set in options.items() if is_set]
    if vit_only:
        raise ValueError(f"{', '.join(vit_only)} appl{'ies' if len(vit_only) == 1 else 'y'} to ViT backbones only, "
                         f"not to {name!r}")


def create_backbone(
    name: str,
    *,
    img_size: int | None = None,
    stop_grad_conv1: bool = False,
    pos_embed: str = "sincos",
    moco_init: bool = True,
    global_pool: str | None = None,
    drop_path_rate: float = 0.0,
    mlp_norm: str = "ln",
    conv_stem: bool = False,
    **overrides,
) -> nn.Module:
    """Build a backbone of ``BACKBONES`` whose forward returns [B, D] (``model.num_features == D``).

    ViTs (``VIT_CONFIGS``):
    ``global_pool="token"`` (default): the class token after the final norm (paper default).
    ``global_pool="avg"``: the paper's ablation, average of the patch tokens *without* a final LN; timm would
    put a LayerNorm after the pool (``fc_norm``), so ``final_norm=False`` removes both norms.
    ``mlp_norm="bn"``: ViT-BN, BatchNorm before every MLP and as the final norm (see ``set_mlp_norm_``).
    ``conv_stem=True``: ViT-C, ``ConvStem`` instead of the patch projection and one block fewer (depth - 1);
    incompatible with ``stop_grad_conv1`` (which freezes the plain patch projection only).
    ``overrides`` go to timm's VisionTransformer (e.g. ``in_chans``, ``num_heads``, ``device``).

    ResNets (``RESNETS``): ``timm.create_model(name, num_classes=0)``, global average pooled features (2048-d
    for ResNet-50); ``global_pool`` must be None or "avg"; ``img_size`` is unused (any input size works);
    ``moco_init`` changes nothing: timm's default init (``zero_init_last=True``) already matches the official
    MoCo v3 ResNet (torchvision's ``zero_init_residual=True``). The ViT-only options ``pos_embed`` (other than
    the default), ``stop_grad_conv1``, ``mlp_norm`` and ``conv_stem`` raise ValueError. ``drop_path_rate`` and
    ``overrides`` go to timm.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; accepted: {', '.join(BACKBONES)}")
    if name in RESNETS:
        _check_resnet_options(name, pos_embed=pos_embed != "sincos", stop_grad_conv1=stop_grad_conv1,
                              mlp_norm=mlp_norm != "ln", conv_stem=conv_stem)
        if global_pool not in (None, "avg"):
            raise ValueError(f"{name} supports global_pool='avg' only, got {global_pool!r}")
        return timm.create_model(name, pretrained=False, num_classes=0, global_pool="avg",
                                 drop_path_rate=drop_path_rate, **overrides)

    global_pool = "token" if global_pool is None else global_pool
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
    if pos_embed not in POS_EMBEDS:
        raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}")
    if mlp_norm not in MLP_NORMS:
        raise ValueError(f"mlp_norm must be one of {MLP_NORMS}, got {mlp_norm!r}")
    if conv_stem and stop_grad_conv1:
        raise ValueError("stop_grad_conv1 freezes the plain patch projection; it cannot be combined with conv_stem")
    kwargs = _vit_kwargs(name, img_size, global_pool, drop_path_rate, conv_stem, overrides)
    model = ClassTokenViT(**{"weight_init": "moco" if moco_init else "", **kwargs})
    set_mlp_norm_(model, mlp_norm)
    if moco_init:
        moco_patch_init_(model)
    set_pos_embed_(model, pos_embed)
    if stop_grad_conv1:
        stop_grad_conv1_(model)
    return model


_TIMM_ARCH_SKIP = ("drop_path_rate", "device", "dtype")  # not architecture: left out of the timm spec


def timm_spec(name: str, **create_kwargs) -> tuple[str, dict] | None:
    """``(timm_name, kwargs)`` such that ``timm.create_model(timm_name, num_classes=0, **kwargs)`` builds the
    architecture of ``create_backbone(name, **create_kwargs)`` (same state-dict keys and shapes), or None for
    variants plain timm cannot build (``mlp_norm="bn"``, ``conv_stem=True``).

    ViTs use the timm entry point of the same name when timm has one, else ``vit_small_patch16_224``; every
    architecture argument is explicit, so the entry point's own defaults never matter. ``drop_path_rate``
    (training only), ``device`` and ``dtype`` are left out; init-only options (``moco_init``, ``pos_embed``,
    ``stop_grad_conv1``) change values, not the architecture.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; accepted: {', '.join(BACKBONES)}")
    kw = dict(create_kwargs)
    if kw.get("mlp_norm", "ln") != "ln" or kw.get("conv_stem", False):
        return None
    for key in ("stop_grad_conv1", "pos_embed", "moco_init", "mlp_norm", "conv_stem", *_TIMM_ARCH_SKIP):
        kw.pop(key, None)
    if name in RESNETS:
        kw.pop("img_size", None)
        kw["global_pool"] = "avg"
        kw.pop("num_classes", None)
        return name, kw
    img_size, global_pool = kw.pop("img_size", None), kw.pop("global_pool", None) or "token"
    kwargs = _vit_kwargs(name, img_size, global_pool, 0.0, False, kw)
    for key in ("num_classes", *_TIMM_ARCH_SKIP):
        kwargs.pop(key, None)
    return (name if timm.is_model(name) else "vit_small_patch16_224"), kwargs
