"""Declarative spaces sampled by a real Optuna study: distributions, momentum on 1 - m, conditional branches
(define-by-run), and the paper's presets expanded into valid study files."""

import math

import optuna
import pytest
import yaml

from search_spaces import SpaceError, define_by_run, flatten, parse_space, size
from search_spaces.presets import PRESETS
from study.spec import SpecError, load_spec

optuna.logging.set_verbosity(optuna.logging.WARNING)


def sample(space: dict, n: int, sampler=None) -> list[dict]:
    study = optuna.create_study(sampler=sampler or optuna.samplers.RandomSampler(seed=0))
    fn = define_by_run(parse_space(space))
    configs = []
    for _ in range(n):
        trial = study.ask()
        options = fn(trial)
        configs.append({**trial.params, **options})  # what Optuna models, then what the trial gets
        study.tell(trial, 0.0)
    return configs


def test_each_kind_samples_inside_its_bounds():
    space = {"base_lr": {"log": [1e-4, 1e-2]}, "warmup_epochs": {"uniform": [0, 2]}, "epochs": {"int": [2, 4]},
             "batch_size": {"choice": [64, 128]}}
    for c in sample(space, 50):
        assert 1e-4 <= c["base_lr"] <= 1e-2 and 0 <= c["warmup_epochs"] <= 2
        assert c["epochs"] in (2, 3, 4) and c["batch_size"] in (64, 128)


def test_momentum_is_searched_on_one_minus_m_log_scale():
    configs = sample({"moco_m": {"log1m": [0.9, 0.999]}}, 400)
    m = [c["moco_m"] for c in configs]
    assert all(0.9 <= v <= 0.999 + 1e-12 for v in m)
    # log-uniform on 1 - m: about half the samples have 1 - m below the geometric mean 1e-2 (m above 0.99);
    # a uniform draw on m would put only about 10% there
    above = sum(v > 0.99 for v in m) / len(m)
    assert 0.4 < above < 0.6
    assert all(math.isclose(1 - c["1-moco_m"], c["moco_m"]) for c in configs)  # what Optuna models


def test_conditional_branches_sample_only_the_chosen_optimiser_parameters():
    space = {"optimizer": {"choice": ["adamw", "lars"],
                           "when": {"adamw": {"base_lr": {"log": [1e-4, 1e-3]}},
                                    "lars": {"base_lr": {"log": [0.1, 1.0]}, "weight_decay": {"log": [1e-7, 1e-6]}}}}}
    configs = sample(space, 60, optuna.samplers.TPESampler(seed=0, multivariate=True, group=True))
    assert {c["optimizer"] for c in configs} == {"adamw", "lars"}
    for c in configs:
        if c["optimizer"] == "adamw":
            assert 1e-4 <= c["base_lr"] <= 1e-3 and "weight_decay" not in c
        else:
            assert 0.1 <= c["base_lr"] <= 1.0 and 1e-7 <= c["weight_decay"] <= 1e-6
    assert [p.name for p in flatten(parse_space(space))] == ["optimizer", "base_lr", "weight_decay"]


@pytest.mark.parametrize(("space", "expected"), [
    ({"moco_m": {"log1m": [0.9, 1.0]}}, "moco_m.log1m: bounds must satisfy 0 <= low < high < 1"),
    ({"optimizer": {"choice": ["adamw"], "when": {"sgd": {}}}}, "optimizer.when: 'sgd' is not one of the choices"),
    ({"optimizer": {"choice": ["adamw"], "when": {"adamw": {"optimizer": {"choice": ["lars"]}}}}},
     "a branch cannot set 'optimizer' again"),
    ({"base_lr": {"log": [1e-4, 1e-3], "when": {}}}, "base_lr: expected one of"),
])
def test_bad_spaces_name_the_entry(space, expected):
    with pytest.raises(SpaceError, match=expected):
        parse_space(space)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_expands_to_a_valid_study(tmp_path, name):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"name": name, "preset": name, "preset_scale": 0.0625,
                                    "train": {"backbone": "vit_test_patch4_32"}}))
    spec = load_spec(path)
    assert spec.params and spec.search.num_samples >= 1
    for p in flatten(spec.params):
        if p.name == "batch_size":  # the paper's 1k-6k batches scaled to 64-384, multiples of the workers
            assert p.args == (64, 128, 256, 384)


def test_study_file_overrides_the_preset(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "preset": "patch_projection", "stopping": {"mode": "enforce"},
                                    "search": {"num_samples": 2}}))
    spec = load_spec(path)
    assert spec.stopping.mode == "enforce" and spec.search.num_samples == 2 and spec.search.sampler == "grid"
    path.write_text(yaml.safe_dump({"name": "p", "preset": "patch_projections"}))
    with pytest.raises(SpecError, match="preset: 'patch_projections' is not one of: batch_lr"):
        load_spec(path)


def test_grid_refuses_conditional_spaces_and_batch_sizes_must_divide(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "preset": "optimizer", "search": {"sampler": "grid"}}))
    with pytest.raises(SpecError, match="grid sampler needs plain choice lists, got conditional branches"):
        load_spec(path)
    path.write_text(yaml.safe_dump({"name": "p", "search": {"space": {"batch_size": {"choice": [64, 99]}}}}))
    with pytest.raises(SpecError, match=r"search\.space\.batch_size: batch size 99 does not divide by resources"):
        load_spec(path)


def test_grid_ablations_run_every_cell_to_the_end_and_tuning_presets_keep_asha(tmp_path):
    """An ablation compares every cell at its full budget (FIFO) and only observes instability; the presets
    that tune (TPE) keep ASHA and the enforced policy's default."""
    kinds = {"batch_lr": "fifo", "momentum": "fifo", "patch_projection": "fifo", "frameworks": "fifo",
             "temperature": "asha", "optimizer": "asha"}
    assert set(kinds) == set(PRESETS)  # a new preset has to be placed here
    for name, scheduler in kinds.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "preset": name, "preset_scale": 0.0625,
                                        "data_dir": str(tmp_path / "data"),
                                        "train": {"backbone": "vit_test_patch4_32"}}))
        spec = load_spec(path)
        assert spec.scheduler.type == scheduler, name
        if scheduler == "fifo":
            assert spec.search.sampler == "grid" and spec.stopping.mode == "observe", name
        else:
            assert spec.search.sampler == "tpe" and spec.stopping.mode == "enforce", name


def test_a_sobol_start_spreads_the_first_trials_over_every_axis_then_tpe_models():
    from study.search import SobolStart

    space = {"base_lr": {"log": [3e-4, 3e-3]}, "temperature": {"choice": [0.1, 0.2, 0.5, 1.0]},
             "epochs": {"int": [1, 8]}}
    tpe = optuna.samplers.TPESampler(seed=0, n_startup_trials=8)
    first = sample(space, 12, SobolStart(tpe, startup=8, seed=0))
    start = first[:8]
    # a Sobol design of 8 points puts one point in each eighth of every axis, and each choice exactly twice
    eighths = sorted(int(8 * math.log(c["base_lr"] / 3e-4) / math.log(10)) for c in start)
    assert eighths == list(range(8))
    assert sorted(c["temperature"] for c in start) == [0.1, 0.1, 0.2, 0.2, 0.5, 0.5, 1.0, 1.0]
    assert sorted(c["epochs"] for c in start) == list(range(1, 9))
    assert all(1 <= c["epochs"] <= 8 and 3e-4 <= c["base_lr"] <= 3e-3 for c in first[8:])
    random = sample(space, 8, optuna.samplers.TPESampler(seed=0, n_startup_trials=8))
    assert len({int(8 * math.log(c["base_lr"] / 3e-4) / math.log(10)) for c in random}) < 8  # seed 0 clusters
    again = sample(space, 8, SobolStart(optuna.samplers.TPESampler(seed=0), startup=8, seed=0))
    assert again == start  # seeded


def test_size_counts_the_configurations_of_a_finite_space():
    assert size(parse_space({"a": {"choice": [1, 2, 3]}, "b": {"int": [2, 5]}})) == 12
    branching = {"opt": {"choice": ["adamw", "lamb"], "when": {"lamb": {"beta": {"choice": [0.9, 0.99]}}}}}
    assert size(parse_space(branching)) == 3  # adamw, lamb with either beta
    assert size(parse_space({"a": {"choice": [1, 2]}, "lr": {"log": [1e-4, 1e-2]}})) is None
