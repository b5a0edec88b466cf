"""Local Ray for the CLI, tests and benchmarks: on 127.0.0.1, quiet, self-contained.

``connect()`` joins the cluster named by RAY_ADDRESS (what ``ray job submit`` sets) or
starts an in-process local one. (The tests' ``ray start`` clusters are ``tests/ray_nodes.py``.)

Every local cluster runs with Ray token authentication (``RAY_AUTH_MODE=token``): its own
random token, in a mode-0600 file inside the cluster's temp dir, handed to Ray's processes
and clients through ``RAY_AUTH_TOKEN_PATH``. Ray finds a token in this order: the
``RAY_AUTH_TOKEN`` variable, then the file named by ``RAY_AUTH_TOKEN_PATH``, then
``~/.ray/auth_token``; so ``RAY_AUTH_TOKEN`` is dropped from their environment (it would
win over the file) and nothing is written to ``~/.ray``. A joined cluster (RAY_ADDRESS)
keeps whatever authentication the caller's environment sets up for it.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Mapping

LOCAL_ENV = {
    # keeps Ray's own traffic on loopback and reports no usage. RAY_AUTH_MODE is not here:
    # a local cluster turns token auth on with its own token (below), a joined one
    # (RAY_ADDRESS, e.g. a job's driver) keeps the mode its environment gives.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_V2_ENABLED": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Ray Data's progress bars interleave with the per-epoch lines of every worker and trial
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    # Ray Train's workers would send every print() both to their stdout and, through its
    # logger, to their stderr: each line reached the driver twice
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def set_local_env() -> None:
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)


PORT_RANGE = (20000, 32768)
"""Where :func:`free_port` looks: above Ray's worker ports (10002-19999 by default) and below
Linux's ephemeral range (32768-60999), from which every Ray process that binds port 0 takes
its own. A port picked from the ephemeral range was taken by such a process between choosing
and binding (a head's dashboard failed so: "address already in use")."""
_handed_out: set[int] = set()  # ports chosen but maybe not bound yet: never handed out twice


def free_port() -> int:
    """A port on 127.0.0.1 that nothing holds now, outside the ranges Ray's processes draw from."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(*PORT_RANGE)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise OSError(f"no free port on 127.0.0.1 in {PORT_RANGE[0]}-{PORT_RANGE[1] - 1} after 200 tries")


def short_temp_dir(prefix: str = "sgmft-ray-") -> str:
    # Ray's Unix socket paths must stay under ~107 characters.
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


TOKEN_FILE = "auth_token"


def new_token_file(directory: str | Path) -> Path:
    """A fresh random token (256 bits, as ``ray get-auth-token --generate``) in ``directory``, mode 0600."""
    path = Path(directory) / TOKEN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def token_env(token_path: str | Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) for a process or client of the cluster
    whose token is in ``token_path``: token mode, that file, and no ``RAY_AUTH_TOKEN``."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k != "RAY_AUTH_TOKEN"}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)})
    return env


def use_token(token_path: str | Path) -> None:
    """Make this process a client of the cluster whose token is in ``token_path`` (call it
    before ``ray.init``). Ray caches the mode and the token per process: both are reloaded."""
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)})
    # Private (ray._raylet): Ray has no public call that makes a process read its auth mode
    # and token again, and a process that is a client of two clusters in turn (a test session,
    # a benchmark) needs one. Ray's own `ray get-auth-token` command does the same.
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")  # the config first, then the token (the order of Ray's own test helper)
    AuthenticationTokenLoader.instance().reset_cache()


def quiet_data() -> None:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


_started_dir: str | None = None
"""The temp dir of the local Ray that :func:`connect` started in this process, if any."""


def connect(num_cpus: int | None = None, quiet: bool = True, worker_log: str | Path | None = None) -> bool:
    """Join RAY_ADDRESS's cluster, or start a local one on this machine; True if this call
    did either (False: Ray was already initialized, and nothing was changed).

    A local cluster gets its own token (see the module doc); a joined one is reached with
    the authentication of this process's environment (RAY_AUTH_MODE, RAY_AUTH_TOKEN[_PATH]).
    The output of Ray's workers reaches this driver's console, or with ``worker_log`` that
    file only. ``quiet`` turns Ray Data's progress bars off.
    """
    set_local_env()  # before Ray is imported: it reads some of these at import time
    import ray

    if ray.is_initialized():
        return False
    dispatcher = _worker_output_dispatcher() if worker_log else None
    # with no way to redirect the workers' output, a log file means not forwarding it at all
    log_to_driver = dispatcher is not None or not worker_log
    repo = str(Path(__file__).resolve().parents[1])
    runtime_env = {"env_vars": {**LOCAL_ENV, "PYTHONPATH": repo}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level="WARNING", log_to_driver=log_to_driver)
    else:
        global _started_dir
        temp_dir = _started_dir = short_temp_dir()
        # Ray's processes started by ray.init inherit this environment, so they share the token
        use_token(new_token_file(temp_dir))
        # the dashboard serves the State API, which Ray Train's placement-group cleaner polls.
        # _node_ip_address and _temp_dir are underscored (private) arguments with no public
        # equivalent: the first keeps every process of the cluster on 127.0.0.1, the second keeps
        # Ray's socket paths short and the token file beside them.
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
                 _temp_dir=temp_dir, runtime_env=runtime_env, logging_level="WARNING", log_to_driver=log_to_driver)
    if dispatcher is not None:
        _write_worker_output_to(dispatcher, Path(worker_log))
    if quiet:
        quiet_data()
    return True


def disconnect(keep_files: bool = False) -> str | None:
    """``ray.shutdown()``; a local Ray that :func:`connect` started leaves no files behind
    (its sockets, token and session logs, 10-30 MB a run, in a new folder of /tmp each time),
    unless ``keep_files``, for a run that failed: then that folder, for its logs."""
    import ray

    global _started_dir
    ray.shutdown()
    started, _started_dir = _started_dir, None
    if started is None or keep_files:
        return started
    shutil.rmtree(started, ignore_errors=True)
    return None


def _autoscaler_events(lines: list[str]) -> list[str]:
    # Private: the filter Ray's own driver applies to the autoscaler's output, so the log says
    # what Ray would have printed; no public function does it. Without it, nothing is logged.
    try:
        from ray._private.worker import filter_autoscaler_events

        return list(filter_autoscaler_events(lines))
    except Exception:
        return []


_PRINT_HANDLER = "ray_print_logs"  # the name ray.init gives the handler that prints worker output


def _worker_output_dispatcher():
    """Ray's dispatcher of the worker output it forwards to the driver, if this Ray has one.

    Private (ray._private.ray_logging): Ray's public choice is log_to_driver on or off; only
    its dispatcher can send the forwarded output to a file of the run instead of the console.
    """
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return None
    return dispatcher if hasattr(dispatcher, "add_handler") and hasattr(dispatcher, "remove_handler") else None


def _write_worker_output_to(dispatcher, path: Path) -> None:
    """Replace the printing of forwarded worker output with appending it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")

    def write(batch: dict) -> None:
        lines = batch.get("lines", [])
        if batch.get("pid") == "autoscaler":  # its periodic status dumps: only the events, as Ray prints them
            lines = _autoscaler_events(lines)
        source = batch.get("actor_name") or batch.get("task_name") or ""
        prefix = f"({source} pid={batch.get('pid')}{' stderr' if batch.get('is_err') else ''}) "
        log.writelines(prefix + line + "\n" for line in lines)

    dispatcher.remove_handler(_PRINT_HANDLER)
    dispatcher.add_handler(_PRINT_HANDLER, write)  # ray.shutdown removes it by this name
