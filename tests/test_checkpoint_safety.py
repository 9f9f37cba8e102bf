"""Checkpoints hold tensors and plain Python values only and load with ``weights_only=True``: a foreign
``state.pt`` (a crafted pickle, a truncated file, some other torch file) is refused with one clear line and runs
nothing of what it pickled. A real Trainer (real FFCV files, the default callbacks) in one process, without Ray."""

import math
import pathlib
import pickle
import random
import re
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from test_trainer import TINY

from data.convert import convert_fashion_mnist
from trainers.build import build_trainer
from trainers.config import TrainConfig
from trainers.trainer import STATE_FILE, Callback, CheckpointError, Loaders, Trainer, rng_state, set_rng_state

PLAIN = (dict, OrderedDict, list, tuple, int, float, str, bool, type(None), torch.Tensor)


class NumpyValues(Callback):
    """A callback of numpy numbers (what a numpy median or mean gives): they are saved as Python ones."""

    name = "numpy_values"

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        metrics["numpy_metric"] = np.float64(0.25)

    def state_dict(self) -> dict:
        return {"count": np.int64(3), "mean": np.float32(0.5), "flag": np.bool_(True), "pairs": [(np.int32(1), 2.0)]}


class Evil:
    """Unpickled, it creates ``marker``: what a foreign checkpoint could run instead."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def not_plain(value, where="state"):
    """Where ``value`` holds anything but tensors and plain values."""
    if type(value) not in PLAIN:
        return [f"{where}: {type(value).__module__}.{type(value).__qualname__}"]
    if isinstance(value, dict):
        return [bad for k, v in value.items() for bad in not_plain(k, f"{where} key") + not_plain(v, f"{where}[{k!r}]")]
    if isinstance(value, (list, tuple)):
        return [bad for i, v in enumerate(value) for bad in not_plain(v, f"{where}[{i}]")]
    return []


def same(a, b) -> bool:
    """Equal, tensors exactly and NaN equal to NaN."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    paths = convert_fashion_mnist(tmp_path_factory.mktemp("data"))
    return TrainConfig(**TINY, train_path=str(paths["train"]), test_path=str(paths["test"]))


@pytest.fixture(scope="module")
def saved(cfg, tmp_path_factory):
    """A Trainer after its first epoch and the directory of its checkpoint."""
    trainer = build_trainer(cfg)
    trainer.callbacks.append(NumpyValues())
    next(trainer.epochs())
    directory = tmp_path_factory.mktemp("checkpoint")
    trainer.save(directory)
    return trainer, directory


def assert_refused(trainer: Trainer, path: pathlib.Path, reason: str) -> None:
    with pytest.raises(CheckpointError) as info:
        trainer.load(path.parent)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: refused: not an ssl-study checkpoint"), message
    assert re.search(reason, message), message


def test_a_real_checkpoint_is_tensors_and_plain_values_and_restores_exactly(cfg, saved):
    trainer, directory = saved
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    assert not_plain(state) == []
    assert state["epoch"] == 0 and isinstance(state["rng"]["numpy"]["key"], torch.Tensor)
    # numpy numbers in a callback's state and in the metrics come back as Python numbers of the same value.
    assert same(state["numpy_values"], {"count": 3, "mean": 0.5, "flag": True, "pairs": [(1, 2.0)]})
    assert type(state["metrics"]["numpy_metric"]) is float and state["metrics"]["numpy_metric"] == 0.25
    assert type(state["verdict"]["history"][0]["knn_top1"]) is float

    restored = build_trainer(cfg)
    restored.callbacks.append(NumpyValues())
    restored.load(directory)
    # Weights, optimiser, RNG (all three generators), callbacks and metrics: what was saved, bit for bit.
    again = restored.state_dict()
    assert same(again, state), [k for k in state if not same(again[k], state[k])]
    assert restored.epoch == trainer.epoch == 1


def test_rng_state_round_trips_exactly_through_weights_only(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # one normal of a pair drawn: the other is cached (numpy's has_gauss)
    torch.save(rng_state(), tmp_path / "rng.pt")
    draw = lambda: (random.random(), np.random.standard_normal(3).tolist(),  # noqa: E731
                    np.random.randint(0, 2**31, 4).tolist(), torch.rand(3).tolist())
    expected = draw()
    state = torch.load(tmp_path / "rng.pt", weights_only=True)
    assert state["numpy"]["has_gauss"] == 1 and state["numpy"]["key"].dtype == torch.int64
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    set_rng_state(state)
    assert draw() == expected


def test_an_fp16_grad_scalers_state_is_plain():
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    assert scaler.state_dict() and not_plain(scaler.state_dict()) == []


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_crafted_pickle_is_refused_and_runs_nothing(saved, tmp_path, writer):
    trainer, _ = saved
    marker, path = tmp_path / "marker", tmp_path / "checkpoint" / STATE_FILE
    path.parent.mkdir()
    state = {"model": Evil(marker), "optimizer": {}, "scaler": {}, "rng": {}, "epoch": 0, "knn_top1_init": 0.0,
             "metrics": {}}
    if writer == "torch.save":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state, protocol=2))
    assert_refused(trainer, path, r"\(torch\.load weights_only: UnpicklingError: Unsupported global: GLOBAL \S+")
    assert not marker.exists()
    assert trainer.epoch == 1  # refused before anything was restored
    # The file was no harmless one: read as before this change (weights_only=False), it creates the marker.
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:  # what torch.load(weights_only=False) unpickles once past its magic number
        pickle.loads(path.read_bytes())
    assert marker.exists()


def test_a_truncated_or_empty_checkpoint_is_refused(saved, tmp_path):
    trainer, directory = saved
    path = tmp_path / STATE_FILE
    data = (directory / STATE_FILE).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_refused(trainer, path, r"\(torch\.load weights_only: RuntimeError: PytorchStreamReader failed")
    path.write_bytes(data[:5000])  # cut inside the first record: the zip reader's seek fails
    assert_refused(trainer, path, r"\(torch\.load weights_only: \w+")
    path.write_bytes(b"")
    assert_refused(trainer, path, r"\(torch\.load weights_only: EOFError\)$")


def test_a_torch_file_of_something_else_is_refused(saved, tmp_path):
    trainer, _ = saved
    path = tmp_path / STATE_FILE
    torch.save({"weights": torch.zeros(3)}, path)
    assert_refused(trainer, path, r"\(no model, optimizer, scaler, rng, epoch, knn_top1_init, metrics\)$")
    torch.save([torch.zeros(3)], path)
    assert_refused(trainer, path, r"\(a list, not the trainer's state\)$")


def test_a_missing_checkpoint_is_a_file_not_found_error_naming_it(saved, tmp_path):
    trainer, _ = saved
    with pytest.raises(FileNotFoundError, match=r"nonexistent/checkpoint/state\.pt") as info:
        trainer.load(tmp_path / "nonexistent" / "checkpoint")
    assert "\n" not in str(info.value)


def test_saving_a_value_that_would_not_load_fails_at_once_naming_it(tmp_path):
    @dataclass
    class Stats:
        n: int

    class Dataclassy(Callback):
        name = "dataclassy"

        def state_dict(self) -> dict:
            return {"stats": [Stats(1)]}

    x, y = torch.zeros(8, 3, 32, 32), torch.zeros(8, dtype=torch.long)
    cfg = TrainConfig(backbone="vit_test_patch4_32", batch_size=8, mlp_dim=32, dim=16, epochs=1)
    trainer = Trainer(cfg, loaders=Loaders([(x, x, y)], [], [], 10), callbacks=[Dataclassy()])
    with pytest.raises(TypeError, match=r"checkpoint state\['dataclassy'\]\['stats'\]\[0\]: .*Stats is not a tensor"):
        trainer.save(tmp_path)
    assert not (tmp_path / STATE_FILE).exists()
