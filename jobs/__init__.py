"""Entrypoints that ``ray job submit`` runs; each runs one ``sgmft`` command, as the CLI would.

They import the pipeline commands (:mod:`sgmft.commands`) alone, not the whole command
line (:mod:`sgmft.cli`), so a job never loads the serving or dataset-building commands.
"""

from __future__ import annotations

import argparse
import sys


def run(command: str) -> None:
    """Run ``sgmft <command> <argv...>`` and exit with its status."""
    from sgmft import commands
    from sgmft.cli_args import run_command

    parser = argparse.ArgumentParser(prog="sgmft")
    commands.register(parser.add_subparsers(dest="command", required=True))
    sys.exit(run_command(parser, [command, *sys.argv[1:]]))
