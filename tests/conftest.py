"""Shared fixtures: one real local Ray cluster per test session, the shared corpus, tiny configs."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import pytest

from sgmft.local_ray import quiet_data, set_local_env

set_local_env()
# Ray Train's controller polls its workers every 2 s, and waits that long at each step of a
# run (its start, each worker group, its end): a tiny run spent 4-5 of its 18 s there. The
# clusters, job drivers and commands the tests start inherit this; a missed poll counts
# only after Ray Train's 10-minute worker health-check timeout.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

# Ray installs a warnings filter of its own ("module" for RayDeprecationWarning) when
# ray.util.annotations is first imported. Imported inside a test, it would sit in front of
# pyproject's filterwarnings for that test and a deprecated Ray call of ours would pass;
# imported here, before any test, it never does.
import ray.util.annotations  # noqa: E402,F401

from ray_nodes import HeadNode  # noqa: E402
from serve_app.fastpath import FastPath, haproxy_available  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"
# HTTP API keys in the session cluster's environment (serve.api_key_env), fresh per session
API_KEYS_ENV = "SGMFT_TEST_API_KEYS"
API_KEYS = (secrets.token_urlsafe(24), secrets.token_urlsafe(24))


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not CORPUS.is_dir():
        pytest.skip(f"the shared corpus is not at {CORPUS}")
    return CORPUS


@pytest.fixture(scope="session")
def ray_head():
    """The session's one Ray cluster: ``ray start --head`` with a dashboard, on 127.0.0.1,
    with token authentication (its own token; ``ray_head.client_env()`` for subprocesses).

    Four logical CPUs on a 2-core machine: train workers take fractions, Ray Data and
    Serve take the rest; oversubscription only time-slices, it never deadlocks.
    """
    # Serve's fast path, as `sgmft serve` and the cluster configs start it: HAProxy in front
    # of the ingress replicas, with this session's own ports and directory
    fast = FastPath.new() if haproxy_available() else None
    head = HeadNode(num_cpus=4, env={API_KEYS_ENV: ",".join(API_KEYS), **(fast.env() if fast else {})}).start()
    yield head
    import ray

    if ray.is_initialized():
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
    head.stop()
    if fast is not None:
        fast.stop_haproxy()
    shutil.rmtree(head.temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def api_keys() -> tuple[str, tuple[str, ...]]:
    """(the variable the session cluster's processes hold API keys in, those keys)."""
    return API_KEYS_ENV, API_KEYS


@pytest.fixture(scope="session")
def ray_cluster(ray_head):
    """This test process connected as a driver to the session's cluster, with its token."""
    import ray

    if not ray.is_initialized():
        ray_head.use()
        ray.init(address=ray_head.address, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
                 logging_level="WARNING", log_to_driver=False)
        quiet_data()
    return ray


def pytest_collection_modifyitems(config, items):
    """Every test that needs the session's Ray cluster is slow, however it reaches it, so
    ``pytest -m "not slow"`` is a fast lane that starts no Ray at all."""
    for item in items:
        if "ray_head" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
