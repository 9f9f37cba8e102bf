"""RankMe (Garrido et al. 2023, eq. 1) against the formula written out by hand on small matrices: the effective
rank exp(entropy(p)), p_k = sigma_k / sum(sigma) + 1e-7, sigma the singular values."""

import math

import numpy as np
import pytest
import torch

from trainers.rankme import rankme


def by_hand(z: np.ndarray, eps: float = 1e-7) -> float:
    sigma = np.linalg.svd(z.astype(np.float64), compute_uv=False)
    p = sigma / sigma.sum() + eps
    return math.exp(-sum(pk * math.log(pk) for pk in p))


def test_rankme_matches_the_formula_on_a_4x3_matrix():
    z = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 0.5, -1.0], [1.5, 1.0, 1.0]])
    expected = by_hand(z)
    assert 1.0 < expected < 3.0
    # the tolerance is far below what the paper's epsilon moves the value by, so a missing or wrong epsilon fails
    assert abs(by_hand(z, eps=0.0) - expected) > 1e-8
    assert rankme(torch.tensor(z)) == pytest.approx(expected, rel=1e-10)
    # float32 input is measured in double: the same value up to the input's rounding
    assert rankme(torch.tensor(z, dtype=torch.float32)) == pytest.approx(expected, rel=1e-6)


def test_rank_one_embeddings_have_rankme_about_one():
    rng = np.random.default_rng(0)
    z = np.outer(rng.normal(size=32), rng.normal(size=8))  # every embedding on one line: collapse
    value = rankme(torch.tensor(z))
    assert value == pytest.approx(1.0, abs=1e-4)
    assert value == pytest.approx(by_hand(z), rel=1e-6)


@pytest.mark.parametrize("r", [1, 2, 5, 8])
def test_isotropic_rank_r_embeddings_have_rankme_about_r(r):
    rng = np.random.default_rng(r)
    q, _ = np.linalg.qr(rng.normal(size=(40, 8)))  # 8 orthonormal columns
    z = np.zeros((40, 8))
    z[:, :r] = 2.5 * q[:, :r]  # r equal singular values, the others zero
    assert rankme(torch.tensor(z)) == pytest.approx(r, rel=1e-4)


def test_rankme_is_invariant_to_scaling_and_bounded_by_the_shape():
    z = torch.randn(64, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    value = rankme(z)
    assert 1.0 < value <= 16.0
    for scale in (1e-3, 0.5, 7.0, 1e4):
        assert rankme(scale * z) == pytest.approx(value, rel=1e-9)
    assert rankme(z.T) == pytest.approx(value, rel=1e-9)  # the same singular values
    assert rankme(z[:, :4]) <= 4.0 + 1e-6  # at most min(N, D)


def test_all_zero_embeddings_count_as_collapsed_not_as_missing():
    assert rankme(torch.zeros(10, 4)) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_embeddings_give_nan(bad):
    z = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    z[2, 1] = bad
    assert math.isnan(rankme(z))
