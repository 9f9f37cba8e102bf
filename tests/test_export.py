"""Backbone export: safetensors + JSON sidecar, loadable by plain timm, atomic writes."""

import importlib
import json

import pytest
import torch

import trainers  # noqa: F401  (compat shim before timm)
from trainers import export
from trainers.backbones import create_backbone
from trainers.export import export_backbone, load_exported, sidecar_path

timm = importlib.import_module("timm")  # after the shim; an import statement would be sorted above it

TEST = "vit_test_patch4_32"


def images(b: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def trained(model: torch.nn.Module) -> torch.nn.Module:
    """A few optimiser steps (and BN statistics) so that the weights are not just an init."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for i in range(2):
        opt.zero_grad()
        model(images(seed=i)).square().mean().backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def assert_same_outputs(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> None:
    """Bit-identical features (the same weights through the same timm code); the pooled output to fp32 rounding,
    since a ClassTokenViT computes its last block for the class token only (trainers/backbones.py)."""
    a.eval(), b.eval()
    if hasattr(a, "forward_features"):
        assert torch.equal(a.forward_features(x), b.forward_features(x))
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)


def test_vit_round_trip_through_plain_timm(tmp_path):
    torch.manual_seed(0)
    kwargs = dict(pos_embed="sincos", moco_init=True, stop_grad_conv1=True)
    model = trained(create_backbone(TEST, **kwargs))
    path = export_backbone(model, TEST, tmp_path / "vit.safetensors", **kwargs)
    assert path == tmp_path / "vit.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit.json", "vit.safetensors"]  # no temp file left

    meta = json.loads(sidecar_path(path).read_text())
    assert meta["timm_name"] == "vit_small_patch16_224" and meta["num_features"] == 64
    assert meta["timm_kwargs"] == dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4,
                                       mlp_ratio=4.0, qkv_bias=True, global_pool="token")
    assert {"pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"} <= set(meta["frozen"])

    x = images(2, seed=5)
    # The documented plain-timm call: strict load through timm's own checkpoint loader.
    plain = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=4,
                              embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0, qkv_bias=True, global_pool="token",
                              checkpoint_path=str(path))
    assert_same_outputs(model, plain, x)
    # The pretrained-weights route, kept strict by num_classes=0 in the overlay.
    overlay = timm.create_model(meta["timm_name"], pretrained=True, num_classes=0,
                                pretrained_cfg_overlay=dict(file=str(path), num_classes=0), **meta["timm_kwargs"])
    assert_same_outputs(model, overlay, x)
    torch.testing.assert_close(overlay.pos_embed, model.pos_embed, rtol=0, atol=0)

    loaded = load_exported(path)
    assert not loaded.training and not loaded.pos_embed.requires_grad
    assert not loaded.patch_embed.proj.weight.requires_grad and loaded.blocks[0].attn.qkv.weight.requires_grad
    assert_same_outputs(model, loaded, x)


def test_avg_pool_learned_pos_embed_round_trip(tmp_path):
    torch.manual_seed(0)
    kwargs = dict(global_pool="avg", pos_embed="learned", drop_path_rate=0.1)
    model = trained(create_backbone(TEST, **kwargs))
    path = export_backbone(model, TEST, tmp_path / "avg.safetensors", **kwargs)
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["timm_kwargs"]["final_norm"] is False and "drop_path_rate" not in meta["timm_kwargs"]
    plain = timm.create_model(meta["timm_name"], num_classes=0, checkpoint_path=str(path), **meta["timm_kwargs"])
    assert_same_outputs(model, plain, images(2, seed=5))


def test_export_checks_kwargs_path_and_serialisability(tmp_path):
    model = create_backbone(TEST, img_size=28, in_chans=1)
    with pytest.raises(ValueError, match="does not match"):
        export_backbone(model, TEST, tmp_path / "m.safetensors")  # built with img_size=28, in_chans=1
    with pytest.raises(ValueError, match=r"\.safetensors"):
        export_backbone(model, TEST, tmp_path / "m.pt", img_size=28, in_chans=1)
    with pytest.raises(ValueError, match="JSON"):
        export_backbone(model, TEST, tmp_path / "m.safetensors", img_size=28, in_chans=1, act_layer=torch.nn.ReLU)
    assert list(tmp_path.iterdir()) == []

    path = export_backbone(model, TEST, tmp_path / "m.safetensors", img_size=28, in_chans=1)
    x = torch.randn(2, 1, 28, 28)
    assert_same_outputs(model, load_exported(path), x)


def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    torch.manual_seed(0)
    first = create_backbone(TEST)
    path = export_backbone(first, TEST, tmp_path / "vit.safetensors")
    before = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_backbone(create_backbone(TEST), TEST, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit.json", "vit.safetensors"]


@pytest.mark.parametrize("variant", [dict(mlp_norm="bn"), dict(conv_stem=True)])
def test_variants_need_load_exported(tmp_path, variant):
    torch.manual_seed(0)
    model = trained(create_backbone(TEST, **variant))
    path = export_backbone(model, TEST, tmp_path / "v.safetensors", **variant)
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["timm_name"] is None and meta["timm_kwargs"] is None and meta["create_kwargs"] == variant
    assert_same_outputs(model, load_exported(path), images(2, seed=7))


def test_resnet50_round_trip(tmp_path):
    torch.manual_seed(0)
    model = create_backbone("resnet50")
    model.train()
    with torch.no_grad():
        model(images(2))  # move the BN running statistics away from their init
    path = export_backbone(model, "resnet50", tmp_path / "r50.safetensors")
    meta = json.loads(sidecar_path(path).read_text())
    assert (meta["timm_name"], meta["timm_kwargs"], meta["num_features"]) == ("resnet50", {"global_pool": "avg"}, 2048)
    x = images(2, seed=3)
    assert_same_outputs(model, load_exported(path), x)
    plain = timm.create_model("resnet50", num_classes=0, global_pool="avg", checkpoint_path=str(path))
    assert_same_outputs(model, plain, x)
