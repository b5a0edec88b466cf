"""Where Ray's own output goes while a CLI command runs.

A command's console shows what the user needs (a banner, a progress bar, one line per
epoch, the summary). Everything Ray writes goes to the run's log directory instead:

- ``driver.log``: this process's file descriptors 1 and 2, which carry Ray's Python logging
  on the driver (Ray Data's Parquet estimates and "execution finished" notes, warnings),
  what Ray prints on the driver (Tune's experiment box, the raylet's messages such as
  "N PYTHON worker processes have been started"), Python warnings, and the C++ core
  worker's own lines (``core_worker.cc ...``), which no Python logging setting reaches;
- ``workers.log``: the output of Ray's workers (Train controller and workers, Ray Data's
  coordinators) that Ray forwards to the driver (see :func:`sgmft.local_ray.connect`).

The command's own lines go to :attr:`Console.out` and progress bars to :attr:`Console.term`,
streams on the terminal's stdout and stderr. ``--verbose`` skips all this.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO

DRIVER_LOG = "driver.log"
WORKERS_LOG = "workers.log"


@dataclass
class Console:
    out: TextIO
    """The user's stdout: the command's lines."""
    term: TextIO
    """The user's stderr: progress bars."""


def _reopen(fd: int, like: TextIO) -> TextIO:
    return os.fdopen(fd, "w", buffering=1, encoding=getattr(like, "encoding", None) or "utf-8", errors="backslashreplace")


@contextlib.contextmanager
def quiet_console(log_dir: str | Path | None) -> Iterator[Console]:
    """Send fds 1 and 2 to ``log_dir/driver.log`` for the duration; yields streams on the
    user's stdout and stderr. ``log_dir=None`` changes nothing and yields sys.stdout/stderr."""
    if log_dir is None:
        yield Console(sys.stdout, sys.stderr)
        return
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    console = Console(out=_reopen(os.dup(saved[1]), sys.stdout), term=_reopen(os.dup(saved[2]), sys.stderr))
    log_fd = os.open(log_dir / DRIVER_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for fd in (1, 2):
        os.dup2(log_fd, fd)
    os.close(log_fd)
    try:
        yield console
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        console.out.close()
        console.term.close()
