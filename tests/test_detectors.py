"""Detectors that know their own noise (trainers/detectors.py): false alarms within the stated rate on stationary
series, and real dips and spikes caught. Seeded, with enough epochs that the checks can fail."""

import math

import numpy as np
import pytest

from trainers.detectors import DipDetector, SpikeDetector, epoch_noise, t_critical, z_critical

ALPHA = 0.01
EPOCHS = 1500  # at 1% per epoch an honest detector alarms in about 15; the bound below allows 2x that


def alarm_epochs(alarms: list[bool], tests: int) -> float:
    per_epoch = np.array(alarms).reshape(-1, tests)[2:]  # the first epochs fill the windows
    return per_epoch.any(axis=1).mean()


@pytest.mark.parametrize("batch", [32, 256, 4096])
def test_dense_dips_false_alarms_within_the_rate_at_every_batch(batch):
    rng, tests = np.random.default_rng(batch), 16
    detector = DipDetector(window=5, alpha=ALPHA, tests=tests)
    values = rng.binomial(batch, 0.7, tests * EPOCHS) / batch  # a healthy plateau: binomial noise only
    rate = alarm_epochs([detector.update(v, batch) is not None for v in values], tests)
    assert rate <= 2 * ALPHA, rate  # 2x: the estimate's own noise at 15 expected alarms


@pytest.mark.parametrize("batch", [32, 256, 4096])
def test_a_dip_of_three_times_the_noise_is_caught_within_a_few_measurements(batch):
    rng, noise = np.random.default_rng(1), math.sqrt(0.7 * 0.3 / batch)
    dip = 3 * noise  # at batch 4096: 2.2 points, past the 1-point smallest drop
    caught = []
    for _trial in range(20):
        detector = DipDetector(window=5, alpha=ALPHA, tests=16)
        for v in rng.binomial(batch, 0.7, 40) / batch:
            detector.update(v, batch)
        low = rng.binomial(batch, 0.7 - dip, 10) / batch
        caught.append(next((i + 1 for i, v in enumerate(low) if detector.update(v, batch)), None))
    assert all(c is not None and c <= 10 for c in caught) and sorted(caught)[len(caught) // 2] <= 4, caught


def test_a_rising_series_never_dips_and_one_dip_counts_once():
    detector = DipDetector(window=3, alpha=ALPHA, tests=10)
    assert not any(detector.update(p, 64) for p in np.linspace(0.2, 0.8, 60))
    found = [detector.update(p, 64) for p in [0.8] * 15 + [0.3] * 6 + [0.8] * 15]
    assert sum(f is not None for f in found) == 1


@pytest.mark.parametrize("log_sd", [0.1, 0.5, 1.0])
def test_spikes_false_alarms_within_the_rate_also_for_heavy_tailed_layers(log_sd):
    """A healthy layer whose norm varies by e^0.5 = 1.6x per step crosses 3x its median every ~70 steps: the
    old ratio rule flagged it; the robust scale does not."""
    rng, tests = np.random.default_rng(int(10 * log_sd)), 100
    detector = SpikeDetector(window=50, threshold=3.0, warmup=10, alpha=ALPHA, tests=tests)
    values = rng.lognormal(0.0, log_sd, tests * 600)
    rate = alarm_epochs([detector.update(v) is not None for v in values], tests)
    assert rate <= 2 * ALPHA, rate


def test_planted_spikes_are_found_in_a_quiet_and_a_noisy_layer():
    rng = np.random.default_rng(0)
    for log_sd, factor in ((0.2, 10.0), (0.5, 30.0)):
        series = rng.lognormal(0.0, log_sd, 1000)
        planted = {150, 333, 500, 721, 960}
        for i in planted:
            series[i] *= factor
        detector = SpikeDetector(window=50, threshold=3.0, warmup=10, alpha=ALPHA, tests=100)
        assert {i for i, v in enumerate(series) if detector.update(v) is not None} == planted


def test_quantiles():
    assert z_critical(0.01, 1) == pytest.approx(2.326, abs=1e-3)
    assert z_critical(0.01, 100) == pytest.approx(3.719, abs=1e-3)
    for df in (10, 30):  # Student's t's upper tail beyond the quantile, integrated numerically: 1e-4
        t = t_critical(z_critical(1e-4, 1), df)
        x = np.linspace(t, t + 2000, 2_000_001)
        density = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2)) \
            * (1 + x ** 2 / df) ** (-(df + 1) / 2)
        assert np.trapezoid(density, x) == pytest.approx(1e-4, rel=0.05), df
    assert epoch_noise(0.7, 2000) == pytest.approx(0.01449, abs=1e-5) and epoch_noise(0.7, 0) == 0.0


def test_dip_detector_state_round_trip():
    a, b = DipDetector(window=3, tests=10), DipDetector(window=3, tests=10)
    for p in [0.7] * 14:
        a.update(p, 64)
    b.load_state_dict(a.state_dict())
    assert [a.update(p, 64) for p in (0.3, 0.3, 0.3)] == [b.update(p, 64) for p in (0.3, 0.3, 0.3)]
