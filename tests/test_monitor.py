"""DenseKnnMonitor: measures every `every` steps, FIFO wrap-around, no self-neighbours, checkpoints, 2 ranks."""

import io

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import trainers  # noqa: F401  (compat shim before timm)
from trainers.monitor import DenseKnnMonitor

DIM = 16
CENTRES = torch.randn(20, DIM, generator=torch.Generator().manual_seed(123)) * 3


def clusters(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Features of well-separated class clusters (one centre per class, small noise)."""
    g = torch.Generator().manual_seed(seed)
    return CENTRES[labels] + 0.05 * torch.randn(len(labels), DIM, generator=g)


def batch(step: int, size: int = 32, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(classes, (size,), generator=torch.Generator().manual_seed(1000 + step))
    return clusters(labels, seed=step), labels


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        DenseKnnMonitor(bank_size=10, num_classes=5, every=0)
    with pytest.raises(ValueError, match="k"):
        DenseKnnMonitor(bank_size=10, num_classes=5, every=1, k=20)
    monitor = DenseKnnMonitor(bank_size=64, num_classes=5, every=1)
    with pytest.raises(ValueError):
        monitor.update(0, torch.randn(4, DIM), torch.zeros(3, dtype=torch.long))


def test_separated_clusters_reach_full_accuracy_measured_every_few_steps():
    monitor = DenseKnnMonitor(bank_size=200, num_classes=5, every=4, k=20)
    results = {}
    for step in range(40):
        results[step] = monitor.update(step, *batch(step))
    assert results[0] is None  # empty bank
    measured = [s for s, acc in results.items() if acc is not None]
    assert measured == list(range(4, 40, 4))  # due steps only, from the first one with >= k entries
    assert [s for s, _ in monitor.history] == measured
    assert all(results[s] == 1.0 for s in measured if s >= 8)  # bank full (200 <= 7 * 32) from step 7
    assert monitor.filled == 200

    # The monitor can fail: with shuffled bank labels the same clusters score near chance.
    monitor.bank_labels = monitor.bank_labels[torch.randperm(200, generator=torch.Generator().manual_seed(0))]
    assert monitor.update(40, *batch(40)) < 0.6


def test_bank_is_a_fifo_that_wraps_around():
    monitor = DenseKnnMonitor(bank_size=10, num_classes=100, every=1000, k=1)
    eye = torch.eye(DIM)
    for i in range(3):  # 12 entries into 10 rows; steps 1-3 are not due (every=1000)
        ids = torch.arange(4 * i, 4 * i + 4)
        assert monitor.update(i + 1, 2 * eye[ids], ids) is None
    assert monitor.filled == 10 and monitor.ptr == 2
    assert monitor.bank_labels.tolist() == [10, 11, 2, 3, 4, 5, 6, 7, 8, 9]  # the two oldest were replaced
    torch.testing.assert_close(monitor.bank, eye[monitor.bank_labels])  # stored L2-normalised
    feats, labels = monitor.contents()
    assert labels.tolist() == list(range(2, 12))  # oldest first
    torch.testing.assert_close(feats, eye[2:12])
    ptr_before = monitor.bank.data_ptr()

    # A batch larger than the bank keeps its newest bank_size entries; the buffer is reused, not reallocated.
    ids = torch.arange(0, 13)
    monitor.update(4, eye[ids], ids)
    assert monitor.bank.data_ptr() == ptr_before and monitor.filled == 10
    assert monitor.contents()[1].tolist() == list(range(3, 13))


def test_an_image_is_never_its_own_neighbour():
    monitor = DenseKnnMonitor(bank_size=100, num_classes=20, every=1, k=5)
    for step in range(4):
        monitor.update(step, *batch(step, classes=5))  # bank: classes 0-4 only
    new_labels = torch.arange(10, 20)  # ten images, each of a class the bank has never seen
    feats = clusters(new_labels, seed=99)
    assert monitor.update(10, feats, new_labels) == 0.0  # classified before being enqueued
    # Now that they are in the bank, the same features find themselves: the test above could have failed.
    assert monitor.update(11, feats, new_labels) == 1.0


def test_features_are_copied_and_detached():
    monitor = DenseKnnMonitor(bank_size=50, num_classes=5, every=1, k=1)
    feats, labels = batch(0, size=8)
    feats.requires_grad_(True)
    monitor.update(1, feats, labels)
    stored = monitor.bank[:8].clone()
    with torch.no_grad():
        feats.mul_(-1)
    labels.fill_(3)
    torch.testing.assert_close(monitor.bank[:8], stored)
    assert not monitor.bank.requires_grad and monitor.bank_labels[:8].tolist() != [3] * 8


def test_state_dict_round_trip():
    monitor = DenseKnnMonitor(bank_size=100, num_classes=5, every=3, k=10)
    for step in range(9):
        monitor.update(step, *batch(step))
    buffer = io.BytesIO()
    torch.save(monitor.state_dict(), buffer)
    buffer.seek(0)
    restored = DenseKnnMonitor(bank_size=100, num_classes=5, every=3, k=10)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert (restored.ptr, restored.filled, restored.history) == (monitor.ptr, monitor.filled, monitor.history)
    torch.testing.assert_close(restored.bank, monitor.bank, rtol=0, atol=0)
    assert torch.equal(restored.bank_labels, monitor.bank_labels)
    for step in range(9, 20):  # both carry on identically
        assert restored.update(step, *batch(step)) == monitor.update(step, *batch(step))
    torch.testing.assert_close(restored.bank, monitor.bank, rtol=0, atol=0)
    with pytest.raises(ValueError, match="bank_size"):
        DenseKnnMonitor(bank_size=50, num_classes=5, every=3).load_state_dict(monitor.state_dict())
    empty = DenseKnnMonitor(bank_size=100, num_classes=5, every=3)
    empty.load_state_dict(DenseKnnMonitor(bank_size=100, num_classes=5, every=3).state_dict())
    assert empty.bank is None and empty.update(0, *batch(0)) is None


# ---------------------------------------------------------------------------------------------- two ranks

WORLD, LOCAL, STEPS = 2, 16, 12


def _global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Noisy clusters so that accuracies are not all 1.0 and a wrong gather would show.
    labels = torch.randint(5, (WORLD * LOCAL,), generator=torch.Generator().manual_seed(step))
    noise = torch.randn(WORLD * LOCAL, DIM, generator=torch.Generator().manual_seed(500 + step))
    return CENTRES[labels] + 3.0 * noise, labels


def _run(monitor: DenseKnnMonitor, rank: int | None) -> list:
    out = []
    for step in range(STEPS):
        feats, labels = _global_batch(step)
        if rank is not None:
            feats, labels = feats[rank * LOCAL:(rank + 1) * LOCAL], labels[rank * LOCAL:(rank + 1) * LOCAL]
        out.append(monitor.update(step, feats, labels))
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        monitor = DenseKnnMonitor(bank_size=80, num_classes=5, every=2, k=10)
        accs = _run(monitor, rank)
        torch.save({"accs": accs, "state": monitor.state_dict()}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_hold_the_global_bank_and_report_the_global_accuracy(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)
    single = DenseKnnMonitor(bank_size=80, num_classes=5, every=2, k=10)
    expected = _run(single, None)
    assert any(a is not None and 0.2 < a < 1.0 for a in expected)  # informative, not saturated
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert got["accs"] == pytest.approx(expected, abs=1e-12)
        torch.testing.assert_close(got["state"]["bank"], single.bank, rtol=0, atol=0)
        assert torch.equal(got["state"]["bank_labels"], single.bank_labels)
