"""The ``sgmft`` command line. Each command imports its heavy modules only when it runs.

The command groups live next to the code they run (``sgmft.commands``, ``sgmft.data.cli``,
``serve_app.cli``); they take their shared arguments from :mod:`sgmft.cli_args`, never
from this module, so the imports only go one way.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from serve_app import cli as serve_cli
from sgmft import commands
from sgmft.config import ConfigError
from sgmft.data import cli as data_cli

Command = Callable[[argparse.Namespace], int | None]


def _model_summary(args: argparse.Namespace) -> None:
    from sgmft.config import model_config_for
    from sgmft.models.summary import summarize

    cfg = model_config_for(args.preset)
    cfg.backbone.implementation = args.implementation
    print(summarize(cfg))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sgmft", description="SG-MFT semantic location prediction on Ray")
    subcommands = parser.add_subparsers(dest="command", required=True)

    model = subcommands.add_parser("model", help="inspect model architectures").add_subparsers(dest="model_command", required=True)
    summary = model.add_parser("summary", help="parameters and forward FLOPs of backbone and head")
    summary.add_argument("--preset", default="tiny")
    summary.add_argument("--implementation", choices=["cn_clip", "hf"], default="cn_clip")
    summary.set_defaults(func=_model_summary)

    for group in (data_cli, commands, serve_cli):
        group.register(subcommands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from sgmft.local_ray import set_local_env

    set_local_env()  # before any command imports Ray, which reads these at import time
    parser = build_parser()
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


if __name__ == "__main__":
    sys.exit(main())
