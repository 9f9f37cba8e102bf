"""Study files are validated whole, before Ray starts; each error is one line naming file and key."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from study.cli import main
from study.spec import DEFAULT_STUDY, SpecError, load_spec


def write(tmp_path, text: str):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def with_change(tmp_path, section: str, key: str, value):
    data = yaml.safe_load(DEFAULT_STUDY.read_text())
    if section:
        data.setdefault(section, {})[key] = value
    else:
        data[key] = value
    return write(tmp_path, yaml.safe_dump(data))


def test_default_study_loads():
    spec = load_spec()
    assert spec.source == str(DEFAULT_STUDY)
    assert [p.name for p in spec.params] == ["base_lr"]
    assert spec.train_config().batch_size % spec.resources.workers == 0


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("train", "base_lrr", 1e-3, "unknown key 'base_lrr'; did you mean 'base_lr'?"),
        ("train", "method", "swav", "train.method: 'swav' is not one of: moco_v3, byol, simclr"),
        ("train", "optimizer", "sgd", "train.optimizer: 'sgd' is not one of: adamw, lars, lamb"),
        ("train", "precision", "fp8", "train.precision: 'fp8' is not one of"),
        ("train", "backbone", "vit_gigantic", "train.backbone: 'vit_gigantic' is not one of"),
        ("train", "epochs", "three", "train.epochs: expected int, got 'three'"),
        ("train", "epochs", 0, "train.epochs: must be > 0"),
        ("train", "batch_size", 129, "batch_size 129 does not divide by resources.workers 2"),
        ("train", "augment", {"blur": 0.5}, "train.augment: unknown view recipe field(s) 'blur'"),
        ("resources", "workrs", 2, "unknown key 'workrs'; did you mean 'workers'?"),
        ("search", "space", {"base_lr": {"log": [1e-3, 1e-4]}}, "empty or inverted range"),
        ("search", "space", {"base_lr": {"log": [0, 1e-4]}}, "base_lr.log: bounds must be > 0"),
        ("search", "space", {"base_lr": {"gauss": [0, 1]}}, "unknown distribution 'gauss'"),
        ("search", "space", {"learning_rate": {"log": [1e-4, 1e-3]}}, "unknown key 'learning_rate'"),
        ("search", "space", {"method": {"choice": ["byol", "dino"]}}, "search.space.method: 'dino' is not one"),
        ("search", "sampler", "grid", "search.space.base_lr: the grid sampler needs plain choice lists"),
        ("search", "metric", "accuracy", "search.metric: 'accuracy' is not one of"),
        ("scheduler", "type", "pbt", "scheduler.type: 'pbt' is not one of: asha, hyperband, fifo"),
        ("scheduler", "reduction_factor", 1, "scheduler.reduction_factor: must be >= 2"),
        ("search", "startup", "lhs", "search.startup: 'lhs' is not one of: random, sobol"),
        ("", "dataset", "imagenet", "dataset: dataset 'imagenet' is neither a built-in name nor an existing folder"),
        ("", "resourcez", {}, "unknown key 'resourcez'; did you mean 'resources'?"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path, section, key, value, expected):
    path = with_change(tmp_path, section, key, value)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(SpecError, match="study file not found"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match=r"not valid YAML at line 3, column 1"):
        load_spec(write(tmp_path, "name: x\ntrain: [1, 2\n"))
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec(write(tmp_path, "- just\n- a list\n"))


def test_cli_exits_2_with_one_line_before_ray_starts(tmp_path, capsys):
    path = with_change(tmp_path, "train", "backbone", "resnet9000")
    assert main(["launch", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(path) in err and "train.backbone" in err
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def machine() -> dict[str, int]:
    import os

    import torch

    return {"CPU": os.cpu_count(), "GPU": torch.cuda.device_count()}


@pytest.mark.parametrize(("key", "expected"), [
    ("cpus_per_worker", "resources.cpus_per_worker: {} CPU per worker, but the largest node of this machine"),
    ("gpus_per_worker", "resources.gpus_per_worker: {} GPU per worker, but the largest node of this machine"),
    ("workers", "resources: a trial needs"),
])
def test_resources_this_machine_never_has_exit_2_before_ray_starts(tmp_path, capsys, key, expected):
    data = yaml.safe_load(DEFAULT_STUDY.read_text())
    have = machine()
    value = {"cpus_per_worker": have["CPU"] + 1, "gpus_per_worker": have["GPU"] + 1,
             "workers": 2 * have["CPU"] + 4}[key]  # 0.45 CPU each: more than the machine holds
    data["resources"][key] = value
    data["train"]["batch_size"] = 128 * data["resources"]["workers"]
    path = write(tmp_path, yaml.safe_dump(data))
    assert main(["launch", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"ssl-study: error: {path}: ") and expected.format(value) in err
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_dry_run_prints_the_resolved_study(capsys):
    assert main(["launch", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "fmnist-mocov3-lr" in out and "base_lr ~ log" in out and "2 workers" in out
    assert "stopping: enforce" in out and "optuna:  sqlite:///" in out


ENTRY_POINTS = [[sys.executable, "-m", "study"], [str(Path(sys.executable).with_name("ssl-study"))]]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_module_and_console_entry_points(tmp_path, entry):
    out = subprocess.run([*entry, "launch", str(tmp_path / "missing.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == f"ssl-study: error: {tmp_path / 'missing.yaml'}: study file not found"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "a binary file (byte 0); a study file is YAML text in UTF-8"),
        ("name: caf\xe9\n".encode("latin-1"), "not UTF-8 text (byte 9); a study file is YAML text in UTF-8"),
        (b"", "the study file is empty"),
        (b"  \n\n", "the study file is empty"),
    ],
)
def test_unreadable_study_files_give_one_line_and_exit_2(tmp_path, capsys, content, expected):
    path = tmp_path / "study.yaml"
    path.write_bytes(content)
    assert main(["launch", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"ssl-study: error: {path}: {expected}")


def test_negative_seed_is_refused_before_any_worker(tmp_path):
    data = yaml.safe_load(DEFAULT_STUDY.read_text())
    data.setdefault("train", {})["seed"] = -1
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match=r"train\.seed: -1 is out of range; accepted: 0 to 2\*\*32 - 1"):
        load_spec(path)


def test_fractional_gpus_with_several_workers_are_refused(tmp_path):
    data = yaml.safe_load(DEFAULT_STUDY.read_text())
    data["resources"].update(workers=2, gpus_per_worker=0.5, check=False)
    with pytest.raises(SpecError, match=r"resources\.gpus_per_worker: 0\.5 with 2 workers could put two ranks on one"):
        load_spec(write(tmp_path, yaml.safe_dump(data)))
    data["resources"].update(workers=1)  # one rank on half a GPU is fine
    assert load_spec(write(tmp_path, yaml.safe_dump(data))).resources.gpus_per_worker == 0.5


def test_an_autoscaling_cluster_runs_every_trial_at_once_and_workers_get_their_cpus(tmp_path):
    from study.cluster import concurrency

    data = yaml.safe_load(DEFAULT_STUDY.read_text())
    data["resources"].update(workers=2, cpus_per_worker=4, gpus_per_worker=1, check=False)
    data["search"].update(num_samples=16)
    spec = load_spec(write(tmp_path, yaml.safe_dump(data)))
    no_gpu_yet = [{"CPU": 2.0, "GPU": 0.0}]  # the head of an autoscaling cluster, before any GPU node is up
    assert concurrency(spec, no_gpu_yet) == 16  # not 1: pending trials are what make the autoscaler scale
    spec = dataclasses.replace(spec, resources=dataclasses.replace(spec.resources, check=True))
    assert concurrency(spec, [{"CPU": 17.0, "GPU": 4.0}]) == 2  # a trial: 2 x 4 CPUs + 0.1 driver, 2 GPUs
    cfg = spec.train_config()
    assert (cfg.loader_workers, cfg.threads) == (4, 4)  # a worker's threads are its CPUs unless the file says


def test_lamb_clipping_is_an_option():
    import torch
    from torch import nn

    from trainers.optim import create_optimizer

    for clip, expected in ((1.0, 1.0), (None, None)):
        opt = create_optimizer(nn.Linear(3, 2), "lamb", lr=1e-3, weight_decay=0.0, lamb_max_grad_norm=clip)
        assert opt.defaults["max_grad_norm"] == expected
    w = nn.Linear(3, 2)
    grads = [torch.full_like(p, 100.0) for p in w.parameters()]
    steps = {}
    for clip in (1.0, None):
        m = nn.Linear(3, 2)
        m.load_state_dict(w.state_dict())
        opt = create_optimizer(m, "lamb", lr=1e-2, weight_decay=0.0, lamb_max_grad_norm=clip)
        for p, g in zip(m.parameters(), grads, strict=True):
            p.grad = g.clone()
        opt.step()
        steps[clip] = m.weight.detach().clone()
    assert not torch.equal(steps[1.0], steps[None])  # clipping changes the step, so the option is live


def _resnet_study(tmp_path, **train):
    data = yaml.safe_load(DEFAULT_STUDY.read_text())
    data["train"] = {k: v for k, v in data["train"].items() if k not in ("weight_decay", "warmup_epochs",
                                                                      "temperature")}
    data["train"].update(backbone="resnet50", **train)
    return load_spec(write(tmp_path, yaml.safe_dump(data)))


def test_a_resnet_gets_the_papers_resnet_recipe_for_what_the_file_leaves_out(tmp_path):
    cfg = _resnet_study(tmp_path).train_config()
    assert (cfg.optimizer, cfg.base_lr, cfg.weight_decay, cfg.warmup_epochs, cfg.crop_min, cfg.temperature) == (
        "lars", 0.6, 1e-6, 10.0, 0.2, 1.0)
    explicit = _resnet_study(tmp_path, base_lr=0.3, optimizer="adamw").train_config()
    assert (explicit.base_lr, explicit.optimizer, explicit.weight_decay) == (0.3, "adamw", 1e-6)
    assert _resnet_study(tmp_path, method="simclr").train_config().temperature == 0.2  # MoCo v3's T only


def test_a_searched_backbone_gets_its_own_recipe_per_trial(tmp_path):
    spec = load_spec(with_change(tmp_path, "train", "temperature", 0.2))
    vit, resnet = spec.train_config(), spec.train_config({"backbone": "resnet50"})
    assert (vit.optimizer, vit.crop_min) == ("adamw", 0.08)
    assert (resnet.optimizer, resnet.crop_min, resnet.temperature) == ("lars", 0.2, 0.2)  # the file's T wins


def test_dry_run_says_which_recipe_fills_the_gaps(tmp_path, capsys):
    spec = _resnet_study(tmp_path)
    assert main(["launch", spec.source, "--dry-run"]) == 0
    assert "recipe: resnet50's, for what the file leaves out: optimizer lars, base_lr 0.6" in capsys.readouterr().out


def test_checking_a_study_file_imports_neither_torch_timm_nor_ffcv(tmp_path):
    """What keeps `ssl-study launch bad.yaml` under a second (0.5 s here, against 11 s when it imported them)."""
    bad = with_change(tmp_path, "train", "backbone", "vit_nope")
    code = ("import sys\nfrom study.cli import main\ncode = main(['launch', sys.argv[1], '--dry-run'])\n"
            "print(code, *sorted(m for m in ('torch', 'timm', 'ffcv', 'ray', 'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["2"], done.stdout + done.stderr
    assert "train.backbone: 'vit_nope' is not one of" in done.stderr
