"""The ``sgmft`` command line. Each command imports its heavy modules only when it runs."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from sgmft.config import Config, ConfigError, load_config

Command = Callable[[argparse.Namespace], int | None]


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (defaults when omitted)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None), getattr(args, "overrides", []))


def _model_summary(args: argparse.Namespace) -> None:
    from sgmft.config import model_config_for
    from sgmft.models.summary import summarize

    cfg = model_config_for(args.preset)
    cfg.backbone.implementation = args.implementation
    print(summarize(cfg))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sgmft", description="SG-MFT semantic location prediction on Ray")
    commands = parser.add_subparsers(dest="command", required=True)

    model = commands.add_parser("model", help="inspect model architectures").add_subparsers(dest="model_command", required=True)
    summary = model.add_parser("summary", help="parameters and forward FLOPs of backbone and head")
    summary.add_argument("--preset", default="tiny")
    summary.add_argument("--implementation", choices=["cn_clip", "hf"], default="cn_clip")
    summary.set_defaults(func=_model_summary)

    for register in _registrars():
        register(commands)
    return parser


def _registrars() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Command groups defined next to the code they run."""
    import importlib

    found = []
    for module in ("sgmft.data.cli", "sgmft.commands", "serve_app.cli"):
        try:
            found.append(importlib.import_module(module).register)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return found


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
