"""Progress from Ray's workers to the driver's console.

The driver opens a :class:`Progress` around a run (Ray Train, Ray Tune, or a Ray Data
prediction pass). It creates :class:`ProgressBoard`, a small actor named ``sgmft-progress``
in the job's namespace, and polls it from a thread: it draws one tqdm bar (posts done,
posts/s, ETA) on the terminal, and prints the lines the workers post (the epoch lines) on
stdout, once each and in order. When the terminal is not a TTY there is no bar, only the
lines.

Workers find the board by name, so nothing has to be threaded through a loop config: rank 0
of a Ray Train run keeps a :class:`Reporter` and sends its step count every ~0.5 s, a Ray
Data actor calls :meth:`Reporter.advance` per batch. With no board (a TorchTrainer run
outside the CLI), reporters do nothing and :meth:`Reporter.message` returns False, so the
caller prints the line itself.

This module imports only Ray (lazily) and tqdm: workers import it.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, TextIO

BOARD_NAME = "sgmft-progress"
REPORT_INTERVAL_S = 0.5
POLL_INTERVAL_S = 0.5


class ProgressBoard:
    """Actor state: the tasks in flight and the lines to print, in the order they came.

    A task is a key (a run directory, ``"predict"``...) with a description (``"epoch 2/5"``),
    a count done within it and, when known, a total. ``processed`` counts every post over
    all tasks and phases, for runs of many trials at once.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.tasks: dict[str, dict[str, Any]] = {}
        self.messages: list[tuple[str, str]] = []
        self.processed = 0
        self.heard_at: dict[str, float] = {}
        """When each key was last heard of (a count, a line): a run's sign of life."""
        self.controllers: dict[str, Any] = {}
        self.restarts: dict[str, str] = {}
        """A restart's line waiting for the restarted rank 0's first line, to print as one."""

    def heard(self, key: str) -> None:
        self.heard_at[key] = time.monotonic()

    def idle(self, key: str) -> tuple[float, Any]:
        """Seconds since ``key`` was last heard of, and the controller of its run (or None)."""
        return time.monotonic() - self.heard_at.get(key, time.monotonic()), self.controllers.get(key)

    def watch(self, key: str, controller: Any) -> None:
        """``key``'s run is driven by ``controller`` (a Ray Train controller), to abort a stall with."""
        self.controllers[key] = controller
        self.heard(key)

    def restarted(self, key: str, line: str, resumes: bool, resume_point: str) -> None:
        """``key``'s worker group restarts after ``line``'s loss. With a checkpoint to resume
        from, the restarted rank 0's first line (where it resumed) completes it; without, it
        is said now."""
        self.heard(key)
        if resumes:
            self.restarts[key] = line
        else:
            self.messages.append((key, f"{line}; {resume_point}"))

    def update(self, key: str, done: int | None = None, add: int = 0, total: int | None = None,
               desc: str | None = None) -> None:
        task = self.tasks.setdefault(key, {"desc": "", "done": 0, "total": None})
        if desc is not None and desc != task["desc"]:
            task.update(desc=desc, done=0, total=None)
        if total is not None:
            task["total"] = total
        if done is not None:
            self.processed += max(0, done - task["done"])
            task["done"] = done
        if add:
            self.processed += add
            task["done"] += add
        task["updated"] = time.monotonic()
        self.heard(key)

    def message(self, key: str, text: str) -> None:
        restart = self.restarts.pop(key, None)
        self.messages.append((key, f"{restart}; {text}" if restart else text))
        self.heard(key)

    def snapshot(self, since: int) -> dict[str, Any]:
        now = time.monotonic()  # ages, not times: the driver may be on another node
        return {"tasks": {k: {**v, "age": now - v["updated"]} for k, v in self.tasks.items()},
                "messages": self.messages[since:], "processed": self.processed}


def find_board():
    """The board of this job's driver, or None (no Ray, or no driver showing progress)."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return ray.get_actor(BOARD_NAME)
    except Exception:  # not found (ValueError), or no Ray at all: report nothing
        return None


class Reporter:
    """Worker side: sends counts to the board, at most every ``interval`` seconds."""

    def __init__(self, key: str, interval: float = REPORT_INTERVAL_S, board: Any = "find") -> None:
        self.key = str(key)
        self.interval = interval
        self.board = find_board() if board == "find" else board
        self._last = 0.0
        self._pending = 0

    @property
    def active(self) -> bool:
        return self.board is not None

    def _due(self, force: bool) -> bool:
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            return True
        return False

    def update(self, done: int, total: int | None = None, desc: str | None = None, force: bool = False) -> None:
        """Where this task stands (``done`` out of ``total`` posts in phase ``desc``)."""
        if self.board is not None and self._due(force or done == total):
            self.board.update.remote(self.key, done=done, total=total, desc=desc)

    def advance(self, n: int) -> None:
        """``n`` more posts done (many actors may advance the same task)."""
        if self.board is None:
            return
        self._pending += n
        if self._due(False):
            self.board.update.remote(self.key, add=self._pending)
            self._pending = 0

    def message(self, text: str) -> bool:
        """Post a line for the driver to print; False when there is no board to post to."""
        if self.board is None:
            return False
        self.board.message.remote(self.key, text)
        return True


_active: "Progress | None" = None


def showing() -> bool:
    """Whether this driver shows progress now (a :class:`Progress` is open)."""
    return _active is not None


def expect(key: str, total: int | Callable[[], int] | None, desc: str) -> None:
    """Driver side, before a pass whose workers :meth:`Reporter.advance` ``key``: its size and
    name for the bar. Does nothing (and never computes ``total``) when no progress is shown."""
    if _active is not None and _active.board is not None:
        _active.board.update.remote(key, done=0, total=total() if callable(total) else total, desc=desc)


class Progress:
    """Driver side: the board, and a thread that renders it while the main thread waits on Ray.

    ``per_run=False`` (Tune, ablation: many trials at once) shows one bar of all the posts
    processed, and prefixes each line with the trial it came from.
    """

    def __init__(self, out: TextIO | None = None, term: TextIO | None = None, per_run: bool = True,
                 unit: str = "posts") -> None:
        self.out = out or sys.stdout
        self.term = term or sys.stderr
        self.per_run = per_run
        self.unit = unit
        self.bars = bool(getattr(self.term, "isatty", lambda: False)())
        self.board = None
        self._seen = 0
        self._bar = None
        self._bar_id: tuple | None = None
        self._finished: set[tuple] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Progress":
        global _active
        import ray

        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # on the driver's node, which a run cannot outlive: a board on a node that dies would
        # take every later line with it, and reporters hold on to the board they found
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.board = ray.remote(num_cpus=0)(ProgressBoard).options(name=BOARD_NAME, get_if_exists=True,
                                                                   scheduling_strategy=here).remote()
        ray.get(self.board.reset.remote())  # up (and empty, if an earlier run left it) before any worker looks
        _active = self
        self._thread = threading.Thread(target=self._run, name="sgmft-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        global _active
        import ray

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._poll()  # the lines posted last (the final epoch's)
        self._close_bar()
        _active = None
        try:
            ray.kill(self.board)
        except Exception:  # Ray already gone (a failed run): so is the board
            pass

    def _run(self) -> None:
        while not self._stop.wait(POLL_INTERVAL_S):
            self._poll()

    def _poll(self) -> None:
        import ray

        try:
            snap = ray.get(self.board.snapshot.remote(self._seen), timeout=10)
        except Exception:  # the board is gone or slow: skip this round, the run goes on
            return
        self._seen += len(snap["messages"])
        for key, text in snap["messages"]:
            self.print(f"[{Path(key).name}] {text}" if not self.per_run else text)
        if self.bars:
            self._render(snap)

    def print(self, text: str) -> None:
        """A line on stdout, above the bar; a full bar (the epoch this line reports) goes."""
        bar = self._bar
        if bar is not None and bar.total is not None and bar.n >= bar.total:
            self._finished.add(self._bar_id)
            self._close_bar()
        elif bar is not None:
            bar.clear()
        print(text, file=self.out, flush=True)
        if self._bar is not None:
            self._bar.refresh()

    def _render(self, snap: dict[str, Any]) -> None:
        if not snap["tasks"]:  # Ray, data and workers starting: a clock, so the wait shows
            if self._bar_id is None:
                self._open_bar(("start",), "starting Ray and the workers", None, bar_format="{desc} {elapsed}")
            else:
                self._bar.refresh()
            return
        if self.per_run:
            key, task = min(snap["tasks"].items(), key=lambda kv: kv[1]["age"])
            bar_id, desc, done, total = (key, task["desc"]), task["desc"], task["done"], task["total"]
        else:
            recent = [t for t in snap["tasks"].values() if t["age"] < 30]
            bar_id, desc, done, total = ("all",), f"{len(recent)} trial{'s' if len(recent) != 1 else ''} running", snap["processed"], None
        if bar_id in self._finished:
            return
        if bar_id != self._bar_id:
            self._close_bar()
            self._open_bar(bar_id, desc, total)
        bar = self._bar
        if not self.per_run:
            bar.set_description_str(desc, refresh=False)
        if total is not None and bar.total != total:
            bar.total = total
        if done > bar.n:
            bar.update(done - bar.n)
        else:
            bar.refresh()

    def _open_bar(self, bar_id: tuple, desc: str, total: int | None, **kwargs: Any) -> None:
        from tqdm import tqdm

        self._bar_id = bar_id
        self._bar = tqdm(total=total, desc=desc, unit=f" {self.unit}", file=self.term, leave=False, dynamic_ncols=True,
                         mininterval=0.0, **kwargs)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._bar_id = None, None
