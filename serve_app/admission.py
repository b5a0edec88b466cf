"""How many posts an ingress replica holds at once, and how long a refused client is told to
wait before it sends again.

A refusal is cheap next to a post but not free: on 2 cores a 503 cost the service ~1.7 ms of
CPU (the body still crosses HAProxy and the replica's HTTP server) and the client ~0.4 ms,
against ~5 ms a post. With a fixed ``Retry-After: 1``, 512 clients against an app that holds
128 posts sent ~350 refusals a second and carried 0.72x the throughput of 32 clients
(serve_load.json: about a third of the 2 cores went to refusing). So the wait a refusal names grows
while refusals outnumber a fraction of the posts served (:data:`REFUSALS_PER_POST`) and
shrinks back to 1 s once they do not: the refused clients then come back at about the rate
the server frees room for them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app.errors import ApiError, error_response

REFUSALS_PER_POST = 0.2
"""Refusals a second the backoff aims at, per post served a second."""
MAX_RETRY_AFTER_S = 30.0
WINDOW_S = 1.0


class Backoff:
    """The ``Retry-After`` of this replica's refusals, adjusted once a window from the
    refusals and admissions seen in it: multiplied by refused / (REFUSALS_PER_POST x admitted),
    at most doubled or halved a window, between 1 s and :data:`MAX_RETRY_AFTER_S`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.seconds = 1.0
        self._window_start = clock()
        self._refused = self._admitted = 0

    def admitted(self, posts: int = 1) -> None:
        self._admitted += posts
        self._advance()

    def refused(self) -> dict[str, str]:
        """Count a refusal; the header it answers with."""
        self._refused += 1
        self._advance()
        return {"Retry-After": str(math.ceil(self.seconds))}

    def _advance(self) -> None:
        now = self._clock()
        if now - self._window_start < WINDOW_S:
            return
        wanted = REFUSALS_PER_POST * max(self._admitted, 1)
        factor = min(max(self._refused / wanted, 0.5), 2.0)
        self.seconds = min(max(self.seconds * factor, 1.0), MAX_RETRY_AFTER_S)
        self._window_start, self._refused, self._admitted = now, 0, 0


class Admission:
    """The posts this ingress holds at once (decoding, batching, at the model), bounded: one
    over the bound is refused 503 with Retry-After before anything is spent on it, so the
    posts admitted keep their latency however many clients send."""

    def __init__(self, limit: int, backoff: Backoff | None = None):
        self.limit = limit
        self.held = 0
        self.backoff = backoff or Backoff()

    def full(self) -> bool:
        return self.held >= self.limit

    @contextmanager
    def hold(self, posts: int) -> Iterator[None]:
        if self.held + posts > self.limit:
            raise ApiError(503, "overloaded", f"this server holds {self.held} posts, at most {self.limit} "
                           f"(serve.ingress_max_posts); {posts} more must wait: retry later", self.backoff.refused())
        self.held += posts
        self.backoff.admitted(posts)
        try:
            yield
        finally:
            self.held -= posts


class AdmissionMiddleware:
    """A POST that arrives while :class:`Admission` is full is answered 503 before its body
    is parsed: refusing must cost far less than serving, or refusals eat the capacity. The
    body is read and dropped so the connection stays usable (no reconnect per refusal)."""

    def __init__(self, app: ASGIApp, admission: Admission):
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or not self.admission.full():
            return await self.app(scope, receive, send)
        while True:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                break
        message = f"this server holds its most posts ({self.admission.limit}, serve.ingress_max_posts): retry later"
        await error_response(503, "overloaded", message, self.admission.backoff.refused())(scope, receive, send)
