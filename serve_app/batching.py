"""Adaptive batching of posts before they cross to a model replica (Ray-free).

A post is sent at once when the model is idle, so one client waits for no timer. While
batches are in flight, posts accumulate and leave as full batches, or as one batch of
whatever waited when a batch returns, so batches grow with load by themselves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class AdaptiveBatcher(Generic[Item, Result]):
    """Groups concurrent ``submit`` calls into calls of ``send(items) -> results``.

    ``send`` gets at most ``max_batch_size`` items and returns one result per item, in order.
    At most ``max_in_flight`` sends run at once; a send that raises fails its items only.
    """

    def __init__(self, send: Callable[[list[Item]], Awaitable[Sequence[Result]]], max_batch_size: int, max_in_flight: int):
        if max_batch_size < 1 or max_in_flight < 1:
            raise ValueError(f"max_batch_size and max_in_flight must be >= 1, got {max_batch_size} and {max_in_flight}")
        self._send = send
        self.max_batch_size = max_batch_size
        self.max_in_flight = max_in_flight
        self._queue: list[tuple[Item, asyncio.Future]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def submit(self, item: Item) -> Result:
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._pump()
        return await future

    def _pump(self) -> None:
        # Idle: send what is there. Busy: send only full batches, and only under the cap.
        while self._queue and self._in_flight < self.max_in_flight and (
                self._in_flight == 0 or len(self._queue) >= self.max_batch_size):
            batch, self._queue = self._queue[:self.max_batch_size], self._queue[self.max_batch_size:]
            self._in_flight += 1
            task = asyncio.ensure_future(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[Item, asyncio.Future]]) -> None:
        try:
            results = await self._send([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"send returned {len(results)} results for {len(batch)} items")
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear of it, then it is re-raised there
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_, future), result in zip(batch, results):
                if not future.done():  # the client may have gone away
                    future.set_result(result)
        finally:
            self._in_flight -= 1
            self._pump()
