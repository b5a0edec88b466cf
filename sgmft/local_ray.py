"""Local Ray for the CLI, tests and benchmarks: on 127.0.0.1, quiet, self-contained.

``connect()`` joins the cluster named by RAY_ADDRESS (what ``ray job submit`` sets) or
starts an in-process local one. ``HeadNode`` runs ``ray start --head --block`` as a
child process group, so stopping it ends exactly the processes it started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

LOCAL_ENV = {
    # keeps Ray's own traffic on loopback, reports no usage, needs no auth token (DESIGN.md)
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_TRAIN_V2_ENABLED": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Ray Data's progress bars interleave with the per-epoch lines of every worker and trial
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
}


def set_local_env() -> None:
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_temp_dir(prefix: str = "sgmft-ray-") -> str:
    # Ray's Unix socket paths must stay under ~107 characters.
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def quiet_data() -> None:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def connect(num_cpus: int | None = None, quiet: bool = True) -> None:
    """Join RAY_ADDRESS's cluster, or start a local one on this machine.

    Worker output (the per-epoch progress lines) always reaches the driver; ``quiet``
    only turns Ray Data's progress bars off.
    """
    set_local_env()  # before Ray is imported: it reads some of these at import time
    import ray

    if ray.is_initialized():
        return
    repo = str(Path(__file__).resolve().parents[1])
    runtime_env = {"env_vars": {**LOCAL_ENV, "PYTHONPATH": repo}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level="WARNING")
    else:
        # the dashboard serves the State API, which Ray Train's placement-group cleaner polls
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
                 _temp_dir=short_temp_dir(), runtime_env=runtime_env, logging_level="WARNING")
    if quiet:
        quiet_data()


@dataclass
class HeadNode:
    """A ``ray start --head`` cluster with a dashboard (for ``ray job submit`` and ``serve deploy``)."""

    num_cpus: int = 4
    temp_dir: str = field(default_factory=short_temp_dir)
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout_s: float = 90.0) -> "HeadNode":
        env = {**os.environ, **LOCAL_ENV}
        ray_bin = str(Path(sys.executable).with_name("ray"))
        cmd = [ray_bin, "start", "--head", "--block", f"--port={self.gcs_port}", "--node-ip-address=127.0.0.1",
               f"--num-cpus={self.num_cpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}", "--disable-usage-stats"]
        log = open(Path(self.temp_dir) / "ray-start.log", "w")
        self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}: {(Path(self.temp_dir) / 'ray-start.log').read_text()[-2000:]}")
            if _dashboard_ready(self.dashboard_url):
                return self
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"the Ray head did not come up within {timeout_s:.0f}s")

    def stop(self) -> None:
        """End the process group this head started (never other Ray processes on the machine)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process = None


def _dashboard_ready(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
