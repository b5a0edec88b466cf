"""What the command groups share: ``--config``/``--set``, ``--verbose``, and running a
parsed command (:func:`run_command`).

A module of its own so that the command modules (``sgmft.commands``, ``sgmft.data.cli``,
``serve_app.cli``), ``sgmft.cli``, which imports them, and the ``jobs`` entrypoints, which
import only the pipeline commands, never import each other back.
"""

from __future__ import annotations

import argparse
import sys

from sgmft.config import Config, ConfigError, load_config


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (defaults when omitted)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")


def add_verbose_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="show Ray's own logs and the workers' output here instead of in the run's log files")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None), getattr(args, "overrides", []))


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
    except (FileNotFoundError, ValueError) as exc:
        print(f"sgmft: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)
