"""The cluster launcher and KubeRay configs are checked against Ray's own schema and our CLI."""

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _validate(config: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    # prepare_config fills the provider defaults as `ray up` does, then the schema is checked
    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_matches_rays_autoscaler_schema():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    _validate(config)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types and all(t["max_workers"] > t["min_workers"] for t in gpu_types)
    assert any("pip install" in c and "-e ." in c for c in config["setup_commands"])


def test_schema_check_really_rejects_a_broken_config():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    broken = copy.deepcopy(config)
    broken["available_node_types"]["head"]["resources"] = "eight CPUs"
    with pytest.raises(jsonschema.ValidationError):
        _validate(broken)


def test_kuberay_rayjob_runs_a_job_entrypoint_that_exists():
    job = yaml.safe_load((REPO / "jobs" / "kuberay-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob"
    entry = job["spec"]["entrypoint"].split()
    module = entry[entry.index("-m") + 1]
    assert (REPO / (module.replace(".", "/") + ".py")).is_file()
    config = entry[entry.index("--config") + 1]
    assert (REPO / config).is_file()
