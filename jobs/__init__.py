"""Entrypoints that ``ray job submit`` runs; each runs one ``sgmft`` command, as the CLI would.

They gather the pipeline workflows' commands themselves, not the whole command line
(:mod:`sgmft.cli`), so a job never loads the serving or dataset-building commands.
"""

from __future__ import annotations

import argparse
import sys


def run(command: str) -> None:
    """Run ``sgmft <command> <argv...>`` and exit with its status."""
    from sgmft import ablate, evaluate, features, predict, train, tune
    from sgmft.cli_args import run_command

    parser = argparse.ArgumentParser(prog="sgmft")
    subcommands = parser.add_subparsers(dest="command", required=True)
    for workflow in (train, tune, features, ablate, evaluate, predict):
        workflow.add_commands(subcommands)
    sys.exit(run_command(parser, [command, *sys.argv[1:]]))
