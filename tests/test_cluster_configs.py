"""The cluster launcher and KubeRay configs are checked against Ray's own schema and our CLI."""

import copy
import re
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


# --- no open doors: token authentication everywhere, no token in the repository ----------

KUBERAY = {"jobs/kuberay-rayjob.yaml": ("RayJob", "rayClusterSpec"),
           "serve_app/kuberay-rayservice.yaml": ("RayService", "rayClusterConfig")}


def _yaml_files() -> list[Path]:
    skip = {".venv", ".git", "node_modules"}
    return sorted(p for p in REPO.rglob("*.y*ml") if not skip & set(p.relative_to(REPO).parts))


def _walk(node, path=""):
    """(dotted path, value) of every scalar in a YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")
    else:
        yield path, node


def _start_commands(config: dict) -> dict[str, list[str]]:
    """Every node type's `ray start` commands (a node type may override the global ones)."""
    out = {}
    for name, node_type in config["available_node_types"].items():
        key = "head_start_ray_commands" if name == config["head_node_type"] else "worker_start_ray_commands"
        commands = node_type.get(key, config[key])
        out[name] = [c for c in commands if "ray start" in c]
    return out


def test_every_cluster_node_starts_ray_with_token_auth_from_a_synced_file():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    mounts = config["file_mounts"]
    token_mounts = {remote: local for remote, local in mounts.items() if remote.endswith("auth_token")}
    assert token_mounts, "the token file must be synced to every node by file_mounts"
    for remote, local in token_mounts.items():
        source = Path(local).expanduser()
        assert source.is_absolute() and REPO not in source.resolve().parents, f"{local}: the token must come from outside the repository"
    for name, commands in _start_commands(config).items():
        assert commands, f"{name}: no ray start command"
        for command in commands:
            words = command.split()
            assert "RAY_AUTH_MODE=token" in words, f"{name}: {command!r} does not turn token auth on"
            paths = [w.split("=", 1)[1] for w in words if w.startswith("RAY_AUTH_TOKEN_PATH=")]
            assert paths and all(p in token_mounts for p in paths), f"{name}: {command!r} must read the synced token file"


def test_cluster_dashboard_listens_on_loopback_only():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    (head,) = _start_commands(config)[config["head_node_type"]]
    hosts = [w.split("=", 1)[1] for w in head.split() if w.startswith("--dashboard-host=")]
    assert hosts in ([], ["127.0.0.1"], ["localhost"]), head  # Ray's default is localhost too


@pytest.mark.parametrize("path", sorted(KUBERAY))
def test_kuberay_manifests_enable_token_auth(path):
    kind, cluster_key = KUBERAY[path]
    doc = yaml.safe_load((REPO / path).read_text())
    assert doc["kind"] == kind
    cluster = doc["spec"][cluster_key]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    if (cluster.get("authOptions") or {}).get("mode") != "token":
        # without authOptions (KubeRay < 1.5.1): token mode and a token from a Secret on every container
        for group in groups:
            for container in group["template"]["spec"]["containers"]:
                env = {e["name"]: e for e in container.get("env", [])}
                assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{path}: {container['name']}"
                assert "secretKeyRef" in env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}), f"{path}: {container['name']}"
    # with authentication on, the dashboard may listen on the pod network (the operator needs it)
    host = cluster["headGroupSpec"].get("rayStartParams", {}).get("dashboard-host")
    assert host in (None, "0.0.0.0", "127.0.0.1", "localhost")


def test_no_token_or_key_literal_in_any_yaml_of_the_repository():
    files = _yaml_files()
    assert REPO / "cluster.yaml" in files and REPO / "jobs" / "kuberay-rayjob.yaml" in files
    hexish = re.compile(r"\b[0-9a-fA-F]{32,}\b")
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"RAY_AUTH_TOKEN=(?!\s|$)", text), f"{path}: RAY_AUTH_TOKEN set to a literal"
        assert not hexish.search(re.sub(r"#.*", "", text)), f"{path}: something that looks like a token"
        for doc in yaml.safe_load_all(text):
            if isinstance(doc, dict) and doc.get("kind") == "Secret":
                assert not doc.get("data") and not doc.get("stringData"), f"{path}: a Secret with its value"
            for where, value in _walk(doc):
                if where.endswith((".auth_token", "authOptions.token")):
                    pytest.fail(f"{path}: {where} holds a token")
            for env_list in _env_lists(doc):
                for item in env_list:
                    if item.get("name") in ("RAY_AUTH_TOKEN", "SGMFT_API_KEYS"):
                        assert "value" not in item and "valueFrom" in item, f"{path}: {item['name']} as a literal"


def _env_lists(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield [e for e in value if isinstance(e, dict)]
            else:
                yield from _env_lists(value)
    elif isinstance(node, list):
        for value in node:
            yield from _env_lists(value)
