"""Arguments the command groups share: ``--config``/``--set`` and ``--verbose``.

A module of its own so that the command modules (``sgmft.commands``, ``sgmft.data.cli``,
``serve_app.cli``) and ``sgmft.cli``, which imports them, never import each other back.
"""

from __future__ import annotations

import argparse

from sgmft.config import Config, load_config


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (defaults when omitted)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")


def add_verbose_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="show Ray's own logs and the workers' output here instead of in the run's log files")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None), getattr(args, "overrides", []))
