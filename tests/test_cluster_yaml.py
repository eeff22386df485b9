"""cluster.yaml, checked offline: Ray's own schema and config preparation (as `ray up` runs
them before it calls AWS), then what kiln needs of it."""

from __future__ import annotations

import copy
import re

import jsonschema
import pytest
import yaml

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_it_passes_rays_schema_and_config_preparation(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_the_schema_check_catches_a_misspelt_field(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(config)
    bad["available_node_types"]["worker.gpu"]["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_a_cpu_head_and_autoscaling_gpu_and_cpu_workers(config):
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]["node_config"]["InstanceType"]
    assert not re.match(r"(g|p)\d", head), f"the head {head} should be a CPU instance"
    gpu = types["worker.gpu"]
    assert re.match(r"g[56]\.", gpu["node_config"]["InstanceType"])
    assert gpu["min_workers"] == 0 < gpu["max_workers"]  # scales from zero, and back
    assert gpu["docker"]["worker_image"].endswith("-gpu")
    cpu = types["worker.cpu"]
    assert cpu["min_workers"] == 0 < cpu["max_workers"]
    assert config["max_workers"] >= gpu["max_workers"] + cpu["max_workers"]


def test_setup_installs_this_project_on_every_node(config):
    mounts = config["file_mounts"]
    assert mounts["~/kiln"] == "."
    assert any("pip install" in c and "~/kiln" in c for c in config["setup_commands"])
    assert ".venv" in config["rsync_exclude"]


def test_token_auth_on_and_the_dashboard_reached_through_ray_dashboard(config):
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head
    assert "RAY_AUTH_MODE=token ray start --address" in workers
    assert "~/.ray/auth_token" in config["file_mounts"]
    # Local to the head: `ray dashboard cluster.yaml` tunnels to it over SSH.
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for node_type in config["available_node_types"].values():
        assert "SecurityGroupIds" not in node_type["node_config"]  # Ray's group: SSH only
