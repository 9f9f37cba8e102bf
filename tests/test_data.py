"""data/: Fashion-MNIST reading, .beton writing and the FFCV loaders, on real images and real FFCV files.

numba compiles every new FFCV loader (seconds each on 2 cores), so each loader is built once per module
and the tests share what it yielded.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
from ffcv.reader import Reader
from ffcv.transforms import ToTensor

from data.convert import convert_fashion_mnist, file_checksum, read_metadata, to_rgb32, write_beton
from data.fashion_mnist import CLASSES, FASHION_MNIST_DIR, load_fashion_mnist, read_idx, split_files
from data.loaders import ViewRecipe, eval_loader, ssl_loader

# numba's dispatcher finalizers print "KeyError: (Array(uint8, ..." as loaders are collected: harmless noise.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:Exception ignored in. <finalize object:pytest.PytestUnraisableExceptionWarning"
)

N = 512  # first N real training images
SSL_BATCH = 32
SSL_SEED = 3
EVAL_BATCH = 100  # does not divide N: the last eval batch is short


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def subset() -> tuple[np.ndarray, np.ndarray]:
    """The first N Fashion-MNIST training images (as 32x32 RGB) and labels."""
    images, labels = load_fashion_mnist("train")
    rgb = to_rgb32(images[:N])
    assert len({im.tobytes() for im in rgb}) == N  # distinct, so an image identifies its index
    return rgb, labels[:N]


@pytest.fixture(scope="module")
def beton(subset, tmp_path_factory) -> Path:
    images, labels = subset
    return write_beton(images, labels, tmp_path_factory.mktemp("beton") / "sub.beton",
                       source="fashion-mnist train[:512]", classes=CLASSES)


@pytest.fixture(scope="module")
def id_beton(subset, tmp_path_factory) -> Path:
    """The same images with each label set to the sample's index, so a batch says which images it holds."""
    images, _ = subset
    return write_beton(images, np.arange(N), tmp_path_factory.mktemp("ids") / "ids.beton",
                       source="fashion-mnist train[:512], label = index", classes=[f"#{i}" for i in range(N)])


@pytest.fixture(scope="module")
def ssl_keep(subset) -> np.ndarray:
    """Indices the ssl loader is restricted to: every image not of class 0 (459: not a batch multiple)."""
    keep = np.flatnonzero(subset[1] != 0)
    assert len(keep) % SSL_BATCH != 0  # so drop_last has something to drop
    return keep


def _ssl(id_beton: Path, keep: np.ndarray, num_workers: int = 2):
    """The default views (MoCo v3's asymmetric pair, full recipe) over the id-labelled file."""
    return ssl_loader(id_beton, batch_size=SSL_BATCH, indices=keep, seed=SSL_SEED, num_workers=num_workers)


@pytest.fixture(scope="module")
def ssl_run(id_beton, ssl_keep) -> dict:
    """Two epochs of one ssl_loader: ids per epoch, the first batch (cloned), per-batch shapes and dtypes."""
    loader = _ssl(id_beton, ssl_keep)
    run: dict = {"len": len(loader), "epochs": [], "first": None, "batches": [], "by_epoch": []}
    for _ in range(2):
        ids, views = [], []
        for batch in loader:
            if run["first"] is None:
                run["first"] = tuple(t.clone() for t in batch)
            run["batches"].append([(tuple(t.shape), t.dtype) for t in batch])
            ids.append(batch[-1].clone())
            views.append(batch[0].clone())
        run["epochs"].append(torch.cat(ids).numpy())
        run["by_epoch"].append((torch.cat(views), run["epochs"][-1]))
    return run


def _unnormalise(images: torch.Tensor, meta: dict) -> np.ndarray:
    """Normalised float [B, 3, H, W] -> uint8 [B, H, W, 3] on the 0-255 scale."""
    mean = torch.tensor(meta["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"]).view(1, 3, 1, 1)
    return (images * std + mean).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def eval_run(beton) -> dict:
    """One pass of eval_loader at crop_ratio 1 (a 32 -> 32 'resize', so pixels come back exactly)."""
    loader = eval_loader(beton, batch_size=EVAL_BATCH, crop_ratio=1.0, num_workers=2)
    meta = read_metadata(beton)
    images, labels, sizes, first = [], [], [], None
    for x, y in loader:
        if first is None:
            first = (x.clone(), y.clone())
        sizes.append(len(y))
        images.append(_unnormalise(x, meta))
        labels.append(y.clone())
    return {"images": np.concatenate(images), "labels": torch.cat(labels).numpy(), "sizes": sizes,
            "first": first}


# ---------------------------------------------------------------------------------------------- Fashion-MNIST


def test_load_fashion_mnist_shapes_and_labels():
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = load_fashion_mnist(split)
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int64
        assert set(np.unique(labels)) == set(range(len(CLASSES)))
        assert images.max() > 200  # real pixels, not an empty array


def test_load_fashion_mnist_bad_split_and_missing_root(tmp_path):
    with pytest.raises(ValueError, match="train, test"):
        load_fashion_mnist("val")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist") as err:
        load_fashion_mnist("test", root=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)


def test_read_idx_rejects_corrupt_files(tmp_path):
    raw = gzip.decompress((FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes())
    bad_magic = tmp_path / "bad-magic.gz"
    bad_magic.write_bytes(gzip.compress(b"\x01\x02" + raw[2:]))
    truncated_body = tmp_path / "short-body.gz"
    truncated_body.write_bytes(gzip.compress(raw[:-10]))
    cut_gzip = tmp_path / "cut.gz"
    cut_gzip.write_bytes((FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes()[:1000])
    for path in (bad_magic, truncated_body, cut_gzip):
        with pytest.raises(ValueError, match=re.escape(str(path))):
            read_idx(path)


# ---------------------------------------------------------------------------------------------- conversion


def test_to_rgb32_pads_with_zeros_and_repeats_channels():
    images = load_fashion_mnist("test")[0][:64]
    rgb = to_rgb32(images)
    assert rgb.shape == (64, 32, 32, 3) and rgb.dtype == np.uint8
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert not rgb[:, border].any()
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()
    np.testing.assert_array_equal(rgb[:, 2:30, 2:30, 0], images)
    with pytest.raises(ValueError):
        to_rgb32(images.astype(np.float32))


def test_write_beton_raw_round_trip_is_bit_exact(beton, subset):
    images, labels = subset
    loader = Loader(str(beton), batch_size=EVAL_BATCH, num_workers=1, order=OrderOption.SEQUENTIAL,
                    drop_last=False, pipelines={"image": [SimpleRGBImageDecoder(), ToTensor()],
                                                "label": [IntDecoder(), ToTensor()]})
    got_images, got_labels = [], []
    for x, y in loader:
        got_images.append(x.numpy().copy())
        got_labels.append(y.numpy().copy())
    np.testing.assert_array_equal(np.concatenate(got_images), images)
    np.testing.assert_array_equal(np.concatenate(got_labels)[:, 0], labels)


def test_write_beton_metadata(beton, subset):
    images, _ = subset
    meta = read_metadata(beton)
    assert meta["count"] == N == Reader(str(beton)).num_samples
    assert meta["num_classes"] == 10 and meta["classes"] == list(CLASSES)
    assert meta["resolution"] == 32 and meta["write_mode"] == "raw" and meta["format_version"] == 1
    assert meta["source"] == "fashion-mnist train[:512]" and meta["checksum"] is None
    np.testing.assert_allclose(meta["mean"], images.mean(axis=(0, 1, 2)), rtol=1e-9)
    np.testing.assert_allclose(meta["std"], images.std(axis=(0, 1, 2)), rtol=1e-9)
    assert sorted(p.name for p in beton.parent.iterdir()) == ["sub.beton", "sub.json"]  # no temp files


def test_failed_write_leaves_no_beton_and_keeps_the_old_one(subset, tmp_path):
    images, labels = subset
    target = tmp_path / "bad.beton"
    for bad_images in (images.astype(np.float32), images[..., 0], images[:, :, :30]):
        with pytest.raises(ValueError):
            write_beton(bad_images, labels, target, source="bad", classes=CLASSES)
    with pytest.raises(ValueError, match="labels"):
        write_beton(images, labels + 10, target, source="bad", classes=CLASSES)
    assert list(tmp_path.iterdir()) == []

    good = write_beton(images[:50], labels[:50], target, source="good", classes=CLASSES)
    before = (good.read_bytes(), good.with_suffix(".json").read_bytes())
    with pytest.raises(ValueError):
        write_beton(images[:50], labels[:49], target, source="bad", classes=CLASSES)
    assert (good.read_bytes(), good.with_suffix(".json").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.beton", "bad.json"]


def test_read_metadata_missing_names_the_path(beton, tmp_path):
    lonely = tmp_path / "lonely.beton"
    shutil.copy(beton, lonely)
    loaders = (lambda p: ssl_loader(p, batch_size=8), lambda p: eval_loader(p, batch_size=8))
    for fail in (read_metadata, *loaders):
        with pytest.raises(FileNotFoundError, match=re.escape(str(lonely.with_suffix(".json")))):
            fail(lonely)


def test_convert_fashion_mnist_is_idempotent(tmp_path):
    paths = convert_fashion_mnist(tmp_path)
    assert set(paths) == {"train", "test"}
    for split, n in (("train", 60000), ("test", 10000)):
        meta = read_metadata(paths[split])
        assert Reader(str(paths[split])).num_samples == meta["count"] == n
        assert meta["resolution"] == 32 and meta["write_mode"] == "raw" and meta["format_version"] == 1
        assert meta["checksum"] == file_checksum(*split_files(split))
        # as before the table of sources (data/builtin.py), so existing conversions stay up to date
        assert meta["source"] == f"fashion-mnist {split} ({split_files(split)[0].name})"

    def stamps() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}

    before = stamps()
    assert len(before) == 4  # two betons, two JSONs, no temp files
    assert convert_fashion_mnist(tmp_path) == paths
    assert stamps() == before

    # A stale checksum (the source files changed) rewrites that split, and only that one.
    meta_path = paths["test"].with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["checksum"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    os.utime(paths["test"], ns=(0, 0))
    convert_fashion_mnist(tmp_path)
    after = stamps()
    assert after["fashion_mnist_test.beton"] != 0
    assert after["fashion_mnist_train.beton"] == before["fashion_mnist_train.beton"]
    assert read_metadata(paths["test"])["checksum"] != "0" * 64


# ---------------------------------------------------------------------------------------------- ssl_loader


def test_view_recipe_validates():
    with pytest.raises(ValueError):
        ViewRecipe(crop_min=0)
    with pytest.raises(ValueError):
        ViewRecipe(flip_p=1.5)


def test_ssl_batches_are_two_normalised_views_and_labels(ssl_run, id_beton):
    view_1, view_2, ids = ssl_run["first"]
    for view in (view_1, view_2):
        assert view.shape == (SSL_BATCH, 3, 32, 32) and view.dtype == torch.float32
        assert view.is_contiguous(memory_format=torch.channels_last)
        assert view.device.type == "cpu"
        # Normalised with the file's statistics: black (the padding) maps exactly to -mean/std.
        meta = read_metadata(id_beton)
        assert view.min().item() == pytest.approx(-meta["mean"][0] / meta["std"][0], abs=1e-5)
        assert abs(view.mean().item()) < 1 and 0.5 < view.std().item() < 2 and view.max().item() < 10
    assert ids.shape == (SSL_BATCH,) and ids.dtype == torch.int64
    assert not torch.equal(view_1, view_2)
    for batch in ssl_run["batches"]:  # every batch, not only the first
        assert batch == [((SSL_BATCH, 3, 32, 32), torch.float32)] * 2 + [((SSL_BATCH,), torch.int64)]


def test_ssl_epoch_reads_each_selected_image_once(ssl_run, ssl_keep):
    full_batches = len(ssl_keep) // SSL_BATCH
    assert ssl_run["len"] == full_batches
    for ids in ssl_run["epochs"]:
        assert len(ids) == full_batches * SSL_BATCH  # drop_last: the short batch is dropped
        assert len(np.unique(ids)) == len(ids)
        assert set(ids) <= set(ssl_keep)  # `indices` honoured: no class-0 image ever appears


def test_ssl_order_and_views_follow_the_seed(ssl_run, id_beton, ssl_keep):
    epoch_0, epoch_1 = ssl_run["epochs"]
    assert not np.array_equal(epoch_0, epoch_1)
    # A second loader (another numba compile) with the same seed, on one thread instead of two, yields the
    # same images in the same order with the same views: every random draw is a hash of (seed, epoch,
    # sample, view) (data/augment.py). Another seed gives other views.
    again = _ssl(id_beton, ssl_keep, num_workers=1)
    first = [t.clone() for t in next(iter(again))]
    for got, want in zip(first, ssl_run["first"], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # Resuming at epoch 1 gives epoch 1's batches, views included.
    again.next_epoch = 1
    x1, _, ids = next(iter(again))
    np.testing.assert_array_equal(ids.numpy(), epoch_1[:SSL_BATCH])
    torch.testing.assert_close(x1, ssl_run["by_epoch"][1][0][:SSL_BATCH], rtol=0, atol=0)


def test_ssl_views_change_with_the_epoch(ssl_run):
    """The same image gets different views in different epochs (the epoch is part of every key)."""
    (a, ids_a), (b, ids_b) = ssl_run["by_epoch"]
    common = np.intersect1d(ids_a, ids_b)
    assert len(common) > 0
    for i in common[:5]:
        ia, ib = np.flatnonzero(ids_a == i)[0], np.flatnonzero(ids_b == i)[0]
        assert not torch.equal(a[ia], b[ib])


def _first_batch(loader) -> list[torch.Tensor]:
    return [t.clone() for t in next(iter(loader))]


def test_each_view_depends_only_on_its_recipe_and_index(ssl_run, id_beton, ssl_keep):
    """All views come from one decode per image (SeededRandomResizedCrops), yet view v is exactly what it
    would be with any other recipes beside it: nothing of one view leaks into another."""
    from data.recipes import views_for
    a, b = views_for("moco_v3")  # ssl_run's views
    c = ViewRecipe(crop_min=0.5, flip_p=1.0, grayscale_p=1.0)  # every op of c differs from a's
    kw = dict(batch_size=SSL_BATCH, indices=ssl_keep, seed=SSL_SEED)
    a_b = ssl_run["first"]
    a_only = _first_batch(ssl_loader(id_beton, views=(a,), **kw))
    c_b_a = _first_batch(ssl_loader(id_beton, views=(c, b, a), **kw))
    assert len(a_only) == 2 and len(c_b_a) == 4
    torch.testing.assert_close(a_only[0], a_b[0], rtol=0, atol=0)  # view 0 without view 1
    torch.testing.assert_close(c_b_a[1], a_b[1], rtol=0, atol=0)  # view 1 beside another view 0
    for labels in (a_only[-1], c_b_a[-1]):  # same images in the same order
        torch.testing.assert_close(labels, a_b[-1], rtol=0, atol=0)
    assert not torch.equal(c_b_a[0], a_b[0]) and not torch.equal(c_b_a[2], a_b[1])


@pytest.fixture(scope="module")
def colour_beton(tmp_path_factory) -> Path:
    """256 colourful 32 px images (smooth gradients plus noise): hue and saturation act on them, as they do not
    on Fashion-MNIST's grays."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32] / 32.0
    phases = rng.uniform(0, 2 * np.pi, (256, 3, 1, 1))
    images = 127.5 + 100 * np.sin(2 * np.pi * (xx + 0.7 * yy)[None, None] + phases)
    images = np.clip(images + rng.normal(0, 12, images.shape), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return write_beton(np.ascontiguousarray(images), np.zeros(256, np.int64),
                       tmp_path_factory.mktemp("colour") / "colour.beton", source="gradients", classes=["x"])


def test_device_ops_give_the_same_bits(eval_run, colour_beton, beton):
    """The GPU path run on the CPU: the loader only crops and flips, uint8 views and each image's colour
    choices go to the device, which jitters, grays, blurs, solarizes and normalises them (MoCo v3's and
    SimCLR's full recipes, on colourful images). The same float32 bits as the loader doing everything, in the
    same channels-last layout. (FFCV compiled its stages with fast-math, which moved a few values by a level
    on the host: data/augment.py compiles them strictly.)"""
    from data.recipes import views_for
    views = (*views_for("moco_v3"), views_for("simclr")[0])
    ssl = [_first_batch(ssl_loader(colour_beton, batch_size=64, views=views, seed=SSL_SEED, device_ops=on))
           for on in (False, True)]
    evaluation = _first_batch(eval_loader(beton, batch_size=EVAL_BATCH, crop_ratio=1.0, device_ops=True))
    for host, device in (ssl, (eval_run["first"], evaluation)):
        assert len(host) == len(device)
        for h, d in zip(host, device, strict=True):
            assert h.dtype == d.dtype and h.shape == d.shape
            torch.testing.assert_close(d, h, rtol=0, atol=0)
        for d in device[:-1]:
            assert d.is_contiguous(memory_format=torch.channels_last) and d.dtype == torch.float32


def test_ffcv_compiles_its_stages_without_fast_math():
    from ffcv.pipeline.compiler import Compiler

    import data.ffcv_compile  # noqa: F401  (replaces Compiler.compile)
    assert "fastmath" not in Compiler.compile(lambda x: x).targetoptions


# The two-view loader of ssl_run, built in a fresh process; prints what numba compiled (not loaded from its
# cache) while it yielded its first batch.
COMPILED_IN_A_NEW_PROCESS = """
import sys, numpy as np
from numba.core import event
from data.loaders import ssl_loader
compiled = []
class Compiled(event.Listener):
    def on_start(self, e): compiled.append(e.data["dispatcher"].py_func.__qualname__)
    def on_end(self, e): pass
event.register("numba:compile", Compiled())
next(iter(ssl_loader(sys.argv[1], batch_size=int(sys.argv[2]), indices=np.load(sys.argv[3]), seed=int(sys.argv[4]))))
print("\\n".join(compiled))
"""


def test_a_new_process_loads_the_two_view_stages_from_numbas_cache(ssl_run, id_beton, ssl_keep, tmp_path):
    """ssl_run compiled this loader here and filled the cache: a new process (a trial's worker) compiles only
    the decoder (it calls C through ctypes, which numba does not cache) and FFCV's generated glue, and adds no
    cache entry (a dispatcher's random UUID in a cached closure's key would add one per process)."""
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    entries = lambda: sorted(p.name for p in (root / "data" / "__pycache__").glob("*.nb[ic]"))  # noqa: E731
    cache = entries()
    np.save(tmp_path / "keep.npy", ssl_keep)
    out = subprocess.run([sys.executable, "-c", COMPILED_IN_A_NEW_PROCESS, str(id_beton), str(SSL_BATCH),
                          str(tmp_path / "keep.npy"), str(SSL_SEED)], capture_output=True, text=True, check=True,
                         cwd=root).stdout.split()
    assert any("seeded_op" in q for q in cache)  # the stages are cached at all
    assert not [q for q in out if "seeded_op" in q or "normalize" in q or q.endswith(".read")], out
    assert any(q.endswith(".decode") for q in out)  # the listener does see compilations
    assert entries() == cache


# ---------------------------------------------------------------------------------------------- eval_loader


def test_eval_loader_reads_in_file_order(eval_run, subset):
    images, labels = subset
    assert eval_run["sizes"] == [EVAL_BATCH] * (N // EVAL_BATCH) + [N % EVAL_BATCH]  # no drop_last
    np.testing.assert_array_equal(eval_run["labels"], labels)
    np.testing.assert_array_equal(eval_run["images"], images)  # images paired with their labels
    x, y = eval_run["first"]
    assert x.shape == (EVAL_BATCH, 3, 32, 32) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert y.shape == (EVAL_BATCH,) and y.dtype == torch.int64


# ---------------------------------------------------------------------------------------------- distributed


def _shard_worker(rank: int, world: int, init_file: str, beton: str, out_dir: str) -> None:
    """One rank: read its eval_loader shard and save the recovered uint8 images."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        loader = eval_loader(Path(beton), batch_size=64, crop_ratio=1.0, num_workers=1, distributed=True)
        meta = read_metadata(Path(beton))
        images = np.concatenate([_unnormalise(x, meta) for x, _ in loader])
        np.save(Path(out_dir) / f"rank{rank}.npy", images)
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_read_disjoint_shards(beton, subset, tmp_path):
    world = 2
    mp.spawn(_shard_worker, args=(world, str(tmp_path / "init"), str(beton), str(tmp_path)), nprocs=world)
    index_of = {im.tobytes(): i for i, im in enumerate(subset[0])}
    shards = [[index_of[im.tobytes()] for im in np.load(tmp_path / f"rank{r}.npy")] for r in range(world)]
    assert [len(s) for s in shards] == [N // world] * world
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(N))
