"""``sgmft serve``: run the Serve app locally on 127.0.0.1 until Ctrl-C."""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
from typing import TYPE_CHECKING

from sgmft.commands import add_config_args, config_from_args

if TYPE_CHECKING:
    from serve_app.fastpath import FastPath
    from sgmft.config import Config

APP_NAME = "sgmft"


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("serve", help="serve a model directory over HTTP with Ray Serve",
                                 description="Deploy the SG-MFT Serve app (FastAPI ingress + batched model "
                                             "deployment) and block until Ctrl-C. Uses the cluster named by "
                                             "RAY_ADDRESS, or starts a local Ray.")
    parser.add_argument("--model", help="model directory: a path, or a URI (s3://, gs://, file://); "
                                        "defaults to serve.model_dir of the config")
    parser.add_argument("--name", default=APP_NAME, help="Serve application name (default: %(default)s)")
    parser.add_argument("--host", help="address to listen on (serve.host, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (serve.port, default 8000)")
    add_config_args(parser)
    parser.set_defaults(func=serve_command)


def serve_command(args: argparse.Namespace) -> int:
    import os

    from sgmft.model_dir import ModelDirError, is_uri, resolve_source
    from sgmft.config import ConfigError

    cfg = config_from_args(args)
    if args.model:
        cfg.serve.model_dir = args.model
    if args.host:
        cfg.serve.host = args.host
    if args.port is not None:
        if not 0 < args.port < 65536:
            raise ConfigError(f"--port {args.port}: must be between 1 and 65535")
        cfg.serve.port = args.port
    if not cfg.serve.model_dir:
        raise ModelDirError("no model directory: pass --model DIR or set serve.model_dir")
    cfg.serve.model_dir = resolve_source(cfg.serve.model_dir)
    if not is_uri(cfg.serve.model_dir) and not os.path.isdir(cfg.serve.model_dir):
        raise ModelDirError(f"model directory {cfg.serve.model_dir} does not exist")

    import ray
    from ray import serve
    from ray.serve.exceptions import RayServeException

    from serve_app.fastpath import use_fast_path
    from sgmft.local_ray import disconnect

    joined = bool(os.environ.get("RAY_ADDRESS"))  # a joined cluster has its own proxy settings, Serve and other apps
    fast = None if joined else use_fast_path()
    try:
        return serve_until_stopped(cfg, args.name, fast)
    finally:
        # Also when start-up failed (a proxy that never came up): nothing of the service stays.
        # The app is deleted (its replicas drain their requests), then a local Ray goes whole:
        # serve.shutdown() would first stop Serve's controller, whose own end Ray reports on
        # the console as a failed task at every stop.
        if ray.is_initialized():
            with contextlib.suppress(RayServeException):  # Serve never started
                serve.delete(args.name)
            if not joined:
                disconnect()
        if fast is not None:
            fast.stop_haproxy()  # Ray's shutdown leaves it running, holding the port


def serve_until_stopped(cfg: Config, name: str, fast: FastPath | None) -> int:
    """Start Serve and the app, then block until Ctrl-C or SIGTERM."""
    from ray import serve

    from sgmft.local_ray import connect
    from serve_app.app import build_app

    connect()
    stop = threading.Event()
    # SIGTERM as well as Ctrl-C: the app is taken down either way. After connect(): Ray's
    # driver installs its own SIGTERM handler, which aborts the process with nothing cleaned up.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    s = cfg.serve
    serve.start(http_options={"host": s.host, "port": s.port})
    try:
        serve.run(build_app(cfg), name=name, route_prefix=s.route_prefix)
        prefix = s.route_prefix.rstrip("/")
        url = f"http://{s.host}:{s.port}{prefix}"
        if fast is not None:
            print(f"HAProxy ingress: its stats port {fast.stats_port} and metrics port {fast.metrics_port} listen on every "
                  f"interface (keep them closed to the network); its files are in {fast.directory}", flush=True)
        print(f"serving {s.model_dir} at {url}/v1/predict  (API docs: {url}/docs); Ctrl-C to stop", flush=True)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    print("stopping", flush=True)
    return 0
