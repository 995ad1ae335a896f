"""cluster.yaml must pass Ray's own cluster-config schema validation, offline."""

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def load():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_validates():
    config = load()
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["head_node_type"] in config["available_node_types"]
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] < gpu["max_workers"], "GPU workers must autoscale"
    assert any("pip install" in c and "spine-discs" in c for c in config["setup_commands"])


def test_validation_catches_a_broken_config():
    """The check is real: the same validator rejects a config with a missing node_config."""
    config = load()
    del config["available_node_types"]["gpu_worker"]["node_config"]
    with pytest.raises(jsonschema.ValidationError, match="node_config"):
        validate_config(prepare_config(config))
