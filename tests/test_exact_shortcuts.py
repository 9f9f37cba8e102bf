"""The training step's two shortcuts compute what the plain path computes (loss and every gradient, to fp32
rounding), for MoCo v3, BYOL and SimCLR, in one process and in two:

- both views through a LayerNorm ViT as one batch, or regrouped in chunks (CPU: ``views.cpu_chunk``); backbones
  with BatchNorm keep per-view statistics;
- the last block of a class-token ViT run for the class token only (``ClassTokenViT``; not for ViT-BN or avg);
- the heads' Linear layers once over both views, their BatchNorms per view (``views.head_views``).
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import trainers  # noqa: F401  (compat shim before timm)
from trainers.backbones import ClassTokenViT, create_backbone
from trainers.methods import METHODS, build_method
from trainers.sync_batchnorm import convert_sync_batchnorm

WORLD, BATCH = 2, 8


def model(method: str, fused: bool, backbone: str = "vit_test_patch4_32", class_token: bool = True,
          chunk: int | None = None, **options) -> torch.nn.Module:
    """``method`` over ``backbone``, both views together if ``fused`` (``chunk`` samples per forward), the
    class-token last block if ``class_token`` (in the base backbone and its momentum twin alike)."""
    torch.manual_seed(0)
    net = build_method(method, create_backbone(backbone, **options), dim=16, mlp_dim=32, temperature=0.2)
    net.fuse_views, net.view_chunk = fused, chunk
    for m in net.modules():
        if isinstance(m, ClassTokenViT):
            m.class_token_only = m.class_token_only and class_token
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


def assert_close(a: torch.Tensor, b: torch.Tensor, msg: str = "") -> None:
    """Equal to fp32 rounding relative to the tensor's scale: the class token's gradient (a sum over the batch
    and every token's path) is ~100 where most are ~0.1-1, and its small entries differ by ~1e-4 absolute;
    a real error (a token or a term left out) is off by 1e-2 of the scale or more."""
    torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5 * max(1.0, b.abs().max().item()), msg=msg)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        assert_close(a[key], b[key], msg=key)


@pytest.mark.parametrize("method", METHODS)
def test_heads_over_both_views_equal_a_pass_per_view(method):
    import copy

    from trainers.methods.views import head_views

    net = model(method, fused=True)
    heads = [net.projector] + ([net.predictor] if hasattr(net, "predictor") else [])
    twins = copy.deepcopy(heads)
    g = torch.Generator().manual_seed(2)
    h1, h2 = (torch.randn(BATCH, net.backbone.num_features, generator=g) for _ in range(2))
    x1, x2 = head_views(heads, h1, h2)

    def through(x):
        for head in twins:
            x = head(x)
        return x

    y1, y2 = through(h1), through(h2)
    assert_close(x1, y1), assert_close(x2, y2)
    (x1 * x2.flip(0)).sum().backward()  # a loss that mixes the views, as the contrastive losses do
    (y1 * y2.flip(0)).sum().backward()
    ours, plain = torch.nn.ModuleList(heads), torch.nn.ModuleList(twins)
    # running mean and variance (each BN saw each view once), then every gradient
    pairs = {**{k: (v, plain.state_dict()[k]) for k, v in ours.state_dict().items()},
             **{f"grad.{k}": (p.grad, plain.get_parameter(k).grad) for k, p in ours.named_parameters()}}
    assert len(pairs) > 10 and all(b is not None for _, b in pairs.values())
    for key, (a, b) in pairs.items():
        assert_close(a.float(), b.float(), msg=key)


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("method", METHODS)
def test_fused_views_equal_per_view_views_in_one_process(method, chunk):
    """One forward over both views (chunk None: the tiny test ViT fits one CPU chunk), or chunks of 3 samples
    (the last one short)."""
    auto = model(method, fused=True, chunk=chunk)
    assert build_method(method, create_backbone("vit_test_patch4_32"), dim=16, mlp_dim=32,
                        temperature=0.2).fuse_views  # on by default for a LayerNorm ViT
    assert_same(step(auto, *views()), step(model(method, fused=False), *views()))


def test_cpu_chunks_keep_a_blocks_activations_in_the_last_level_cache():
    from trainers.methods.views import CHUNK_BYTES_MAX, LAST_LEVEL_CACHE_BYTES, cpu_chunk, last_level_cache_bytes

    vit = create_backbone("vit_tiny_patch4_32")  # 65 tokens, MLP width 768: 200 KB of activations per sample
    assert cpu_chunk(vit) == max(1, min(LAST_LEVEL_CACHE_BYTES // 5, CHUNK_BYTES_MAX) // (65 * 768 * 4))
    assert last_level_cache_bytes() == LAST_LEVEL_CACHE_BYTES >= 2**20
    assert cpu_chunk(create_backbone("resnet50")) is None


@pytest.mark.parametrize(("backbone", "options"), [("vit_test_patch4_32", {"mlp_norm": "bn"}), ("resnet50", {})])
def test_backbones_with_batchnorm_keep_per_view_statistics(backbone, options):
    net = build_method("moco_v3", create_backbone(backbone, **options), dim=16, mlp_dim=32, temperature=0.2)
    assert not net.fuse_views


@pytest.mark.parametrize("method", METHODS)
def test_class_token_last_block_equals_the_full_block_in_one_process(method):
    shortcut = model(method, fused=True)
    vits = [m for m in shortcut.modules() if isinstance(m, ClassTokenViT)]  # the backbone and its EMA twin
    assert len(vits) == (1 if method == "simclr" else 2) and all(vit.class_token_only for vit in vits)
    assert_same(step(shortcut, *views()), step(model(method, fused=True, class_token=False), *views()))


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.2])
def test_class_token_forward_equals_timms(drop_path_rate):
    """Against timm's own forward, in train mode (stochastic depth draws the same per-sample masks) and eval."""
    torch.manual_seed(0)
    vit = create_backbone("vit_test_patch4_32", drop_path_rate=drop_path_rate)
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    r = torch.randn(4, vit.num_features)  # a random linear loss: out.square().sum() of a LayerNorm is ~constant
    for train in (True, False):
        vit.train(train)
        outputs = []
        for forward in (vit.forward, lambda x: super(ClassTokenViT, vit).forward(x)):
            torch.manual_seed(1)
            out = forward(x)
            grads = torch.autograd.grad((out * r).sum(), [x, *(p for p in vit.parameters() if p.requires_grad)])
            outputs.append([out, *grads])
        assert len(outputs[0]) == len(outputs[1]) > 10
        for a, b in zip(*outputs, strict=True):
            assert_close(a, b)


@pytest.mark.parametrize("options", [{"mlp_norm": "bn"}, {"global_pool": "avg"}])
def test_class_token_shortcut_only_where_it_is_exact(options):
    """ViT-BN's BatchNorm statistics cover every token, and avg pooling reads the patch tokens: both run timm's
    forward (the patch tokens' outputs do change the result there)."""
    torch.manual_seed(0)
    vit = create_backbone("vit_test_patch4_32", **options).train()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(vit(x), super(ClassTokenViT, vit).forward(x), rtol=0, atol=0)
    if "global_pool" in options:
        assert not vit.class_token_only


def _worker(rank: int, init_file: str, out_dir: str, method: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        out = {}
        for name, fused, class_token in (("both", True, True), ("plain", False, False)):
            net = convert_sync_batchnorm(model(method, fused, class_token=class_token, chunk=3), torch.device("cpu"))
            ddp = torch.nn.parallel.DistributedDataParallel(net)
            result = step(ddp, *views(rank, WORLD))
            out[name] = {k.replace("module.", ""): v for k, v in result.items()}
        torch.save(out, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", METHODS)
def test_both_shortcuts_equal_the_plain_step_in_two_processes(tmp_path, method):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), method), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        out = torch.load(tmp_path / f"{rank}.pt")
        assert_same(out["both"], out["plain"])
