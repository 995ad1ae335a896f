"""cluster.yaml must pass Ray's own cluster-config schema validation, offline."""

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from pipeline import config as pipeline_config

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


def test_the_gpu_worker_fits_what_the_paper_preset_asks_for():
    """The autoscaler launches a node type only if it declares room for the request: a GPU and
    resources.cpus_per_gpu_worker CPUs; the head has no GPU, so GPU work never lands there."""
    nodes = load()["available_node_types"]
    paper = pipeline_config.paper().resources
    assert paper.gpu == "require"
    assert nodes["gpu_worker"]["resources"]["GPU"] >= 1
    assert nodes["gpu_worker"]["resources"]["CPU"] >= paper.cpus_per_gpu_worker
    assert nodes["gpu_worker"]["min_workers"] == 0
    assert "GPU" not in nodes["head"]["resources"]


def test_validation_catches_a_broken_config():
    """The check is real: the same validator rejects a config with a missing node_config."""
    config = load()
    del config["available_node_types"]["gpu_worker"]["node_config"]
    with pytest.raises(jsonschema.ValidationError, match="node_config"):
        validate_config(prepare_config(config))
