"""The Trainer in one process, without Ray: real FFCV files, the default callbacks, a callback of a test's own,
checkpoint and restore."""

import math

import pyarrow.parquet as pq
import pytest
import torch

from data.convert import convert_fashion_mnist
from trainers.build import build_trainer
from trainers.callbacks import TRACE_FILE, DenseKnn, OnlineProbe, Signals, Trace, Verdict
from trainers.config import TrainConfig
from trainers.signals import SUMMARY_KEYS
from trainers.trainer import STATE_FILE, Callback, StepState, Trainer

TINY = dict(backbone="vit_test_patch4_32", epochs=2, batch_size=64, mlp_dim=64, dim=32, warmup_epochs=0.5,
            train_subset=256, knn_bank_subset=256, knn_eval_subset=128, monitor_every=2, monitor_bank=128,
            online_probe=True, trace=True)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    paths = convert_fashion_mnist(tmp_path_factory.mktemp("data"))
    return TrainConfig(**TINY, train_path=str(paths["train"]), test_path=str(paths["test"]))


class StepCounter(Callback):
    """A new signal is one class: counts steps, reports them, and the count survives a restart."""

    name = "step_counter"

    def __init__(self) -> None:
        self.steps, self.seen_dense = 0, 0

    def on_step(self, state: StepState) -> None:
        self.steps += 1
        self.seen_dense += state.dense_knn is not None  # left by the dense kNN monitor, which runs earlier

    def on_epoch_end(self, epoch: int, metrics: dict) -> None:
        metrics["steps_so_far"] = self.steps

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]


def test_default_callbacks_in_their_order(cfg):
    trainer = build_trainer(cfg)
    assert [type(c) for c in trainer.callbacks] == [DenseKnn, Signals, OnlineProbe, Trace, Verdict]
    off = build_trainer(TrainConfig(**{**cfg.as_dict(), "monitor_every": 0, "signals_every": 0, "online_probe": False}))
    assert [type(c) for c in off.callbacks] == [Verdict]


def test_epochs_report_every_metric_and_a_restart_continues_exactly(cfg, tmp_path):
    trainer = build_trainer(cfg)
    trainer.callbacks.insert(1, StepCounter())
    first = next(trainer.epochs())
    assert first["epoch"] == 1 and first["steps_so_far"] == trainer.steps_per_epoch == 4
    assert trainer.callbacks[1].seen_dense == 1  # step 2 (at step 0 the bank was empty): the monitor ran first
    for key in ("loss", "lr", "moco_m", "knn_top1", "knn_top1_k200", "rankme", "knn_top1_init", "online_probe_top1",
                "dense_knn_last", "dense_knn_min", "images_per_s", "step_time_s", "epoch_time_s", *SUMMARY_KEYS,
                "verdict", "verdict_reason", "stopped"):
        assert key in first and first[key] is not None, key
    assert 0 <= first["knn_top1"] <= 1 and math.isfinite(first["loss"]) and first["stopped"] == 0
    trainer.save(tmp_path)
    assert pq.read_table(tmp_path / TRACE_FILE).num_rows == 4  # signals_every 1: every step of epoch 1
    state = torch.load(tmp_path / STATE_FILE, weights_only=False)
    assert state["epoch"] == 0 and state["step"] == 3 and state["step_counter"] == {"steps": 4}
    second = next(trainer.epochs())

    restarted = build_trainer(cfg)
    restarted.callbacks.insert(1, StepCounter())
    restarted.load(tmp_path)
    again = next(restarted.epochs())
    assert again["epoch"] == 2 and again["steps_so_far"] == 8
    # Same weights, optimiser, RNG, data order and augmentations: the second epoch is reproduced exactly.
    for key in ("loss", "lr", "moco_m", "knn_top1", "online_probe_top1", "dense_knn_min", "knn_top1_init"):
        assert again[key] == second[key], key
    assert list(restarted.epochs()) == []  # both epochs done


class Crash(Exception):
    """The process dies right after a mid-epoch checkpoint."""


def test_a_run_resumed_from_a_mid_epoch_checkpoint_trains_every_step_once_with_the_same_metrics(cfg, tmp_path):
    """train.checkpoint_minutes: a checkpoint inside the second epoch, after its second batch; a new Trainer
    resumes from it (the loader starts at the third batch) and the epoch ends as an uninterrupted run's."""
    timed = TrainConfig(**{**cfg.as_dict(), "checkpoint_minutes": 1e-9})  # due after every step
    whole = list(build_trainer(timed).epochs())  # no hook: no mid-epoch checkpoint

    def save_then_crash(trainer: Trainer) -> None:
        if trainer.epoch == 1 and trainer.step_in_epoch == 2:
            trainer.save(tmp_path)
            raise Crash

    crashed = build_trainer(timed)
    crashed.mid_epoch_checkpoint = save_then_crash
    with pytest.raises(Crash):
        list(crashed.epochs())
    state = torch.load(tmp_path / STATE_FILE, weights_only=False)
    assert (state["epoch"], state["step_in_epoch"], state["step"]) == (0, 2, 5)

    resumed = build_trainer(timed)
    resumed.load(tmp_path)
    (second,) = list(resumed.epochs())
    assert second["epoch"] == 2
    for key in ("loss", "lr", "moco_m", "knn_top1", "knn_top1_k200", "online_probe_top1", "dense_knn_last",
                "dense_knn_min", "knn_top1_init", *SUMMARY_KEYS):
        assert second[key] == whole[1][key] or (math.isnan(second[key]) and math.isnan(whole[1][key])), key
    (trace,) = [c for c in resumed.callbacks if isinstance(c, Trace)]
    assert [r["step"] for r in trace.rows] == list(range(8))  # every step once


def test_a_callback_that_halts_ends_the_run_after_that_epoch(cfg):
    class Halt(Callback):
        name = "halt"

        def on_step(self, state: StepState) -> None:
            state.halt = state.step == 1

    trainer = Trainer(cfg, callbacks=[Halt()])
    epochs = list(trainer.epochs())
    assert len(epochs) == 1 and trainer.epoch == 1
    assert math.isnan(epochs[0]["knn_top1"])  # weights of a halted run are not evaluated
    assert math.isnan(epochs[0]["online_probe_top1"])  # no probe callback: the column is still there


def test_config_sections_are_typed_and_validate_themselves(cfg):
    from trainers.policy import StopPolicy

    assert isinstance(cfg.stopping, StopPolicy)
    assert TrainConfig(**cfg.as_dict()).stopping == cfg.stopping  # a dict (through Ray) comes back typed
    assert cfg.views[0].crop_min == cfg.crop_min
    with pytest.raises(ValueError, match="unknown view recipe field"):
        TrainConfig(augment={"blurr_p": 0.5})
    with pytest.raises(ValueError, match=r"stopping\.mode"):
        TrainConfig(stopping={"mode": "sometimes"})


def test_compiled_step_compiles_once_though_the_momentum_changes_every_step():
    from torch._dynamo.utils import counters

    from trainers.trainer import Loaders

    x1, x2, y = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long)
    cfg = TrainConfig(backbone="vit_test_patch4_32", batch_size=8, mlp_dim=32, dim=16, epochs=1)
    trainer = Trainer(cfg, loaders=Loaders([(x1, x2, y)] * 5, [], [], 10), callbacks=[])
    torch._dynamo.reset()
    counters.clear()
    # Dynamo's guards do not depend on the backend: "eager" shows the recompiles in seconds, not minutes.
    trainer.model = torch.compile(trainer.net, backend="eager")
    momenta = [trainer.train_step(step, x1, x2, y).moco_m for step in range(5)]
    assert len(set(momenta)) == 5  # the cosine schedule moved every step
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def _evaluate_worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from trainers.evaluation import evaluate

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        backbone, bank, test = _evaluation_data()
        shard = lambda batches: [(x[rank::2], y[rank::2]) for x, y in batches]  # noqa: E731  (rank r's rows)
        torch.save(evaluate(backbone, shard(bank), shard(test), 5, k=7), f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def _evaluation_data():
    torch.manual_seed(0)
    backbone = torch.nn.Linear(12, 6)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(40, 12, generator=g), torch.randint(0, 5, (40,), generator=g)) for _ in range(3)]
    return backbone, batches[:2], batches[2:]


def test_two_workers_each_classify_their_shard_and_agree_with_one(tmp_path):
    import torch.multiprocessing as mp

    from trainers.evaluation import evaluate

    mp.spawn(_evaluate_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    backbone, bank, test = _evaluation_data()
    one = evaluate(backbone, bank, test, 5, k=7)
    for rank in range(2):
        two = torch.load(tmp_path / f"{rank}.pt")
        assert two["knn_top1"] == pytest.approx(one["knn_top1"]) and two["knn_top1_k200"] == pytest.approx(
            one["knn_top1_k200"])
        assert two["rankme"] == pytest.approx(one["rankme"], rel=1e-4)  # the same bank, gathered in rank order
    assert 0 < one["knn_top1"] < 1
