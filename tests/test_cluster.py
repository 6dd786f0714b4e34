"""cluster.yaml passes Ray's own cluster-config validation, offline, and says what the design needs."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parent.parent / "cluster.yaml"


def test_cluster_yaml_is_valid_for_ray_up() -> None:
    config = prepare_config(yaml.safe_load(CLUSTER.read_text()))
    validate_config(config)  # raises on any schema violation
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] == 0 and workers["max_workers"] >= 1
    assert config["head_node_type"] == "head"
    head_setup = " ".join(config["head_setup_commands"])
    assert "mlflow server" in head_setup and "s3://" in head_setup and "MLFLOW_TRACKING_URI" in head_setup
    assert any("uv pip install" in c for c in config["setup_commands"])
