"""cluster.yaml validated offline with Ray's own cluster-launcher schema (no AWS, no boto3)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster.yaml"


def raw() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def check(config: dict[str, Any]) -> dict[str, Any]:
    # prepare_config first: validate_config on the raw dict fails on defaults it expects.
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_is_valid_for_ray() -> None:
    cfg = check(raw())
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"] == "us-west-2"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] == "head" and set(types) == {"head", "cpu_runner", "gpu_h100"}
    cpu, gpu = types["cpu_runner"], types["gpu_h100"]
    assert (cpu["min_workers"], cpu["max_workers"]) == (0, 20)
    assert cpu["node_config"]["InstanceType"] == "m7i.2xlarge"
    assert (gpu["min_workers"], gpu["max_workers"]) == (0, 2)
    assert gpu["node_config"]["InstanceType"] == "p5.48xlarge"
    assert gpu["resources"] == {"GPU": 8}
    assert cfg["max_workers"] >= cpu["max_workers"] + gpu["max_workers"]


def test_cluster_yaml_installs_batchrun_and_guards_the_dashboard() -> None:
    cfg = raw()
    assert cfg["file_mounts"] == {"~/batchrun": "."}
    assert any("pip install -e" in c and "batchrun" in c for c in cfg["setup_commands"])
    gpu_setup = cfg["available_node_types"]["gpu_h100"]["worker_setup_commands"]
    assert any("batchrun[gpu]" in c for c in gpu_setup)
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" in head and "--head" in head
    text = CLUSTER_YAML.read_text()
    assert "ray dashboard cluster.yaml" in text  # the security note's safe route


def test_unknown_key_is_rejected() -> None:
    top = raw()
    top["max_wrokers"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_wrokers"):
        check(top)
    nested = raw()
    nested["available_node_types"]["gpu_h100"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        check(nested)


def test_wrong_head_node_type_is_rejected() -> None:
    cfg = raw()
    cfg["head_node_type"] = "ray.head.default"
    with pytest.raises(ValueError, match="head_node_type"):
        check(cfg)
