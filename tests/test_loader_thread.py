"""The loader never hangs and never crashes its process (data/loader_thread.py, data/ffcv_compile.py; issue 25).

Real FFCV files (the checkout's Fashion-MNIST), real numba compiles, real processes. The soak of 50 processes
and the cold-cache run live in the `cluster` tests (minutes each); here the warm-cache run of 20 processes.
"""

import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import SimpleRGBImageDecoder
from ffcv.loader import OrderOption
from ffcv.pipeline.operation import Operation

from data.datasets import prepare
from data.loader_thread import GuardedLoader, LoaderError
from data.loaders import eval_loader, ssl_loader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import soak  # noqa: E402


@pytest.fixture(scope="module")
def data_dir() -> Path:
    prepare("fashion_mnist", ROOT / "datasets")
    return ROOT / "datasets"


class _FailFrom(Operation):
    """Passes images through until the batch holding sample ``start``, then raises in the loader's thread."""

    def __init__(self, start: int) -> None:
        super().__init__()
        self.start = start

    def declare_state_and_memory(self, previous_state):
        return previous_state, None

    def generate_code(self):
        start = self.start

        def fail_from(images, _, indices):
            if indices[-1] >= start:
                raise ValueError("the loader's work killed on purpose")
            return images

        fail_from.with_indices = True
        return fail_from


def test_a_loader_whose_thread_dies_raises_in_the_consumer_with_its_error_and_file(data_dir):
    beton = data_dir / "fashion_mnist_test.beton"
    loader = GuardedLoader(str(beton), batch_size=100, num_workers=1, order=OrderOption.SEQUENTIAL,
                           pipelines={"image": [SimpleRGBImageDecoder(), _FailFrom(250)], "label": [IntDecoder()]})
    epoch = iter(loader)
    assert next(epoch)[0].shape == (100, 32, 32, 3) and next(epoch)[0].shape == (100, 32, 32, 3)
    start = time.monotonic()
    with pytest.raises(LoaderError) as raised:
        next(epoch)  # the batch of samples 200-299 raised in the thread; FFCV's own iterator waited forever
    assert time.monotonic() - start < 5
    message = str(raised.value)
    assert str(beton) in message and "ValueError: the loader's work killed on purpose" in message
    assert isinstance(raised.value.__cause__, ValueError)
    assert not epoch.is_alive()


def test_an_epoch_left_mid_way_stops_its_thread_when_closed(data_dir):
    loader = ssl_loader(data_dir / "fashion_mnist_train.beton", batch_size=64, seed=3)
    epoch = iter(loader)
    next(epoch)
    thread = epoch.epoch
    assert thread.is_alive()  # FFCV's thread runs ahead of the consumer
    epoch.close()
    assert not thread.is_alive()
    x, *_ = next(iter(loader))  # the loader still gives the next epoch
    assert x.shape == (64, 3, 32, 32) and np.isfinite(x.numpy()).all()


def test_one_process_holds_several_loaders_with_the_same_cached_stages(data_dir):
    """Three two-view loaders and two evaluation loaders alive at once, built and read in an interleaved
    order: each stage is compiled or loaded once (data/ffcv_compile.py) and every loader keeps working, also
    after the others are collected."""
    import gc

    train, test = data_dir / "fashion_mnist_train.beton", data_dir / "fashion_mnist_test.beton"
    loaders = [ssl_loader(train, batch_size=32, seed=s) for s in (0, 1, 0)]
    loaders += [eval_loader(test, batch_size=128), eval_loader(test, batch_size=128)]
    firsts = [[t.clone() for t in next(iter(loader))] for loader in loaders]
    np.testing.assert_array_equal(firsts[0][0].numpy(), firsts[2][0].numpy())  # same seed, same views
    assert not np.array_equal(firsts[0][0].numpy(), firsts[1][0].numpy())
    np.testing.assert_array_equal(firsts[3][0].numpy(), firsts[4][0].numpy())
    del loaders[1:3], firsts
    gc.collect()
    for loader in loaders:
        assert sum(batch[-1].shape[0] for batch in loader) > 0


def test_twenty_short_processes_on_a_warm_cache_all_exit_zero(data_dir):
    """Each builds a two-view and an evaluation loader, reads 3 batches of each, leaves its epochs mid-way
    and exits: issue 25 saw 3 of 20 hang at their first batch and a crash at exit."""
    soak.soak(1, data_dir, seed=99)  # the cache is warm
    results = soak.soak(20, data_dir, seed=1)
    assert [(rc, why) for rc, _, why in results if rc != 0] == []


@pytest.mark.cluster
def test_soak_fifty_processes_on_a_warm_cache(data_dir):
    soak.soak(1, data_dir, seed=98)
    results = soak.soak(50, data_dir, seed=2)
    assert [(rc, why) for rc, _, why in results if rc != 0] == []


@pytest.mark.cluster
def test_twenty_processes_on_a_cold_cache_all_exit_zero(data_dir):
    """Every process compiles every stage into an empty numba cache of its own."""
    results = soak.soak(20, data_dir, cold=True, seed=3)
    assert [(rc, why) for rc, _, why in results if rc != 0] == []
