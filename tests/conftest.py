"""Shared fixtures: one real local Ray cluster per test session, the shared corpus, tiny configs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sgmft.local_ray import HeadNode, quiet_data, set_local_env

set_local_env()

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not CORPUS.is_dir():
        pytest.skip(f"the shared corpus is not at {CORPUS}")
    return CORPUS


@pytest.fixture(scope="session")
def ray_head():
    """The session's one Ray cluster: ``ray start --head`` with a dashboard, on 127.0.0.1.

    Four logical CPUs on a 2-core machine: train workers take fractions, Ray Data and
    Serve take the rest; oversubscription only time-slices, it never deadlocks.
    """
    head = HeadNode(num_cpus=4).start()
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
    shutil.rmtree(head.temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster(ray_head):
    """This test process connected as a driver to the session's cluster."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_head.address, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
                 logging_level="WARNING", log_to_driver=False)
        quiet_data()
    return ray
