"""Two-view SSL loading throughput: the FFCV pipeline (data/) against a torchvision/PIL DataLoader with the identical
recipe, on the same images and the same cores. Not a test: run it by hand.

    .venv/bin/python bench/loader.py                # 32 px Fashion-MNIST and a 224 px JPEG folder
    .venv/bin/python bench/loader.py --only 224 --images 1000 --write-mode jpg

The 224 px set is a generated folder of 300-500 px colour JPEGs (data.image_folder.make_synthetic_folder), cached
under --cache. The torchvision side is the MoCo v3 official code's pipeline (PIL ops, PIL Gaussian blur and
ImageOps.solarize) in a DataLoader with num_workers = --workers; FFCV uses --workers threads. Prints the numba
compile time (first batch of a new loader) apart from the steady state (later epochs), and the host side of the
GPU path (device_ops: the loader crops and flips, the colour ops and normalisation are left to the device).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch

import trainers  # noqa: F401  (torchvision shim)
from data.convert import convert_fashion_mnist, read_metadata
from data.datasets import convert
from data.image_folder import make_synthetic_folder, scan
from data.loaders import ssl_loader
from data.recipes import ViewRecipe, views_for


class _PILBlur:
    """The MoCo v3 code's GaussianBlur: PIL ImageFilter.GaussianBlur(radius = sigma ~ U(lo, hi))."""

    def __init__(self, lo: float, hi: float) -> None:
        self.lo, self.hi = lo, hi

    def __call__(self, img):
        from PIL import ImageFilter
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.lo, self.hi)))


class _Solarize:
    def __init__(self, threshold: int) -> None:
        self.threshold = threshold

    def __call__(self, img):
        from PIL import ImageOps
        return ImageOps.solarize(img, self.threshold)


def torchvision_view(r: ViewRecipe, size: int, mean, std):
    """The torchvision/PIL transform of one ViewRecipe (same order and parameters as data/loaders.view_ops)."""
    from torchvision import transforms as T
    return T.Compose([
        T.RandomResizedCrop(size, scale=(r.crop_min, r.crop_max), ratio=(r.ratio_min, r.ratio_max)),
        T.RandomHorizontalFlip(r.flip_p),
        T.RandomApply([T.ColorJitter(r.brightness, r.contrast, r.saturation, r.hue)], p=r.jitter_p),
        T.RandomGrayscale(r.grayscale_p),
        T.RandomApply([_PILBlur(r.blur_sigma_min, r.blur_sigma_max)], p=r.blur_p),
        T.RandomApply([_Solarize(r.solarize_threshold)], p=r.solarize_p),
        T.ToTensor(),
        T.Normalize([m / 255 for m in mean], [s / 255 for s in std]),
    ])


class _TwoViews(torch.utils.data.Dataset):
    def __init__(self, load, n: int, label, views) -> None:
        self.load, self.n, self.label, self.views = load, n, label, views

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        img = self.load(i)
        return (*(v(img) for v in self.views), self.label(i))


def bench_torchvision(dataset, batch: int, workers: int, epochs: int) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=True)
    for _ in loader:  # warm-up epoch (worker start)
        pass
    n, start = 0, time.perf_counter()
    for _ in range(epochs):
        for *_, y in loader:
            n += len(y)
    return n / (time.perf_counter() - start)


def bench_ffcv(beton: Path, resolution: int, batch: int, workers: int, epochs: int,
               device_ops: bool = False) -> tuple[float, float]:
    """Two-view images/s of a reused loader and the compile time of a new one. ``device_ops``: the host side
    of the GPU path only (crop, flip and the colour choices; the device's work is left out, since it runs
    on the GPU beside the model)."""
    start = time.perf_counter()
    loader = ssl_loader(beton, batch_size=batch, views=views_for("moco_v3"), resolution=resolution,
                        num_workers=workers, seed=0, device_ops=device_ops)
    if device_ops:
        loader.finish = lambda *outputs: outputs
    it = iter(loader)
    next(it)
    compile_s = time.perf_counter() - start
    for _ in it:
        pass
    n, start = 0, time.perf_counter()
    for _ in range(epochs):
        for *_, y in loader:
            n += len(y)
    return n / (time.perf_counter() - start), compile_s


def report(name: str, ffcv: float, tv: float, compile_s: float, host: float) -> None:
    print(f"{name}: FFCV {ffcv:,.0f} two-view img/s | torchvision {tv:,.0f} img/s | ratio {ffcv / tv:.2f}x | "
          f"FFCV compile (first batch of a new loader) {compile_s:.1f} s | GPU path's host side (colour ops "
          f"on the device) {host:,.0f} img/s, {host / ffcv:.2f}x the full CPU pipeline", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("32", "224"), default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--images", type=int, default=1000, help="images in the generated 224 px folder")
    parser.add_argument("--images-32", type=int, default=10000, help="Fashion-MNIST images used at 32 px")
    parser.add_argument("--write-mode", choices=("raw", "jpg", "smart"), default="raw")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ssl-study" / "bench")
    args = parser.parse_args()
    torch.set_num_threads(1)
    views = views_for("moco_v3")

    if args.only in (None, "32"):
        beton = convert_fashion_mnist(args.cache / "fmnist")["train"]
        meta = read_metadata(beton)
        from PIL import Image

        from data.fashion_mnist import load_fashion_mnist
        images = load_fashion_mnist("train")[0][:args.images_32]
        padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
        tv_views = [torchvision_view(v, 32, meta["mean"], meta["std"]) for v in views]
        ds = _TwoViews(lambda i: Image.fromarray(padded[i]).convert("RGB"), len(padded), lambda i: 0, tv_views)
        from ffcv.loader import Loader  # noqa: F401  (imported for its side effects on threads before timing)
        tv = bench_torchvision(ds, args.batch, args.workers, args.epochs)
        # FFCV over the same first images: a loader restricted by indices would change nothing in the per-image
        # work, so use a file of exactly these images for an identical epoch size.
        from data.datasets import convert_arrays
        sub = convert_arrays(np.repeat(padded[..., None], 3, -1), np.zeros(len(padded), np.int64),
                             args.cache / f"fmnist_first{len(padded)}.beton", class_names=["x"], progress=False)
        ffcv, compile_s = bench_ffcv(sub, 32, args.batch, args.workers, args.epochs)
        host, _ = bench_ffcv(sub, 32, args.batch, args.workers, args.epochs, device_ops=True)
        report(f"32 px Fashion-MNIST ({len(padded)} images)", ffcv, tv, compile_s, host)

    if args.only in (None, "224"):
        folder = args.cache / f"jpeg_folder_{args.images}"
        if not (folder / "train").is_dir():
            make_synthetic_folder(folder, per_class=args.images // 10, val_per_class=2, classes=10, sizes=(300, 500))
        paths = convert(folder, args.cache / f"beton_{args.images}_{args.write_mode}", max_resolution=256,
                        write_mode=args.write_mode, workers=args.workers, progress=False)
        meta = read_metadata(paths["train"])
        from PIL import Image
        items = scan(folder).splits["train"]
        tv_views = [torchvision_view(v, 224, meta["mean"], meta["std"]) for v in views]

        def load(i: int):
            with Image.open(items[i][0]) as im:
                return im.convert("RGB")

        ds = _TwoViews(load, len(items), lambda i: items[i][1], tv_views)
        tv = bench_torchvision(ds, args.batch, args.workers, args.epochs)
        ffcv, compile_s = bench_ffcv(paths["train"], 224, args.batch, args.workers, args.epochs)
        host, _ = bench_ffcv(paths["train"], 224, args.batch, args.workers, args.epochs, device_ops=True)
        report(f"224 px JPEG folder ({len(items)} images of 300-500 px; FFCV file: max side 256, "
               f"{args.write_mode})", ffcv, tv, compile_s, host)


if __name__ == "__main__":
    main()
