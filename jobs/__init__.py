"""Entrypoints that ``ray job submit`` runs; each runs one ``sgmft`` command, as the CLI would.

They gather the pipeline workflows' commands (:data:`sgmft.commands.PIPELINE`, the list the
command line reads too), not the whole command line (:mod:`sgmft.cli`), so a job never loads
the serving or dataset-building commands.
"""

from __future__ import annotations

import argparse
import importlib
import sys


def run(command: str) -> None:
    """Run ``sgmft <command> <argv...>`` and exit with its status."""
    from sgmft.commands import PIPELINE, run_command

    parser = argparse.ArgumentParser(prog="sgmft")
    subcommands = parser.add_subparsers(dest="command", required=True)
    for name in PIPELINE:
        importlib.import_module(f"sgmft.{name}").add_commands(subcommands)
    sys.exit(run_command(parser, [command, *sys.argv[1:]]))
