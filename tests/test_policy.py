"""The instability policy's verdicts on synthetic epoch summaries, and its place in the study file."""

import math

import pytest
import yaml

from study.spec import DEFAULT_STUDY, SpecError, load_spec
from trainers.config import TrainConfig
from trainers.policy import StopPolicy, verdict


def epoch(n: int, **signals) -> dict:
    healthy = {"epoch": n, "knn_top1": 0.6, "knn_top1_init": 0.58, "spike_episodes": 0.0, "knn_dip_count": 0.0,
               "epoch_knn_dip": 0.0, "nonfinite": 0.0,
               "collapsed": 0.0, "collapse_std_min": 0.02}
    return {**healthy, **signals}


def test_healthy_runs_get_no_verdict():
    # A 2.2-point drop on 2,000 test images (standard error of the difference 1.45 points: 1.64 of them at alpha
    # 0.05 is 2.4 points) is noise, not a drop; two significant dense dips in an epoch are allowed.
    history = [epoch(n, epoch_knn_dip=0.022 if n % 2 else 0.0, epoch_knn_se=0.0145, spike_episodes=2.0,
                     knn_dip_count=2.0) for n in range(1, 9)]
    assert all(verdict(history[:n], StopPolicy()) is None for n in range(1, 9))
    small = [epoch(1), epoch(2, epoch_knn_dip=0.03, epoch_knn_se=0.0145)]
    assert verdict(small, StopPolicy(max_knn_drop=0.01, alpha=0.01)) is None  # 3 points: within 2.3 s.e. (3.4)
    assert verdict([*small[:1], epoch(2, epoch_knn_dip=0.03, epoch_knn_se=0.0)], StopPolicy(max_knn_drop=0.01))


def test_nonfinite_diverges_at_once_even_in_the_grace_period():
    assert verdict([epoch(1, nonfinite=1.0)], StopPolicy(grace_epochs=3)) == (
        "diverged", "non-finite loss or gradients in epoch 1")


def test_collapse_is_its_own_status():
    status, reason = verdict([epoch(1, collapsed=1.0, collapse_std_min=1e-4)], StopPolicy())
    assert status == "collapsed" and "0.0001" in reason


@pytest.mark.parametrize(("signal", "words"), [
    ({"spike_episodes": 3.0, "max_spike_ratio": 7.14}, "3 gradient spike episodes > 2 (largest 7.1x its running "
                                                       "median)"),
    ({"knn_dip_count": 3.0, "worst_knn_dip": 0.091, "knn_dip_z": 4.2}, "dense kNN fell 9.1 points, 4.2 standard "
                                                                        "errors (3 dips > 2)"),
    ({"epoch_knn_dip": 0.08, "epoch_knn_se": 0.0145}, "kNN top-1 fell 8.0 points below its best epoch, 5.5 standard "
                                                      "errors (> 2.0)"),
    ({"knn_top1": 0.2}, "kNN top-1 20.0% is 38.0 points below random init's (> 2.0)"),
])
def test_each_signal_beyond_its_threshold_is_unstable_after_the_grace_period(signal, words):
    """The reason names the detector, its value and the noise it was judged against."""
    policy = StopPolicy(grace_epochs=1)
    assert verdict([epoch(1, **signal)], policy) is None  # in the grace period
    assert verdict([epoch(1), epoch(2, **signal)], policy) == ("unstable", f"{words} in epoch 2")


def test_patience_needs_consecutive_unstable_epochs():
    policy = StopPolicy(grace_epochs=0, patience=2)
    bad = {"spike_episodes": 5.0}
    assert verdict([epoch(1, **bad)], policy) is None
    assert verdict([epoch(1, **bad), epoch(2)], policy) is None
    assert verdict([epoch(1), epoch(2, **bad), epoch(3, **bad)], policy)[0] == "unstable"


def test_nan_signals_do_not_count_and_off_mode_says_nothing():
    assert verdict([epoch(1), epoch(2, spike_episodes=math.nan, epoch_knn_dip=math.nan)], StopPolicy()) is None
    assert verdict([epoch(1, nonfinite=1.0)], StopPolicy(mode="off")) is None
    # observe mode judges like enforce mode: the loop decides whether to act
    assert verdict([epoch(1, nonfinite=1.0)], StopPolicy(mode="observe"))[0] == "diverged"


def test_policy_sets_the_monitor_thresholds():
    options = StopPolicy(spike_threshold=4.0, dip_threshold=0.1).monitor_options()
    assert options["spike_threshold"] == 4.0 and options["dip_threshold"] == 0.1


def write(tmp_path, stopping):
    data = yaml.safe_load(DEFAULT_STUDY.read_text())
    data["stopping"] = stopping
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_study_file_sets_the_policy_and_the_trials_get_it(tmp_path):
    spec = load_spec(write(tmp_path, {"mode": "observe", "grace_epochs": 2, "max_spikes": 4}))
    assert spec.stopping == StopPolicy(mode="observe", grace_epochs=2, max_spikes=4)
    assert spec.train_config().stopping.mode == "observe"  # typed: the same StopPolicy the worker gets back
    assert TrainConfig(**spec.train_config().as_dict()).stopping == spec.stopping
    assert load_spec().stopping == StopPolicy()  # documented defaults when the section is absent


@pytest.mark.parametrize(("stopping", "expected"), [
    ({"mode": "strict"}, "stopping.mode: 'strict' is not one of: enforce, observe, off"),
    ({"max_spike": 3}, "stopping: unknown key 'max_spike'; did you mean 'max_spikes'?"),
    ({"grace_epochs": -1}, "stopping.grace_epochs: must be >= 0"),
    ({"spike_threshold": "high"}, "stopping.spike_threshold: expected float, got 'high'"),
])
def test_bad_policy_names_file_and_key(tmp_path, stopping, expected):
    path = write(tmp_path, stopping)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(err.value).startswith(str(path)) and expected in str(err.value)
