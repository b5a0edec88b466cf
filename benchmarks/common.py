"""Shared plumbing for the benchmarks: machine facts, result files, a local Ray."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from sgmft.local_ray import set_local_env

set_local_env()  # before Ray is imported anywhere: it reads these at import time
RESULTS = Path(__file__).resolve().parent / "results"


def commit() -> str | None:
    """The commit the code measured is at, ``-dirty`` when the measured code has uncommitted
    changes; None outside a git checkout (the report then names the commit that saved the file).
    ``SGMFT_MEASURED_COMMIT`` overrides it, for a copy of the tree whose .git is not its own
    (the device machine's)."""
    if os.environ.get("SGMFT_MEASURED_COMMIT"):
        return os.environ["SGMFT_MEASURED_COMMIT"]

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=RESULTS.parents[1], capture_output=True, text=True, check=False)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return None
    dirty = git("status", "--porcelain", "--", "sgmft", "serve_app", "benchmarks/*.py").stdout.strip()
    return head.stdout.strip() + ("-dirty" if dirty else "")


def machine() -> dict[str, Any]:
    import numpy
    import ray
    import torch

    return {
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__, "numpy": numpy.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": commit(),
    }


def save(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=2, ensure_ascii=False))
    return path


@contextmanager
def local_ray(num_cpus: int | None = None) -> Iterator[None]:
    """A local Ray for one benchmark, shut down afterwards."""
    from sgmft.local_ray import connect, disconnect

    connect(num_cpus=num_cpus)
    try:
        yield
    finally:
        disconnect()


def main(run: Callable[[bool], dict], doc: str | None) -> None:
    """The command line every benchmark shares: ``python -m benchmarks.NAME [--quick]``."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    run(parser.parse_args().quick)


class Timer:
    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.start
