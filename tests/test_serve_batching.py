"""The ingress's adaptive batcher, in-process: no timer at low load, full batches under load."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.batching import AdaptiveBatcher, QueueFull


class Model:
    """A stand-in ``send`` that records batch sizes and holds each call until released."""

    def __init__(self, fail_on: int | None = None):
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.running = 0
        self.most_running = 0
        self.fail_on = fail_on

    async def send(self, items: list[int]) -> list[int]:
        self.batches.append(items)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.release.wait()
            if self.fail_on in items:
                raise RuntimeError("replica died")
            return [i * 10 for i in items]
        finally:
            self.running -= 1


def test_an_idle_batcher_sends_at_once():
    async def main():
        model = Model()
        model.release.set()
        batcher = AdaptiveBatcher(model.send, max_batch_size=8, max_in_flight=2, max_queued=64)
        assert await asyncio.wait_for(batcher.submit(3), timeout=1.0) == 30
        assert model.batches == [[3]]

    asyncio.run(main())


def test_posts_arriving_while_busy_leave_together_in_full_batches_under_the_cap():
    async def main():
        model = Model()
        batcher = AdaptiveBatcher(model.send, max_batch_size=4, max_in_flight=2, max_queued=64)
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0)
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 14)]
        await asyncio.sleep(0.01)
        # one batch of 1 went at once; one full batch of 4 while busy; the rest waits for the cap
        assert model.batches == [[0], [1, 2, 3, 4]] and model.most_running == 2
        model.release.set()
        results = await asyncio.wait_for(asyncio.gather(first, *rest), timeout=2.0)
        assert results == [i * 10 for i in range(14)]
        assert sorted(i for batch in model.batches for i in batch) == list(range(14))
        assert max(len(b) for b in model.batches) == 4 and model.most_running <= 2

    asyncio.run(main())


def test_a_failed_send_fails_its_own_posts_only():
    async def main():
        model = Model(fail_on=1)
        batcher = AdaptiveBatcher(model.send, max_batch_size=1, max_in_flight=1, max_queued=64)
        futures = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
        await asyncio.sleep(0)
        model.release.set()
        done = await asyncio.gather(*futures, return_exceptions=True)
        assert done[0] == 0 and isinstance(done[1], RuntimeError) and done[2] == 20

    asyncio.run(main())


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="max_batch_size"):
        AdaptiveBatcher(Model().send, max_batch_size=0, max_in_flight=1, max_queued=64)
    with pytest.raises(ValueError, match="max_queued"):
        AdaptiveBatcher(Model().send, max_batch_size=1, max_in_flight=1, max_queued=0)


def test_a_full_queue_refuses_at_once_and_cancelled_posts_are_dropped_unsent():
    async def main():
        model = Model()
        batcher = AdaptiveBatcher(model.send, max_batch_size=2, max_in_flight=1, max_queued=3)
        busy = asyncio.ensure_future(batcher.submit(0))  # sent at once; holds the only slot
        await asyncio.sleep(0)
        waiting = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2, 3)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="3 posts"):
            await batcher.submit(4)
        waiting[1].cancel()  # its client went away: it leaves the queue and never reaches the model
        await asyncio.sleep(0)
        late = asyncio.ensure_future(batcher.submit(5))  # room again
        model.release.set()
        done = await asyncio.wait_for(asyncio.gather(busy, waiting[0], waiting[2], late), timeout=1.0)
        assert done == [0, 10, 30, 50]
        assert sorted(i for batch in model.batches for i in batch) == [0, 1, 3, 5]

    asyncio.run(main())


def test_an_idle_batcher_waits_for_posts_being_prepared_then_sends_them_together():
    async def main():
        model = Model()
        model.release.set()
        batcher = AdaptiveBatcher(model.send, max_batch_size=8, max_in_flight=2, max_queued=64)
        batcher.prepare_s = 5.0  # long enough that only the preparations can release the batch
        decoded = asyncio.Event()

        async def post(i: int, fails: bool = False) -> int:
            with batcher.preparing():
                await decoded.wait()
                if fails:
                    raise ValueError("undecodable image")
            return await batcher.submit(i)

        first = await asyncio.wait_for(batcher.submit(0), timeout=1.0)  # nothing being prepared: sent at once
        assert first == 0 and model.batches == [[0]]
        futures = [asyncio.ensure_future(post(i)) for i in (1, 2)] + [asyncio.ensure_future(post(3, fails=True))]
        await asyncio.sleep(0)
        early = asyncio.ensure_future(batcher.submit(4))  # ready, but three posts are still being prepared
        await asyncio.sleep(0.05)
        assert model.batches == [[0]]
        decoded.set()
        done = await asyncio.wait_for(asyncio.gather(early, *futures, return_exceptions=True), timeout=1.0)
        assert done[:3] == [40, 10, 20] and isinstance(done[3], ValueError)
        assert model.batches == [[0], [4, 1, 2]]

    asyncio.run(main())


def test_the_wait_for_posts_being_prepared_is_bounded_by_the_usual_preparation_time():
    async def main():
        model = Model()
        model.release.set()
        batcher = AdaptiveBatcher(model.send, max_batch_size=8, max_in_flight=2, max_queued=64)
        batcher.prepare_s = 0.05
        stuck = asyncio.Event()

        async def slow_post() -> None:
            with batcher.preparing():
                await stuck.wait()  # a huge image, say: the others must not wait for it

        slow = asyncio.ensure_future(slow_post())
        await asyncio.sleep(0)
        start = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(batcher.submit(7), timeout=1.0) == 70
        assert 0.04 <= asyncio.get_running_loop().time() - start < 0.5
        stuck.set()
        await slow

    asyncio.run(main())
