"""Instability signals: spike detector, layer groups, gradient norms, collapse std and the monitor (synthetic series
and tiny models)."""

import io
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import trainers  # noqa: F401  (compat shim before timm)
from trainers.backbones import create_backbone
from trainers.methods import build_method
from trainers.signals import (
    SUMMARY_KEYS,
    Event,
    InstabilityMonitor,
    SpikeDetector,
    collapse_std,
    grad_norms,
    layer_groups,
)


def method(backbone: str = "vit_test_patch4_32", name: str = "moco_v3", **options) -> nn.Module:
    torch.manual_seed(0)
    return build_method(name, create_backbone(backbone, **options), dim=16, mlp_dim=32, temperature=0.2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def moco() -> nn.Module:
    return method()


# ------------------------------------------------------------------------------------------------ SpikeDetector


def test_spike_detector_finds_planted_spikes():
    rng = np.random.default_rng(0)
    series = rng.lognormal(0.0, 0.2, 1000)
    planted = {150, 333, 500, 721, 960}
    for i in planted:
        series[i] *= 10
    detector = SpikeDetector(window=50, threshold=3.0, warmup=10)
    found = {i: r for i, v in enumerate(series) if (r := detector.update(v)) is not None}
    assert set(found) == planted
    assert all(4 < r < 25 for r in found.values()), found  # 10 x noise / median


def test_spike_detector_no_false_positives_on_noise():
    detector = SpikeDetector(threshold=3.0)
    series = np.random.default_rng(1).lognormal(0.0, 0.25, 5000) * 1e-3  # the scale does not matter
    assert [i for i, v in enumerate(series) if detector.update(v) is not None] == []
    assert 0.5 < detector.last_ratio < 2


def test_spike_detector_warmup_and_nonfinite():
    detector = SpikeDetector(window=5, threshold=3.0, warmup=3)
    assert detector.update(1.0) is None and detector.update(100.0) is None  # warming up: nothing judged
    assert math.isnan(detector.last_ratio)
    for value in (float("nan"), float("inf"), -float("inf")):
        assert detector.update(value) is None
    assert list(detector.values) == [1.0, 100.0]  # non-finite values never enter the window
    detector.update(1.0)
    assert detector.update(10.0) == pytest.approx(10.0)  # median of [1, 100, 1] is 1
    for _ in range(10):
        detector.update(float("nan"))
    assert len(detector.values) == 4
    with pytest.raises(ValueError):
        SpikeDetector(window=5, warmup=6)


# ---------------------------------------------------------------------------------------------------- groups


def assert_disjoint(groups):
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids))
    assert all(groups.values())
    assert all(p.requires_grad for params in groups.values() for p in params)


def test_layer_groups_vit(moco):
    groups = layer_groups(moco)
    assert list(groups) == ["patch_embed", "first_block", "last_block", "heads"]  # depth 2: no middle block
    assert_disjoint(groups)
    bb = moco.backbone
    assert {id(p) for p in groups["patch_embed"]} == {id(bb.patch_embed.proj.weight), id(bb.patch_embed.proj.bias)}
    assert {id(p) for p in groups["first_block"]} == {id(p) for p in bb.blocks[0].parameters()}
    assert {id(p) for p in groups["last_block"]} == {id(p) for p in bb.blocks[-1].parameters()}
    heads = {id(p) for m in (moco.projector, moco.predictor) for p in m.parameters()}
    assert {id(p) for p in groups["heads"]} == heads
    momentum = {id(p) for m in (moco.momentum_backbone, moco.momentum_projector) for p in m.parameters()}
    assert not momentum & {id(p) for params in groups.values() for p in params}

    nano = layer_groups(method("vit_nano_patch4_32", name="simclr"))  # depth 4; SimCLR has no predictor
    assert list(nano) == ["patch_embed", "first_block", "middle_block", "last_block", "heads"]
    assert_disjoint(nano)


def test_layer_groups_unwraps_and_bare_backbone(moco):
    wrapper = nn.Module()  # DDP-like: the module under .module
    wrapper.module = moco
    assert list(layer_groups(wrapper)) == list(layer_groups(moco))
    assert list(layer_groups(moco.backbone)) == ["patch_embed", "first_block", "last_block"]
    with pytest.raises(ValueError):
        layer_groups(nn.Linear(2, 2))


def test_layer_groups_frozen_patch_projection_falls_back_to_first_block():
    groups = layer_groups(method(stop_grad_conv1=True))
    assert list(groups) == ["first_block", "last_block", "heads"]
    assert_disjoint(groups)


def test_layer_groups_conv_stem():
    model = method("vit_nano_patch4_32", conv_stem=True)
    groups = layer_groups(model)
    assert next(iter(groups)) == "patch_embed"
    assert {id(p) for p in groups["patch_embed"]} == {id(p) for p in model.backbone.patch_embed.parameters()}
    assert_disjoint(groups)


def test_layer_groups_resnet():
    model = method("resnet50")
    groups = layer_groups(model)
    assert list(groups) == ["stem", "layer1", "layer2", "layer3", "layer4", "heads"]
    assert_disjoint(groups)
    bb = model.backbone
    assert {id(p) for p in groups["stem"]} == {id(p) for m in (bb.conv1, bb.bn1) for p in m.parameters()}


# ------------------------------------------------------------------------------------------ norms, collapse


def test_grad_norms_matches_hand_computation(moco):
    moco.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    x = torch.randn(8, 3, 32, 32)
    loss, _ = moco(x, x.flip(-1), 0.99)
    loss.backward()
    groups = layer_groups(moco)
    norms = grad_norms(groups)
    assert list(norms) == list(groups)
    for name, params in groups.items():
        expected = torch.cat([p.grad.flatten() for p in params]).norm().item()
        assert norms[name] == pytest.approx(expected, rel=1e-5)
        assert expected > 0
    for p in groups["heads"]:  # a group without gradients is left out
        p.grad = None
    assert "heads" not in grad_norms(groups)
    moco.zero_grad(set_to_none=True)


def test_collapse_std():
    torch.manual_seed(0)
    d = 64
    healthy = collapse_std(torch.randn(4096, d))
    assert healthy == pytest.approx(1 / math.sqrt(d), rel=0.05)
    assert collapse_std(torch.randn(4096, d) * 100 + 3) == pytest.approx(healthy, rel=0.1)  # scale-free
    assert collapse_std(torch.randn(1, d).expand(256, d)) < 1e-6
    assert collapse_std(torch.randn(1, d) + 1e-3 * torch.randn(256, d)) < 0.01 / math.sqrt(d)


# ---------------------------------------------------------------------------------------------------- monitor


class Planted:
    """Synthetic steps: each group's gradient is a fixed random tensor times a per-step factor (lognormal noise,
    times whatever is planted), so its norm is known; features are Gaussian unless given."""

    def __init__(self, model: nn.Module, seed: int = 0):
        self.model, self.groups = model, layer_groups(model)
        self.gen = torch.Generator().manual_seed(seed)
        self.base = {id(p): torch.randn(p.shape, generator=self.gen) for ps in self.groups.values() for p in ps}
        self.rng = np.random.default_rng(seed)

    def state(self, step, epoch=0, loss=None, planted=None, features=None):
        planted = planted or {}
        for name, params in self.groups.items():
            factor = self.rng.lognormal(0.0, 0.1) * planted.get(name, 1.0)
            for p in params:
                p.grad = self.base[id(p)] * factor
        loss = self.rng.lognormal(0.0, 0.05) if loss is None else loss
        feats = torch.randn(32, 64, generator=self.gen) if features is None else features
        return SimpleNamespace(epoch=epoch, step=step, loss=torch.tensor(loss), features=feats,
                               labels=torch.zeros(32, dtype=torch.long), model=self.model, lr=1e-3, moco_m=0.99)


def run(monitor, planted_steps, steps, start=0, plan=None):
    """``steps`` synthetic steps from ``start``; ``plan`` maps a step to keyword arguments of ``Planted.state``."""
    events = []
    for step in range(start, start + steps):
        events += monitor.on_step(planted_steps.state(step, **(plan or {}).get(step, {})))
    return events


def test_monitor_grad_spike_in_patch_projection(moco):
    monitor, steps = InstabilityMonitor(), Planted(moco)
    assert run(monitor, steps, 30) == []
    events = monitor.on_step(steps.state(30, planted={"patch_embed": 100.0}))
    assert [(e.kind, e.layer, e.step) for e in events] == [("grad_spike", "patch_embed", 30)]
    assert 50 < events[0].magnitude < 200
    assert monitor.last_ratios["patch_embed"] == pytest.approx(events[0].magnitude)
    assert set(monitor.last_norms) == {"patch_embed", "first_block", "last_block", "heads"}
    assert monitor.episodes[-1]["first_layers"] == ["patch_embed"]


def test_monitor_first_layer_lead(moco):
    monitor, steps = InstabilityMonitor(lead_window=50), Planted(moco)
    planted = {30: {"planted": {"patch_embed": 20.0}}, 31: {"planted": {"patch_embed": 20.0}},
               37: {"planted": {"last_block": 20.0}}, 38: {"planted": {"last_block": 20.0}}}
    events = run(monitor, steps, 60, plan=planted)
    assert [(e.step, e.layer) for e in events] == [(30, "patch_embed"), (31, "patch_embed"), (37, "last_block"),
                                                  (38, "last_block")]
    assert monitor.leads == [7]
    assert monitor.episodes == [{"start_step": 30, "epoch": 0, "first_layers": ["patch_embed"],
                                 "layers": {"patch_embed": 30, "last_block": 37}, "lead": 7}]
    # a second episode where the last block leads: a negative lead
    run(monitor, steps, 10, start=200, plan={205: {"planted": {"last_block": 20.0}},
                                          208: {"planted": {"patch_embed": 20.0}}})
    assert monitor.leads == [7, -3]
    summary = monitor.epoch_summary()
    assert summary["first_layer_lead_steps"] == 2.0  # median of 7 and -3
    assert summary["spike_count"] == 6 and summary["spike_episodes"] == 2 and summary["first_layer_led_frac"] == 0.5
    assert summary["max_spike_ratio"] > 10


def test_monitor_nonfinite_and_loss_spikes(moco):
    monitor, steps = InstabilityMonitor(), Planted(moco)
    run(monitor, steps, 20)
    events = run(monitor, steps, 4, start=20, plan={20: {"loss": 10.0}, 22: {"loss": float("nan")},
                                                 23: {"loss": float("nan")}})
    assert [(e.kind, e.layer, e.step) for e in events] == [("loss_spike", "loss", 20), ("nonfinite", "loss", 22)]
    assert events[0].magnitude == pytest.approx(10.0, rel=0.2) and math.isnan(events[1].magnitude)
    events = run(monitor, steps, 2, start=24, plan={24: {"planted": {"first_block": float("inf")}}})
    assert [(e.kind, e.layer, e.step) for e in events] == [("nonfinite", "first_block", 24)]
    summary = monitor.epoch_summary()
    assert summary["nonfinite"] == 1 and summary["loss_spike_count"] == 1 and summary["spike_count"] == 0


def test_monitor_every_checks_every_loss_but_norms_on_measured_steps(moco):
    monitor, steps = InstabilityMonitor(every=5), Planted(moco)
    events = run(monitor, steps, 10, plan={3: {"loss": float("nan")}, 6: {"planted": {"patch_embed": float("nan")}}})
    assert [(e.kind, e.layer, e.step) for e in events] == [("nonfinite", "loss", 3)]  # found at step 5
    assert monitor.on_step(steps.state(11, loss=float("inf"))) == []
    assert [(e.kind, e.step) for e in monitor.flush()] == [("nonfinite", 11)]


def test_monitor_collapse(moco):
    monitor, steps = InstabilityMonitor(collapse_threshold=0.1), Planted(moco)
    collapsed = torch.ones(32, 64) + 1e-4 * torch.randn(32, 64)
    events = run(monitor, steps, 6, plan={3: {"features": collapsed}, 4: {"features": collapsed}})
    assert [(e.kind, e.layer, e.step) for e in events] == [("collapse", "features", 3)]  # entering collapse only
    summary = monitor.epoch_summary()
    assert summary["collapsed"] == 1 and summary["collapse_std_min"] == pytest.approx(events[0].magnitude)
    run(monitor, steps, 3, start=6)
    summary = monitor.epoch_summary()
    assert summary["collapsed"] == 0 and summary["collapse_std_min"] == pytest.approx(1 / 8, rel=0.3)


def test_monitor_knn_dips():
    """A dense dip of 30 points at batch 64 (binomial noise 6 points) is one event; the epoch kNN's drop counts
    beyond its noise on 2,000 test images (2.3 standard errors of the difference: 3.4 points at 70%)."""
    monitor = InstabilityMonitor(knn_window=3, dense_tests=10, dense_images=64, knn_images=2000)
    events = [monitor.on_dense_knn(10 * i, 0, v) for i, v in enumerate([0.7] * 15 + [0.4] * 4 + [0.7] * 20)]
    dips = [e for e in events if e is not None]
    assert [(e.step, e.layer) for e in dips] == [(160, "dense_knn")]  # the second low value: one dip, once
    assert dips[0].magnitude == pytest.approx(0.2)  # two of the three pooled values 30 points low
    assert monitor.on_epoch_knn(100, 0, 0.70) is None
    assert monitor.on_epoch_knn(200, 1, 0.68) is None  # 2 points: within the noise
    assert monitor.on_epoch_knn(300, 2, 0.64).layer == "epoch_knn"  # 6 points: beyond it
    summary = monitor.epoch_summary()
    assert summary["knn_dip_count"] == 1 and summary["worst_knn_dip"] == pytest.approx(0.3)
    assert summary["knn_dip_z"] > 5
    assert summary["epoch_knn_dip"] == pytest.approx(0.06)
    assert summary["epoch_knn_se"] == pytest.approx(math.sqrt(2 * 0.7 * 0.3 / 2000))
    assert [e.kind for e in monitor.events] == ["knn_dip"] * 2


def test_epoch_summary_keys_and_reset(moco):
    monitor, steps = InstabilityMonitor(), Planted(moco)
    run(monitor, steps, 15, plan={12: {"planted": {"heads": 50.0}}})
    monitor.on_dense_knn(14, 0, 0.5)
    summary = monitor.epoch_summary()
    assert tuple(summary) == SUMMARY_KEYS
    assert all(isinstance(v, float) for v in summary.values())
    assert summary["spike_count"] == 1 and math.isnan(summary["worst_knn_dip"])  # one value: no test yet
    assert summary["first_layer_led_frac"] == 0.0  # the episode began in the heads
    empty = monitor.epoch_summary()
    assert empty["spike_count"] == 0 and empty["nonfinite"] == 0 and empty["collapsed"] == 0
    for key in ("max_spike_ratio", "first_layer_lead_steps", "worst_knn_dip", "collapse_std_min"):
        assert math.isnan(empty[key])
    assert len(monitor.events) == 1  # events are kept across epochs


def test_state_dict_round_trip(moco):
    kw = {24: {"planted": {"patch_embed": 30.0}}, 28: {"planted": {"last_block": 30.0}}, 33: {"loss": 50.0}}
    a, steps_a = InstabilityMonitor(every=2), Planted(moco, seed=3)
    run(a, steps_a, 30, plan=kw)
    a.on_dense_knn(29, 0, 0.6)
    a.on_step(steps_a.state(30))  # leaves nothing pending (step 30 is measured) ...
    a.on_step(steps_a.state(31, loss=float("nan")))  # ... this one is pending: state_dict checks it
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = InstabilityMonitor(every=2)
    b.load_state_dict(torch.load(buffer, weights_only=True))  # plain Python values only
    assert repr(b.events) == repr(a.events) and b.leads == a.leads == [4] and b.episodes == a.episodes  # NaN != NaN
    last = b.events[-1]
    assert (last.step, last.epoch, last.kind, last.layer) == (31, 0, "nonfinite", "loss") and math.isnan(last.magnitude)
    assert isinstance(last, Event)
    # both continue identically on the same steps
    steps_b = Planted(moco, seed=3)
    for steps in (steps_a, steps_b):
        steps.rng, steps.gen = np.random.default_rng(7), torch.Generator().manual_seed(7)
    tail = {33: {"loss": 50.0}, 34: {"planted": {"first_block": 30.0}}}
    new_a, new_b = run(a, steps_a, 10, start=32, plan=tail), run(b, steps_b, 10, start=32, plan=tail)
    assert new_a == new_b and [e.kind for e in new_a] == ["loss_spike", "grad_spike"]
    for i, v in enumerate([0.6] * 24 + [0.1] * 3):  # the dense windows were restored: the same dip, the same step
        assert a.on_dense_knn(40 + i, 0, v) == b.on_dense_knn(40 + i, 0, v)
    assert a.events[-1].kind == "knn_dip" and a.events[-1].step == b.events[-1].step
    assert str(a.state_dict()) == str(b.state_dict())  # str: NaN != NaN
    assert str(a.epoch_summary()) == str(b.epoch_summary())


def test_monitor_on_real_steps():
    model = method()
    monitor = InstabilityMonitor(warmup=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(0)
    for step in range(4):
        x = torch.randn(16, 3, 32, 32)
        loss, features = model(x, x + 0.1 * torch.randn_like(x), 0.99)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        monitor.on_step(SimpleNamespace(epoch=0, step=step, loss=loss.detach(), features=features,
                                        labels=torch.zeros(16), model=model, lr=1e-3, moco_m=0.99))
        opt.step()
    assert set(monitor.last_norms) == {"patch_embed", "first_block", "last_block", "heads"}
    assert all(math.isfinite(v) and v > 0 for v in monitor.last_norms.values())
    assert 0 < monitor.last_collapse_std < 1
    summary = monitor.epoch_summary()
    assert summary["nonfinite"] == 0 and summary["collapsed"] == 0
