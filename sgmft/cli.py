"""The ``sgmft`` command line: the commands of every workflow, gathered.

Each command lives next to the code it runs (``sgmft.train``, ``sgmft.tune``, ...,
``sgmft.data.cli``, ``serve_app.cli``) and takes what commands share from
:mod:`sgmft.commands`, never from this module, so the imports only go one way.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

from serve_app import cli as serve_cli
from sgmft.commands import PIPELINE, run_command
from sgmft.config import BACKBONE_PRESETS, BackboneConfig, choices
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
    summary.add_argument("--implementation", choices=choices(BackboneConfig, "implementation"), default=BackboneConfig.implementation)
    summary.add_argument("--preset", default=BackboneConfig.preset, help=f"one of {', '.join(BACKBONE_PRESETS)}")
    summary.set_defaults(func=_model_summary)

    data_cli.register(subcommands)
    for name in PIPELINE:
        importlib.import_module(f"sgmft.{name}").add_commands(subcommands)
    serve_cli.register(subcommands)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
