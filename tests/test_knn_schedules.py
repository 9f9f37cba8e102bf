"""Learning-rate / momentum schedules and the weighted kNN classifier."""

import itertools
import math

import pytest
import torch

import trainers  # noqa: F401
from trainers.knn import knn_accuracy, knn_predict
from trainers.schedules import cosine_momentum, scaled_lr, warmup_cosine


def test_scaled_lr():
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    assert scaled_lr(1.5e-4, 256) == pytest.approx(1.5e-4)


def test_warmup_cosine_shape():
    total, warm, peak = 1000, 100, 2.4e-3
    assert warmup_cosine(0, total, warm, peak) == 0.0
    assert warmup_cosine(50, total, warm, peak) == pytest.approx(peak / 2)
    assert warmup_cosine(warm, total, warm, peak) == pytest.approx(peak)
    assert warmup_cosine(warm + (total - warm) / 2, total, warm, peak) == pytest.approx(peak / 2)
    assert warmup_cosine(total, total, warm, peak) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(total + 50, total, warm, peak) == pytest.approx(0.0, abs=1e-12)
    up = [warmup_cosine(s, total, warm, peak) for s in torch.linspace(0, warm, 37).tolist()]
    down = [warmup_cosine(s, total, warm, peak) for s in torch.linspace(warm, total, 91).tolist()]
    assert all(a < b for a, b in itertools.pairwise(up))
    assert all(a > b for a, b in itertools.pairwise(down))
    assert warmup_cosine(0.5, total, warm, peak) == pytest.approx(peak * 0.5 / warm)  # fractional steps
    assert warmup_cosine(0, total, 0, peak) == pytest.approx(peak)  # no warmup


def test_cosine_momentum():
    m0 = 0.99
    assert cosine_momentum(0.0, m0) == pytest.approx(m0)
    assert cosine_momentum(1.0, m0) == pytest.approx(1.0)
    assert cosine_momentum(0.5, m0) == pytest.approx(1 - 0.5 * (1 - m0))
    ms = [cosine_momentum(p / 20, m0) for p in range(21)]
    assert all(a < b for a, b in itertools.pairwise(ms))
    assert cosine_momentum(0.25, m0) == pytest.approx(1 - 0.5 * (1 + math.cos(math.pi / 4)) * (1 - m0))


def clusters(n_per: int, num_classes: int = 5, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123))
    labels = torch.arange(num_classes).repeat_interleave(n_per)
    return centres[labels] + 0.05 * torch.randn(len(labels), dim, generator=g), labels


def test_separated_clusters_are_classified_perfectly():
    bank, bank_labels = clusters(40, seed=0)
    feats, labels = clusters(20, seed=1)
    assert knn_accuracy(feats, labels, bank, bank_labels, num_classes=5, k=20) == 1.0
    # Shuffling the labels of the bank must break it (the test can fail).
    shuffled = bank_labels[torch.randperm(len(bank_labels), generator=torch.Generator().manual_seed(0))]
    assert knn_accuracy(feats, labels, bank, shuffled, num_classes=5, k=20) < 0.6


def test_weighting_beats_majority_vote():
    # One very close neighbour of class 1 against two farther ones of class 0 (cosines 1.0 vs 0.6).
    feats = torch.tensor([[1.0, 0.0]])
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8], [-1.0, 0.0]])
    bank_labels = torch.tensor([1, 0, 0, 1])
    # exp(1 / .07) > 2 exp(.6 / .07): the close one wins.
    assert knn_predict(feats, bank, bank_labels, num_classes=2, k=3, temperature=0.07).tolist() == [1]
    # At a large temperature all weights are ~1: plain majority, class 0.
    assert knn_predict(feats, bank, bank_labels, num_classes=2, k=3, temperature=100.0).tolist() == [0]
    # k larger than the bank is clipped: all four vote (class 1 gets e^.01 + e^-.01 < 2 e^.006 for class 0).
    assert knn_predict(feats, bank, bank_labels, num_classes=2, k=10, temperature=100.0).tolist() == [0]


def test_scale_invariance_and_chunking():
    g = torch.Generator().manual_seed(0)
    bank, feats = torch.randn(300, 8, generator=g), torch.randn(100, 8, generator=g)
    bank_labels = torch.randint(0, 7, (300,), generator=g)
    full = knn_predict(feats, bank, bank_labels, num_classes=7, chunk_size=10_000)
    assert full.shape == (100,) and full.dtype == torch.long
    torch.testing.assert_close(knn_predict(feats, bank, bank_labels, num_classes=7, chunk_size=7), full)
    # Normalised inside: scaling the rows changes nothing.
    scaled = knn_predict(feats * 5.0, bank * torch.rand(300, 1, generator=g).add(0.1), bank_labels, 7)
    torch.testing.assert_close(scaled, full)
    # Half-precision inputs: exp(sim / .07) would overflow float16 (inf scores, argmax 0) if not upcast.
    half = knn_predict(feats.half(), bank.half(), bank_labels, 7)
    assert (half == full).float().mean() > 0.95


def test_one_top_k_serves_every_k():
    from trainers.knn import knn_predict_ks

    g = torch.Generator().manual_seed(3)
    bank, feats = torch.randn(500, 16, generator=g), torch.randn(64, 16, generator=g)
    bank_labels = torch.randint(0, 7, (500,), generator=g)
    many = knn_predict_ks(feats, bank, bank_labels, 7, [1, 20, 200], chunk_size=17)
    for k, pred in many.items():
        assert torch.equal(pred, knn_predict(feats, bank, bank_labels, 7, k=k))
    assert not torch.equal(many[1], many[200])  # the k matter: the test could fail
