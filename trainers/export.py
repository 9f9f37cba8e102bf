"""Export a trained backbone as safetensors weights plus a JSON sidecar that says how to rebuild it.

``export_backbone(backbone, name, path, **create_kwargs)`` writes ``path`` (``*.safetensors``: the backbone's
``state_dict``, buffers such as BN running statistics and the frozen sin-cos ``pos_embed`` included) and
``path.with_suffix(".json")``. Both are written atomically (a temporary file in the same directory, fsync,
``os.replace``), so a reader never sees a partial file.

Standard backbones (plain ViT, ResNet-50) load into plain timm 1.0.31 with no code from this project. For
``vit_test_patch4_32`` exported from ``create_backbone("vit_test_patch4_32")``, the sidecar's ``timm_name`` /
``timm_kwargs`` give::

    model = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=0,
        img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0, qkv_bias=True,
        global_pool="token", checkpoint_path=str(path))

``checkpoint_path`` makes timm call ``timm.models.load_checkpoint(model, path)``, which reads ``*.safetensors``
with ``safetensors.torch.load_file`` and loads with ``strict=True``; calling
``timm.models.load_checkpoint(model, str(path))`` on a model built without ``checkpoint_path`` is the same.
The pretrained-weights route also works, but only stays strict if the overlay says ``num_classes=0`` (timm
otherwise sees 0 != 1000 classes and loads with ``strict=False``, silently ignoring missing keys)::

    timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=0))

For ResNet-50: ``timm.create_model("resnet50", num_classes=0, global_pool="avg", checkpoint_path=str(path))``.

Non-standard variants (ViT-BN ``mlp_norm="bn"``, ``conv_stem=True``) have modules plain timm cannot build: their
sidecar has ``timm_name: null`` and only ``load_exported`` (which rebuilds them with ``create_backbone``) can load
them. Only weights travel: ``requires_grad`` is not part of a state dict, so a plain timm model has a trainable
``pos_embed`` / patch projection even where the export had them frozen; ``load_exported`` freezes them again
(the sidecar lists the frozen parameters).
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from data.atomic import atomic_path, write_text
from trainers.backbones import BACKBONES, create_backbone, timm_spec

FORMAT = "ssl-study-backbone"
VERSION = 1


def sidecar_path(path: Path) -> Path:
    """The JSON sidecar next to ``path``: ``backbone.safetensors`` -> ``backbone.json``."""
    return Path(path).with_suffix(".json")


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_same_architecture(backbone: nn.Module, reference: nn.Module, what: str) -> None:
    got, want = _shapes(backbone), _shapes(reference)
    if got == want:
        return
    missing, unexpected = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    wrong = sorted(k for k in want.keys() & got.keys() if want[k] != got[k])
    raise ValueError(
        f"backbone does not match {what}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
        f"shape mismatch {[(k, got[k], want[k]) for k in wrong[:5]]}; pass the create_backbone kwargs it was "
        f"built with"
    )


def export_backbone(backbone: nn.Module, name: str, path: Path, **create_kwargs) -> Path:
    """Write ``backbone``'s weights to ``path`` (must end in ``.safetensors``) and the JSON sidecar.

    ``name`` and ``create_kwargs`` are what ``create_backbone`` was called with; they are checked against the
    backbone (state-dict keys and shapes of a rebuild on the meta device) and must be JSON-serialisable.
    The sidecar holds ``backbone``, ``create_kwargs``, ``timm_name`` / ``timm_kwargs`` (null for variants plain
    timm cannot build), ``num_features`` and ``frozen`` (parameters with requires_grad False). Returns ``path``.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"export path must end in .safetensors (timm picks the loader by suffix), got {path}")
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; accepted: {', '.join(BACKBONES)}")
    create_kwargs = {k: v for k, v in create_kwargs.items() if k not in ("device", "dtype")}
    try:
        json.dumps(create_kwargs)
    except TypeError as err:
        raise ValueError(f"create_kwargs must be JSON-serialisable to be exported: {err}") from None

    spec = timm_spec(name, **create_kwargs)
    with torch.device("meta"):
        if spec is None:
            reference, what = create_backbone(name, **create_kwargs), f"create_backbone({name!r}, ...)"
        else:
            reference = timm.create_model(spec[0], pretrained=False, num_classes=0, **spec[1])
            what = f"timm.create_model({spec[0]!r}, ...)"
    _check_same_architecture(backbone, reference, what)

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in backbone.state_dict().items()}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "backbone": name,
        "create_kwargs": create_kwargs,
        "timm_name": None if spec is None else spec[0],
        "timm_kwargs": None if spec is None else spec[1],
        "num_features": int(getattr(backbone, "num_features", 0)),
        "frozen": sorted(n for n, p in backbone.named_parameters() if not p.requires_grad),
        "weights": path.name,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_text(sidecar_path(path), json.dumps(meta, indent=2) + "\n")
    return path


def load_exported(path: Path) -> nn.Module:
    """Rebuild an exported backbone and load its weights with ``strict=True``; returned in eval mode.

    Standard backbones: ``timm.create_model(timm_name, pretrained=False, num_classes=0, **timm_kwargs)``.
    Variants (``timm_name`` null): ``create_backbone(backbone, **create_kwargs)``. Parameters that were frozen at
    export get ``requires_grad=False`` again.
    """
    path = Path(path)
    meta = json.loads(sidecar_path(path).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{sidecar_path(path)} is not a {FORMAT} sidecar")
    if meta["timm_name"] is None:
        model = create_backbone(meta["backbone"], **meta["create_kwargs"])
    else:
        model = timm.create_model(meta["timm_name"], pretrained=False, num_classes=0, **meta["timm_kwargs"])
    model.load_state_dict(load_file(str(path)), strict=True)
    params = dict(model.named_parameters())
    for name in meta["frozen"]:
        params[name].requires_grad = False
    return model.eval()
