"""Shared fixtures: one real local Ray cluster per test session, the shared corpus, tiny configs."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Local Ray stays on 127.0.0.1, reports nothing, and needs no token (DESIGN.md).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not CORPUS.is_dir():
        pytest.skip(f"the shared corpus is not at {CORPUS}")
    return CORPUS


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster for the whole session, torn down at the end.

    Four logical CPUs on a 2-core machine: train workers take fractions, Ray Data and
    Serve take the rest; oversubscription only time-slices, it never deadlocks.
    """
    import ray

    # Unix socket paths must stay short, so the temp dir lives directly under /tmp.
    temp_dir = tempfile.mkdtemp(prefix="sgmft-ray-", dir="/tmp")
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        _temp_dir=temp_dir,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
        logging_level="WARNING",
        log_to_driver=False,
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
