"""Ray nodes for the tests and benchmarks: a head (``ray start --head``) and worker nodes that
join it (``ray start --address``), each its own process group on 127.0.0.1, so one node can
be stopped, or killed as a lost machine would be, without touching any other Ray on the
machine.

Every cluster runs with Ray token authentication: the head makes a random token in a
mode-0600 file of its temp dir (:func:`sgmft.local_ray.new_token_file`) and every node,
client and job of the cluster reads that file (:func:`sgmft.local_ray.token_env`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from sgmft.local_ray import LOCAL_ENV, free_port, new_token_file, short_temp_dir, token_env, use_token

RAY = str(Path(sys.executable).with_name("ray"))
REPO = Path(__file__).resolve().parents[1]
NODE_LABEL = "sgmft-node"


def _answers(url: str, headers: dict[str, str]) -> bool:
    """Whether ``url`` answers 200 with ``headers`` within 2 s."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _session_pids(sid: int) -> list[int]:
    """Every live process of session ``sid``. Ray's raylet puts each worker it forks in a
    process group of its own, but they stay in the session of the node that started them."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # the fields after the command (which may hold spaces) are: state ppid pgrp session
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            pids.append(int(stat.parent.name))
    return pids


def _end_session(process: subprocess.Popen, sig: int, wait_s: float = 10.0) -> None:
    """Send ``sig`` to every process of the session ``process`` leads (``start_new_session``),
    then SIGKILL what is left after ``wait_s``: exactly the processes that node started."""
    for attempt_sig in (sig, signal.SIGKILL):
        for pid in _session_pids(process.pid):
            try:
                os.kill(pid, attempt_sig)
            except ProcessLookupError:
                pass
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + wait_s
        while _session_pids(process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _session_pids(process.pid):
            return


@dataclass
class HeadNode:
    """A ``ray start --head`` cluster with a dashboard (for ``ray job submit`` and ``serve deploy``),
    with token authentication: clients use :meth:`client_env` (subprocesses) or :meth:`use`
    (this process, before ``ray.init``)."""

    num_cpus: int = 4
    temp_dir: str = field(default_factory=short_temp_dir)
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    agent_port: int = field(default_factory=free_port)
    """The head's dashboard agent's HTTP port: the dashboard hands submitted jobs to it."""
    process: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)
    """More environment for the cluster's Ray processes, so for its workers, replicas and job drivers."""
    object_store_mb: int | None = None
    """None: Ray's default (30% of the memory)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom resources of the head (``ray start --resources``)."""
    token_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.token_path = new_token_file(self.temp_dir)

    @property
    def token(self) -> str:
        return self.token_path.read_text().strip()

    def client_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment for a client subprocess (``ray job submit``, ``serve deploy``): ``base``
        (default: ``os.environ``) with this cluster's token."""
        return token_env(self.token_path, base)

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def use(self) -> None:
        """Make this process a client of this cluster (before ``ray.init(address=self.address)``)."""
        use_token(self.token_path)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self, timeout_s: float = 90.0) -> "HeadNode":
        env = token_env(self.token_path, {**os.environ, **LOCAL_ENV, **self.env})
        cmd = [RAY, "start", "--head", "--block", f"--port={self.gcs_port}", "--node-ip-address=127.0.0.1",
               f"--num-cpus={self.num_cpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
               # the agent's HTTP port is otherwise a fixed 52365: another Ray on this machine would
               # hold it, and jobs would be refused ("No available agent to submit job")
               f"--dashboard-agent-listen-port={self.agent_port}"]
        if self.object_store_mb:
            cmd.append(f"--object-store-memory={self.object_store_mb * 2**20}")
        if self.resources:
            cmd.append(f"--resources={json.dumps(self.resources)}")
        log = open(Path(self.temp_dir) / "ray-start.log", "w")
        self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}: {(Path(self.temp_dir) / 'ray-start.log').read_text()[-2000:]}")
            # ready for jobs: the dashboard answers with the token, and its agent on its own port
            # (a port taken by another process between choosing and binding would refuse every job)
            if _answers(f"{self.dashboard_url}/api/version", self.auth_headers()) and \
                    _answers(f"http://127.0.0.1:{self.agent_port}/api/healthz", {}):
                return self
            time.sleep(1.0)
        logs = self.log_tail("dashboard.log", "dashboard_agent.log")
        self.stop()
        raise TimeoutError(f"the Ray head (dashboard :{self.dashboard_port}, agent :{self.agent_port}) did not come up "
                           f"within {timeout_s:.0f}s\n{logs}")

    def log_tail(self, *names: str, chars: int = 1500) -> str:
        """The ends of this head's log files ``names`` (in ``session_latest/logs``), for error messages."""
        logs = Path(self.temp_dir) / "session_latest" / "logs"
        tails = []
        for name in names:
            try:
                tails.append(f"--- {name}:\n{(logs / name).read_text(errors='replace')[-chars:]}")
            except OSError as exc:
                tails.append(f"--- {name}: unreadable ({exc})")
        return "\n".join(tails)

    def stop(self) -> None:
        """End the process group this head started (never other Ray processes on the machine)."""
        if self.process is not None:
            _end_session(self.process, signal.SIGTERM)
        self.process = None


@dataclass
class WorkerNode:
    """A node that joins ``head``, in a process group of its own: this module run as a script
    (:func:`join`), the raylet with its object store, the node's agents and every worker
    process the raylet forks. :meth:`kill` ends them all at once with SIGKILL, as a lost
    machine would; :meth:`stop` is the polite way out.

    ``name`` is a node label (``sgmft-node``), so tests find this node in Ray's node list."""

    head: HeadNode
    name: str
    num_cpus: int = 2
    object_store_mb: int = 150
    process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> "WorkerNode":
        env = token_env(self.head.token_path, {**os.environ, **LOCAL_ENV, **self.head.env})
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        cmd = [sys.executable, str(Path(__file__).resolve()), self.head.address, self.name, str(self.num_cpus),
               str(self.object_store_mb)]
        log_path = Path(self.head.temp_dir) / f"node-{self.name}.log"
        self.process = subprocess.Popen(cmd, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"node {self.name} exited with {self.process.returncode}: {log_path.read_text()[-2000:]}")
            if self.node_id() is not None:
                return self
            time.sleep(1.0)
        self.kill()
        raise TimeoutError(f"node {self.name} did not join {self.head.address} within {timeout_s:.0f}s: "
                           f"{log_path.read_text()[-2000:]}")

    def node_id(self) -> str | None:
        """This node's id while Ray counts it alive (the caller is connected to the cluster)."""
        import ray

        for node in ray.nodes():
            if node["Alive"] and node.get("Labels", {}).get(NODE_LABEL) == self.name:
                return node["NodeID"]
        return None

    def kill(self) -> None:
        """Lose this node: SIGKILL to its raylet and every process it started, no goodbye."""
        if self.process is not None:
            _end_session(self.process, signal.SIGKILL)
        self.process = None

    def stop(self) -> None:
        if self.process is not None:
            _end_session(self.process, signal.SIGTERM)
        self.process = None


def join(gcs_address: str, name: str, num_cpus: int, object_store_mb: int) -> None:
    """Run a Ray node that joins ``gcs_address``, until this process is killed.

    What ``ray start --address --block`` does, less its rewriting of the address: with
    multi-node allowed it turns ``127.0.0.1`` (the head's, and this node's, address) into the
    machine's outward IP, where a head on loopback does not listen. Multi-node is allowed
    here as Ray's own ``cluster_utils`` runs nodes on one machine: a ``Node`` per process.
    """
    import ray._private.node
    import ray._private.parameter

    params = ray._private.parameter.RayParams(
        node_ip_address="127.0.0.1", gcs_address=gcs_address, num_cpus=num_cpus, num_gpus=0,
        object_store_memory=object_store_mb * 2**20, labels={NODE_LABEL: name}, node_manager_port=0,
        min_worker_port=0, max_worker_port=0, dashboard_agent_listen_port=None,
        include_log_monitor=False)  # the head's log monitor already reads this machine's session logs
    ray._private.node.Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)
    print(f"node {name} joined {gcs_address}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    join(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
