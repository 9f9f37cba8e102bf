"""The cluster files under cluster/ and the Ray Jobs path (`ssl-study submit`).

- The cluster launcher YAMLs go through the same steps `ray up` takes before it touches a cloud
  (`prepare_config`, then `validate_config` against Ray's ray-schema.json); broken copies must fail.
- The KubeRay RayJob is checked against the fields and required keys of KubeRay's ray.io/v1 CRD.
- A tiny study is submitted as a Ray Job to a head this test starts on 127.0.0.1 with token
  authentication, and its Parquet results are read back.

Isolation from other Ray instances on the machine (other agents run their own local Rays): the head gets
its own --temp-dir (so its address file is not /tmp/ray/ray_current_cluster, which a plain `ray.init()`
would find and join) and free ports for every listener. It is stopped without `ray stop` (which would kill
every Ray of this user): `ray start --block` runs in its own process group, which gets SIGTERM then SIGKILL,
and any process left whose command line names this head's temp dir (workers, agents) is killed by pid.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import time
from pathlib import Path

import jsonschema
import pyarrow.parquet as pq
import pytest
import requests
import yaml
from servers import free_ports, ray_head

from study import submit as sub
from study.spec import DEFAULT_STUDY, SpecError

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
LAUNCHER_FILES = ["aws.yaml", "gcp.yaml", "local.yaml"]


# ---------------------------------------------------------------- cluster launcher files


def ray_up_checks(config: dict) -> dict:
    """What `ray up` does with a cluster YAML before it needs cloud credentials."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_file_passes_ray_validation(name):
    config = yaml.safe_load((CLUSTER / name).read_text())
    prepared = ray_up_checks(config)
    assert prepared["cluster_name"] == "ssl-study"
    # every node gets the checkout and the shared token; setup installs ssl-study with the node script
    assert prepared["file_mounts"]["~/ssl-study"] == "."
    assert "~/.ray/auth_token" in prepared["file_mounts"]
    setup = " ".join(prepared["head_setup_commands"] + prepared["worker_setup_commands"])
    assert "cluster/setup_node.sh --head" in setup and "torch.cuda.is_available()" in setup
    assert all("RAY_AUTH_MODE=token" in c for c in prepared["head_start_ray_commands"] if "ray start" in c)
    if config["provider"]["type"] == "local":
        assert "--num-gpus=0" in " ".join(prepared["head_start_ray_commands"])
        return
    types = prepared["available_node_types"]
    assert types[prepared["head_node_type"]]["resources"] == {"CPU": 0, "GPU": 0}  # no trial lands on the head
    gpu_types = [t for name, t in types.items() if name != prepared["head_node_type"]]
    assert gpu_types and all(t["resources"]["GPU"] >= 1 and t["max_workers"] >= 1 for t in gpu_types)
    assert "-v /mnt/shared:/mnt/shared" in prepared["docker"]["run_options"]


def test_local_file_passes_ray_up_bootstrap():
    # For the local provider `ray up` can go one step further offline: its provider bootstrap.
    from ray.autoscaler._private.commands import _bootstrap_config

    config = _bootstrap_config(yaml.safe_load((CLUSTER / "local.yaml").read_text()), no_config_cache=True)
    assert config["provider"]["worker_ips"] and config["available_node_types"]


def _broken(config: dict, how: str) -> dict:
    config = copy.deepcopy(config)
    if how == "unknown key":
        config["setup_comands"] = config.pop("setup_commands")
    elif how == "head type missing":
        config["head_node_type"] = "no_such_type"
    elif how == "wrong type":
        config["max_workers"] = "eight"
    return config


@pytest.mark.parametrize("how", ["unknown key", "head type missing", "wrong type"])
def test_broken_launcher_file_fails(how):
    config = _broken(yaml.safe_load((CLUSTER / "aws.yaml").read_text()), how)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_up_checks(config)


def test_node_setup_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(CLUSTER / "setup_node.sh")], check=True)


# ---------------------------------------------------------------- KubeRay

# The part of KubeRay's ray.io/v1 CRD (ray-operator/config/crd/bases/ray.io_rayjobs.yaml, and the Go types
# in ray-operator/apis/ray/v1/rayjob_types.go and raycluster_types.go) that this manifest uses: the RayJob
# spec's field names (a misspelt field is pruned silently by Kubernetes, so it is an error here), the
# required keys of head and worker groups, and rayStartParams as a string map.
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_POD = {"type": "object", "required": ["spec"], "properties": {"spec": {
    "type": "object", "required": ["containers"], "properties": {"containers": {
        "type": "array", "minItems": 1, "items": {"type": "object", "required": ["name", "image"]}}}}}}
RAYJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "spec": {
            "type": "object",
            "required": ["entrypoint", "rayClusterSpec"],
            "additionalProperties": False,
            "properties": {
                **{k: {} for k in ["activeDeadlineSeconds", "backoffLimit", "submitterPodTemplate", "metadata",
                                   "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
                                   "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
                                   "entrypointNumCpus", "entrypointNumGpus", "suspend", "schedule"]},
                "entrypoint": {"type": "string"},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "rayClusterSpec": {
                    "type": "object",
                    "required": ["headGroupSpec"],
                    "additionalProperties": False,
                    "properties": {
                        **{k: {} for k in ["rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
                                           "headServiceAnnotations", "suspend", "gcsFaultToleranceOptions",
                                           "managedBy", "upgradeStrategy", "authOptions"]},
                        "headGroupSpec": {"type": "object", "required": ["rayStartParams", "template"],
                                          "properties": {"rayStartParams": _STRINGS, "template": _POD}},
                        "workerGroupSpecs": {"type": "array", "items": {
                            "type": "object",
                            "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
                            "properties": {"rayStartParams": _STRINGS, "template": _POD,
                                           "minReplicas": {"type": "integer", "minimum": 0},
                                           "maxReplicas": {"type": "integer", "minimum": 1}}}},
                    },
                },
            },
        },
    },
}


def _kuberay_docs() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((CLUSTER / "kuberay-rayjob.yaml").read_text())}


def test_kuberay_rayjob_matches_the_crd():
    docs = _kuberay_docs()
    job = docs["RayJob"]
    jsonschema.validate(job, RAYJOB_SCHEMA)
    assert job["spec"]["entrypoint"].startswith("python -m study launch ")
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    gpu = [g for g in cluster["workerGroupSpecs"]
           if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpu, "no GPU worker group"
    # the token reaches every pod that talks to Ray, from one Secret
    pods = [head["template"], job["spec"]["submitterPodTemplate"], *(g["template"] for g in gpu)]
    for pod in pods:
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "ray-auth-token"
    # the shared volume is a ReadWriteMany claim mounted where the study writes
    assert docs["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_kuberay_study_file_is_a_valid_cluster_study(tmp_path):
    docs = _kuberay_docs()
    path = tmp_path / "study.yaml"
    path.write_text(docs["ConfigMap"]["data"]["study.yaml"])
    spec = sub.load_spec(path)
    sub.check_for_cluster(spec)
    assert spec.storage.startswith("/mnt/shared/") and spec.resources.gpus_per_worker == 1


def test_broken_rayjob_fails():
    job = _kuberay_docs()["RayJob"]
    bad = copy.deepcopy(job)
    bad["spec"]["shutdownAfterJobFinish"] = bad["spec"].pop("shutdownAfterJobFinishes")  # typo
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, RAYJOB_SCHEMA)
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, RAYJOB_SCHEMA)


# ---------------------------------------------------------------- submit: pieces without a cluster


def _tiny_study(tmp_path: Path, **overrides) -> Path:
    study = yaml.safe_load(DEFAULT_STUDY.read_text())
    study.update(name="cluster-tiny", storage=str(tmp_path / "runs"), data_dir=str(ROOT / "datasets"))
    study["train"].update(backbone="vit_test_patch4_32", dim=32, mlp_dim=64, epochs=1, batch_size=64,
                          warmup_epochs=0, train_subset=512, knn_bank_subset=256, knn_eval_subset=256)
    study["resources"] = {"workers": 1, "cpus_per_worker": 1, "driver_cpus": 0.1}
    study["search"].update(num_samples=1, max_concurrent=1)
    study["scheduler"] = {"type": "fifo"}
    study.update(overrides)
    path = tmp_path / "tiny study.yaml"  # a space: the entrypoint must quote the file name
    path.write_text(yaml.safe_dump(study))
    return path


def test_relative_storage_is_refused_before_anything_is_sent(tmp_path):
    path = _tiny_study(tmp_path, storage="runs")
    with pytest.raises(SpecError, match="storage: 'runs' is not an absolute path"):
        sub.submit(path, "http://127.0.0.1:9")  # nothing listens there: the error must come first


def test_job_request_ships_the_study_text_and_excludes_data(tmp_path):
    path = _tiny_study(tmp_path)
    entrypoint, env = sub.job_request(path)
    assert entrypoint.endswith("python -m study launch '.ssl-study/tiny study.yaml' --address auto")
    assert env["env_vars"][sub.SPEC_ENV] == path.read_text()
    assert Path(env["working_dir"]) == ROOT
    assert {"datasets", "runs", "*.beton", "checkpoints"} <= set(env["excludes"])  # Ray drops .git, .venv itself
    # the shell part writes the text back byte for byte
    out = subprocess.run(["sh", "-c", entrypoint.split(" && python")[0] + " && cat '.ssl-study/tiny study.yaml'"],
                         cwd=tmp_path, env={**os.environ, **env["env_vars"]}, capture_output=True, text=True,
                         check=True).stdout
    assert out == path.read_text()


def test_auth_headers_follow_rays_token_sources(tmp_path, monkeypatch):
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert sub.auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert sub.auth_headers() == {"Authorization": "Bearer home-token"}
    (tmp_path / "tok").write_text("path-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert sub.auth_headers() == {"Authorization": "Bearer path-token"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert sub.auth_headers() == {"Authorization": "Bearer env-token"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert sub.auth_headers() == {}


def test_unreachable_cluster_is_exit_code_1(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    sub.add_submit_arguments(parser)
    args = parser.parse_args([str(_tiny_study(tmp_path)), "--address", f"http://127.0.0.1:{free_ports(1)[0]}"])
    assert sub.submit_from_args(args) == 1
    assert "ssl-study: error:" in capsys.readouterr().err


# ---------------------------------------------------------------- submit: a real head on 127.0.0.1


@pytest.fixture(scope="module")
def head():
    """A Ray head on 127.0.0.1 with token authentication (its own token, not ~/.ray's); yields (address, token)."""
    with ray_head(num_cpus=2) as h:
        yield h.address, h.token_file


@pytest.mark.cluster
def test_head_demands_the_token(head):
    address, _ = head
    assert requests.get(f"{address}/api/jobs/", timeout=10).status_code == 401


@pytest.mark.cluster
def test_submitted_study_finishes_and_its_results_come_back(head, tmp_path, monkeypatch):
    from ray.job_submission import JobStatus

    address, token_file = head
    # the client has only the token's location, as a user with the cluster's token would; no RAY_AUTH_MODE
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    path = _tiny_study(tmp_path)

    class Lines:  # collects the streamed logs
        text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    logs = Lines()
    started = time.time()
    job_id = sub.submit(path, address, wait=True, out=logs)
    client = sub.client(address)
    info = client.get_job_info(job_id)
    assert info.status == JobStatus.SUCCEEDED, f"{info.message}\n{logs.text[-3000:]}"
    assert "Parquet results:" in logs.text  # the logs were streamed while waiting
    assert info.metadata["ssl_study"] == "cluster-tiny"
    rows = pq.read_table(tmp_path / "runs" / "cluster-tiny" / "results" / "trials.parquet").to_pylist()
    assert len(rows) == 1 and rows[0]["status"] == "completed", rows
    assert math.isfinite(rows[0]["knn_top1"]) and 0.0 <= rows[0]["knn_top1"] <= 1.0
    print(f"study job {job_id} took {time.time() - started:.0f} s")
