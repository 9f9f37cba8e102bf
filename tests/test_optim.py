"""The optimisers follow the recipes: checked step by step against the official update rules."""

import copy

import pytest
import torch
from torch import nn

import trainers  # noqa: F401  (compat shim before timm)
from trainers.optim import create_optimizer


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3, bias=False))


def set_grads(m: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in m.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def official_lars_step(m: nn.Module, state: dict, lr: float, wd: float, momentum=0.9, trust=0.001) -> None:
    """moco-v3/moco/optimizer.py LARS.step, verbatim in substance."""
    with torch.no_grad():
        for p in m.parameters():
            dp = p.grad
            if p.ndim > 1:
                dp = dp.add(p, alpha=wd)
                param_norm, update_norm = torch.norm(p), torch.norm(dp)
                one = torch.ones_like(param_norm)
                q = torch.where(param_norm > 0.0,
                                torch.where(update_norm > 0, (trust * param_norm / update_norm), one), one)
                dp = dp.mul(q)
            mu = state.setdefault(p, torch.zeros_like(p))
            mu.mul_(momentum).add_(dp)
            p.add_(mu, alpha=-lr)


@pytest.mark.parametrize("wd", [1e-6, 0.0, 0.5])  # 0.5: where timm's trust ratio |g| + wd|w| differs
def test_lars_matches_the_official_update(wd):
    ours, ref = model(), model()
    opt = create_optimizer(ours, "lars", lr=0.3, weight_decay=wd)
    state: dict = {}
    for step in range(3):
        set_grads(ours, step), set_grads(ref, step)
        opt.step()
        official_lars_step(ref, state, lr=0.3, wd=wd)
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_lars_trust_ratio_is_the_official_one_not_timms():
    """By hand, one matrix: ratio = 0.001 * |w| / |g + wd * w|, then p -= lr * ratio * (g + wd * w)."""
    w = nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))  # |w| = 5
    w.grad = torch.tensor([[1.0, 0.0], [0.0, -2.0]])
    opt = create_optimizer(nn.ParameterList([w]), "lars", lr=1.0, weight_decay=0.5)
    d = torch.tensor([[2.5, 0.0], [0.0, 0.0]])  # g + 0.5 w, |d| = 2.5
    expected = torch.tensor([[3.0, 0.0], [0.0, 4.0]]) - 0.001 * 5 / 2.5 * d
    opt.step()
    torch.testing.assert_close(w.detach(), expected)  # timm's: 0.001 * 5 / (sqrt(5) + 2.5) * d


def test_adamw_decays_every_tensor_by_default_and_only_matrices_on_request():
    for exclude, bias_decayed in [(None, True), (True, False)]:
        m = model()
        with torch.no_grad():
            m[0].bias.fill_(1.0)
        opt = create_optimizer(m, "adamw", lr=0.1, weight_decay=0.5, exclude_1d=exclude)
        assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()  # zero gradient: only decoupled decay moves the weights, by lr * wd
        assert torch.allclose(m[0].bias, torch.full_like(m[0].bias, 1 - 0.05)) == bias_decayed


def test_frozen_parameters_are_left_out():
    m = model()
    m[0].requires_grad_(False)
    frozen = copy.deepcopy(m[0].state_dict())
    for name in ("adamw", "lars", "lamb"):
        opt = create_optimizer(m, name, lr=0.1, weight_decay=0.1)
        ids = {id(p) for g in opt.param_groups for p in g["params"]}
        assert not ids & {id(p) for p in m[0].parameters()}
        set_grads(m, 0)
        opt.step()
    assert all(torch.equal(v, m[0].state_dict()[k]) for k, v in frozen.items())


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="'sgd' is not one of: adamw, lars, lamb"):
        create_optimizer(model(), "sgd", lr=0.1, weight_decay=0.0)
