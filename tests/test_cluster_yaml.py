"""cluster.yaml is a cluster config that `ray up` accepts, for a GPU cluster that runs this project.

`ray up` prepares a config (`prepare_config`: merges the provider's defaults, fills per-type worker limits) and
then checks it with `validate_config` against `ray/autoscaler/ray-schema.json`; the tests do the same, with
Ray's own functions, and add what the schema cannot know: GPU workers declare GPUs, the nodes install this
checkout, and the cluster runs with token authentication. Nothing here talks to AWS.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def config(raw) -> dict:
    """The config as `ray up` validates it."""
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


def _worker_types(config: dict) -> dict[str, dict]:
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def test_passes_rays_cluster_config_schema(config):
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["region"]
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: c.update(max_worker=3),  # misspelt top-level key
        lambda c: c["available_node_types"]["gpu_l4"]["resources"].update(GPU="one"),
        lambda c: c["available_node_types"]["gpu_l4"].pop("node_config"),
    ],
    ids=["unknown-key", "non-integer-gpu-count", "no-node-config"],
)
def test_the_validation_rejects_a_broken_copy(raw, break_it):
    """The positive test above is not vacuous: the same validation rejects small mistakes."""
    broken = copy.deepcopy(raw)
    break_it(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(broken))


def test_head_is_cpu_only_and_gpu_workers_declare_gpus(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU") == 0  # tasks and actors go to the workers
    assert head["max_workers"] == 0

    workers = _worker_types(config)
    gpu_types = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no worker type declares a GPU"
    for name, node_type in gpu_types.items():
        assert isinstance(node_type["resources"]["GPU"], int), name
        assert node_type["resources"].get("CPU", 0) >= 1, name
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"], name
        assert re.match(r"^(g[4-9]|p[4-9])", node_type["node_config"]["InstanceType"]), name  # a GPU family
    assert sum(t["min_workers"] for t in workers.values()) <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0


def test_every_node_boots_the_same_deep_learning_image(config):
    images = {t["node_config"]["ImageId"] for t in config["available_node_types"].values()}
    assert len(images) == 1, images
    (image,) = images
    assert re.fullmatch(r"ami-[0-9a-f]{8,17}", image), image
    text = CLUSTER_YAML.read_text()
    assert "aws ssm get-parameter" in text and "/aws/service/deeplearning/ami/" in text  # how to refresh it


def test_setup_installs_this_checkout_and_the_clients_ray(config):
    assert config["file_mounts"].get("~/worldgen") == "."  # the repository root, synced to every node
    assert (ROOT / "pyproject.toml").is_file()
    commands = config["setup_commands"]
    assert any(re.search(r"pip install .*-e ~/worldgen\b", c) for c in commands), commands
    # The cluster runs the Ray this checkout runs with: job submission and the client API need equal versions.
    pins = [m.group(1) for c in commands for m in [re.search(r"ray\[[^\]]*\]==([\w.]+)", c)] if m]
    assert pins == [ray.__version__], commands
    assert any("boto3" in c for c in config["head_setup_commands"])  # the autoscaler's AWS client
    for excluded in (".venv", "worlds", ".git"):
        assert excluded in config["rsync_exclude"]


def test_ray_starts_with_the_autoscaler_and_token_auth(config):
    head = " ; ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head and "--port=6379" in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--dashboard-host=0.0.0.0" in head
    worker = " ; ".join(config["worker_start_ray_commands"])
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    for commands in (head, worker):
        assert commands.startswith("ray stop")
        assert "RAY_AUTH_MODE=token" in commands
    # Every node gets the token that `ray get-auth-token --generate` wrote on the launching machine.
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
