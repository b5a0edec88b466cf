"""Entrypoints that ``ray job submit`` runs; each is a thin wrapper over the ``sgmft`` CLI."""

from __future__ import annotations

import sys


def run(command: str) -> None:
    """Run ``sgmft <command> <argv...>`` and exit with its status."""
    from sgmft.cli import main

    sys.exit(main([command, *sys.argv[1:]]))
