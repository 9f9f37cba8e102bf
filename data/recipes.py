"""Augmentation recipes as data: one small frozen dataclass per view, chosen per method, overridable.

Values follow ../shared/reference/recipe.md (MoCo v3 paper and official code; BYOL; SimCLR) and
torchvision's semantics for each transform (ColorJitter factor ranges, RandomResizedCrop scale / ratio).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ViewRecipe:
    """How one augmented view of an image is made, in this order (the MoCo v3 code's order):

    RandomResizedCrop(scale=(crop_min, crop_max), ratio=(ratio_min, ratio_max)) -> horizontal flip (flip_p)
    -> RandomApply(ColorJitter(brightness, contrast, saturation, hue), jitter_p) -> RandomGrayscale(grayscale_p)
    -> RandomApply(GaussianBlur(sigma ~ U(blur_sigma_min, blur_sigma_max)), blur_p)
    -> RandomApply(Solarize(solarize_threshold), solarize_p) -> normalise.

    The defaults are crop + flip only (every other op off); see ``views_for`` for the methods' recipes. Each
    op is a file of data/ops/, listed there in this order, which reads its fields here (its ``args``).
    """

    crop_min: float = 0.08  # RandomResizedCrop scale=(crop_min, crop_max); 0.08 for ViT in MoCo v3
    crop_max: float = 1.0
    ratio_min: float = 3 / 4
    ratio_max: float = 4 / 3
    flip_p: float = 0.5
    jitter_p: float = 0.0
    brightness: float = 0.0  # factor ~ U(max(0, 1 - b), 1 + b), as torchvision ColorJitter
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0  # factor ~ U(-hue, hue), hue <= 0.5
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma_min: float = 0.1
    blur_sigma_max: float = 2.0
    solarize_p: float = 0.0
    solarize_threshold: int = 128  # PIL ImageOps.solarize's default: values >= 128 are inverted

    def __post_init__(self) -> None:
        def check(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"ViewRecipe: {what}, got {self}")

        check(0 < self.crop_min <= self.crop_max <= 1, "need 0 < crop_min <= crop_max <= 1")
        check(0 < self.ratio_min <= self.ratio_max, "need 0 < ratio_min <= ratio_max")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            check(0 <= getattr(self, name) <= 1, f"{name} must be in [0, 1]")
        for name in ("brightness", "contrast", "saturation"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0")
        check(0 <= self.hue <= 0.5, "hue must be in [0, 0.5]")
        check(0 < self.blur_sigma_min <= self.blur_sigma_max, "need 0 < blur_sigma_min <= blur_sigma_max")
        check(0 <= self.solarize_threshold <= 256, "solarize_threshold must be in [0, 256]")


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ViewRecipe))

# MoCo v3 / BYOL: ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, grayscale 0.2, blur p 1.0 / 0.1, solarize p 0 / 0.2.
_MOCO_COMMON = dict(flip_p=0.5, jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
                    grayscale_p=0.2, blur_sigma_min=0.1, blur_sigma_max=2.0)
MOCO_V3_VIEWS: tuple[ViewRecipe, ViewRecipe] = (
    ViewRecipe(**_MOCO_COMMON, blur_p=1.0, solarize_p=0.0),
    ViewRecipe(**_MOCO_COMMON, blur_p=0.1, solarize_p=0.2),
)
# SimCLR: colour strength 0.8 -> ColorJitter(0.8, 0.8, 0.8, 0.2) p 0.8, grayscale 0.2, blur p 0.5, both views.
SIMCLR_VIEW = ViewRecipe(flip_p=0.5, jitter_p=0.8, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2,
                         grayscale_p=0.2, blur_p=0.5, blur_sigma_min=0.1, blur_sigma_max=2.0)
RECIPES: dict[str, tuple[ViewRecipe, ...]] = {
    "moco_v3": MOCO_V3_VIEWS,
    "byol": MOCO_V3_VIEWS,  # BYOL's own asymmetric recipe, which MoCo v3 adopted
    "simclr": (SIMCLR_VIEW, SIMCLR_VIEW),
}


def _apply(view: ViewRecipe, overrides: Mapping, where: str) -> ViewRecipe:
    if not isinstance(overrides, Mapping):
        raise ValueError(f"view overrides{where} must be a dict of ViewRecipe fields, got {overrides!r}")
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown view recipe field(s) {', '.join(map(repr, unknown))}{where}: "
                         f"accepted fields are {', '.join(FIELDS)}")
    for name, value in overrides.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"view recipe field {name!r}{where} must be a number, got {value!r}")
    return dataclasses.replace(view, **overrides)


def views_for(method: str, crop_min: float = 0.08,
              overrides: Mapping | Sequence[Mapping] | None = None) -> tuple[ViewRecipe, ...]:
    """The views of ``method`` ("moco_v3", "byol": the asymmetric pair; "simclr": SimCLR's symmetric pair).

    ``crop_min`` sets RandomResizedCrop's lower scale on every view. ``overrides`` maps ViewRecipe field
    names to values for every view, or is a list with one such dict per view (applied after crop_min).
    Unknown methods or fields, wrong types and out-of-range values raise ValueError naming them.
    """
    if method not in RECIPES:
        raise ValueError(f"unknown method {method!r} for view recipes: accepted values are {', '.join(RECIPES)}")
    views = tuple(dataclasses.replace(v, crop_min=crop_min, crop_max=max(crop_min, v.crop_max))
                  for v in RECIPES[method])
    if overrides is None:
        return views
    if isinstance(overrides, Mapping):
        return tuple(_apply(v, overrides, "") for v in views)
    if isinstance(overrides, (str, bytes)) or not isinstance(overrides, Sequence) or len(overrides) != len(views):
        raise ValueError(f"view overrides must be one dict for all views or a list of {len(views)} dicts "
                         f"(one per view), got {overrides!r}")
    return tuple(_apply(v, o, f" (view {i + 1})") for i, (v, o) in enumerate(zip(views, overrides, strict=True)))
