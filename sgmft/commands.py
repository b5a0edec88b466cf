"""What every command shares: ``--config``/``--set``, ``--verbose``, the list of pipeline
workflows, running a parsed command (:func:`run_command`), the Ray it runs on
(:func:`ray_for_command`) and how it talks to the user.

Each command prints what is about to run and where its files go, a progress bar while Ray
works (on a terminal: posts done, posts/s, ETA), one line per epoch, and a summary. Ray's
own output goes to the log directory the banner names (see :mod:`sgmft.console`);
``--verbose`` shows it here instead.

The commands live with the workflow they run (``sgmft.train``, ``sgmft.tune``, ...,
``sgmft.data.cli``, ``serve_app.cli``); ``sgmft.cli`` and the ``jobs`` entrypoints gather
them. This module sits below all of them, so no import goes back up.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from sgmft.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from sgmft.console import Console


PIPELINE = ("train", "pretrain", "tune", "features", "ablate", "evaluate", "predict")
"""The workflows (modules of ``sgmft``, each with its ``add_commands``) that ``ray job submit``
can run too, in --help order: the one list that ``sgmft.cli`` and ``jobs``, the floor above
the workflows, both read. Names rather than modules, so that this module imports none of them."""


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (defaults when omitted)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")


def add_verbose_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="show Ray's own logs and the workers' output here instead of in the run's log files")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None), getattr(args, "overrides", []))


USER_ERRORS = (FileNotFoundError, ValueError)
"""What a command raises for the user's own mistake (a path, a value): said in one line."""


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command it names; its exit status. A config error, or a
    missing file or bad value of the user's, is one line on stderr and status 2."""
    from sgmft.local_ray import set_local_env

    set_local_env()  # before any command imports Ray, which reads these at import time
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except ConfigError as exc:
        print(f"sgmft: config error: {exc}", file=sys.stderr)
        return 2
    except USER_ERRORS as exc:
        print(f"sgmft: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


def show_path(path: str | Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def print_where(label: str, directory: str | Path, log_dir: Path, verbose: bool) -> None:
    """The banner's second line: where the outputs go, and where Ray's logs go unless --verbose."""
    logs = "" if verbose else f" (Ray's logs: {show_path(log_dir)})"
    print(f"{label}: {show_path(directory)}{logs}", flush=True)


def cluster_name() -> str:
    return "the Ray cluster at RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "local Ray"


def data_source(cfg) -> str:
    if cfg.train.features_path:
        return f"cached features {cfg.train.features_path}"
    if cfg.data.path:
        return f"data {cfg.data.path}"
    return f"{cfg.data.synth.n} synthetic Weibo-like posts"


@contextlib.contextmanager
def ray_for_command(args: argparse.Namespace, log_dir: Path) -> Iterator["Console"]:
    """Ray for one command: joined or started quietly (Ray's output to ``log_dir``) unless
    --verbose. Yields the user's console. A Ray this command started is shut down on the way
    out, still inside the quiet console, so its last words are logged too: print the summary
    after the block."""
    from sgmft.console import WORKERS_LOG, quiet_console
    from sgmft.local_ray import connect, disconnect

    verbose = getattr(args, "verbose", False)
    kept = None
    try:
        with quiet_console(None if verbose else log_dir) as console:
            started = connect(worker_log=None if verbose else log_dir / WORKERS_LOG)
            broke = False
            try:
                yield console
            except Exception as exc:
                broke = not isinstance(exc, USER_ERRORS)
                raise
            finally:
                if started:
                    kept = disconnect(keep_files=broke)  # what broke keeps the local Ray's own logs
    except Exception as exc:
        if not verbose and not isinstance(exc, USER_ERRORS):  # those are the user's, one line
            print(f"sgmft: Ray's logs are in {show_path(log_dir)}" + (f" and {kept}" if kept else ""), file=sys.stderr)
        raise


def progress_bars(console: "Console", per_run: bool = True):
    from sgmft.progress import Progress

    return Progress(out=console.out, term=console.term, per_run=per_run)


def check_inputs(model: str, data: str) -> None:
    """The user's typos, refused before any Ray starts or any log directory is made."""
    from sgmft.model_dir import check_model_dir

    check_model_dir(model)
    if not Path(data).exists():
        raise FileNotFoundError(f"{data} does not exist")


def log_dir_beside(out: str | Path) -> Path:
    """The log directory of a command whose output directory must start empty: next to it."""
    out = Path(out).resolve()
    return out.with_name(out.name + ".logs")
