"""Adaptive batching of posts before they reach the model (Ray-free).

A post is sent at once when the model is idle and no other post is being prepared, so one
client waits for no timer. Posts still being decoded are waited for (about as long as a
preparation takes), so the posts of concurrent requests leave together rather than one at
a time. While batches are in flight, posts accumulate and leave as full batches, or as one
batch of whatever waited when a batch returns, so batches grow with load by themselves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

_PREPARE_EMA = 0.1
"""Weight of the newest preparation time in the running mean the batcher waits for."""


class QueueFull(RuntimeError):
    """The batcher's queue is at its bound: the caller sheds the item (HTTP 503)."""


class AdaptiveBatcher(Generic[Item, Result]):
    """Groups concurrent ``submit`` calls into calls of ``send(items) -> results``.

    ``send`` gets at most ``max_batch_size`` items and returns one result per item, in order.
    At most ``max_in_flight`` sends run at once; a send that raises fails its items only. At
    most ``max_queued`` items wait: a ``submit`` beyond that raises :class:`QueueFull` at
    once. An item whose waiter was cancelled (its client went away) is dropped unsent.
    """

    def __init__(self, send: Callable[[list[Item]], Awaitable[Sequence[Result]]], max_batch_size: int, max_in_flight: int,
                 max_queued: int):
        if min(max_batch_size, max_in_flight, max_queued) < 1:
            raise ValueError(f"max_batch_size, max_in_flight and max_queued must be >= 1, got {max_batch_size}, "
                             f"{max_in_flight} and {max_queued}")
        self._send = send
        self.max_batch_size = max_batch_size
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self._queue: list[tuple[Item, asyncio.Future, float]] = []
        self._in_flight = 0
        self._preparing = 0
        self.prepare_s = 0.0
        """Running mean of how long an item's preparation takes: the longest an idle batcher
        waits for items being prepared before it sends what it has."""
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextmanager
    def preparing(self) -> Iterator[None]:
        """Around an item's preparation (decode, tokenise) when its ``submit`` follows at once:
        while it is being prepared, an idle batcher waits for it instead of sending without it."""
        self._preparing += 1
        start = time.monotonic()
        try:
            yield
        except BaseException:
            self._preparing -= 1
            self._pump()  # nothing of it will come: what waited for it may go
            raise
        self._preparing -= 1  # no pump: its submit, next, pumps with it in the queue
        self.prepare_s += _PREPARE_EMA * (time.monotonic() - start - self.prepare_s)

    async def submit(self, item: Item) -> Result:
        if len(self._queue) >= self.max_queued:
            self._drop_cancelled()
            if len(self._queue) >= self.max_queued:
                raise QueueFull(f"{len(self._queue)} posts are already waiting for the model (the most one ingress queues)")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future, time.monotonic()))
        self._pump()
        return await future

    def _idle_may_send(self) -> bool:
        if not self._preparing:
            return True
        waited = time.monotonic() - self._queue[0][2]
        if waited >= self.prepare_s:
            return True
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.prepare_s - waited, self._on_timer)
        return False

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    def _drop_cancelled(self) -> None:
        self._queue = [entry for entry in self._queue if not entry[1].done()]

    def _pump(self) -> None:
        # Idle: send what is there once nothing more is on its way. Busy: send only full
        # batches, and only under the cap.
        self._drop_cancelled()
        while self._queue and self._in_flight < self.max_in_flight and (
                len(self._queue) >= self.max_batch_size or (self._in_flight == 0 and self._idle_may_send())):
            batch, self._queue = self._queue[:self.max_batch_size], self._queue[self.max_batch_size:]
            self._in_flight += 1
            task = asyncio.ensure_future(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[Item, asyncio.Future, float]]) -> None:
        try:
            results = await self._send([item for item, _, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"send returned {len(results)} results for {len(batch)} items")
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear of it, then it is re-raised there
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_, future, _), result in zip(batch, results):
                if not future.done():  # the client may have gone away
                    future.set_result(result)
        finally:
            self._in_flight -= 1
            self._pump()
