"""The Retry-After of an overloaded ingress, in-process on a simulated clock: it grows until
the refused clients come back at a fraction of the rate posts are served, and falls back to
1 s when the overload ends."""

from __future__ import annotations

import pytest

from serve_app.admission import MAX_RETRY_AFTER_S, REFUSALS_PER_POST, Admission, Backoff
from serve_app.errors import ApiError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_second(backoff: Backoff, clock: Clock, admitted: int, refused: int) -> str:
    """One second of admissions and refusals, interleaved evenly; the Retry-After of the last
    refusal ('1' if none)."""
    header = "1"
    events = sorted([(i / admitted, "admitted") for i in range(admitted)] + [(i / refused, "refused") for i in range(refused)])
    start = clock.now
    for at, kind in events:
        clock.now = start + at
        if kind == "admitted":
            backoff.admitted()
        else:
            header = backoff.refused()["Retry-After"]
    clock.now = start + 1.0
    return header


def test_refusals_settle_at_a_fraction_of_the_posts_served():
    clock = Clock()
    backoff = Backoff(clock)
    excess_clients, served_per_s = 400, 100
    refusals = []
    for _ in range(30):
        # Each refused client waits the Retry-After it was given, then sends again.
        refused = round(excess_clients / backoff.seconds)
        refusals.append(refused)
        run_second(backoff, clock, served_per_s, refused)
    assert refusals[0] == 400
    assert refusals[-1] <= 1.5 * REFUSALS_PER_POST * served_per_s, refusals
    assert 1.0 < backoff.seconds <= MAX_RETRY_AFTER_S


def test_the_wait_falls_back_to_one_second_when_the_overload_ends():
    clock = Clock()
    backoff = Backoff(clock)
    for _ in range(10):
        run_second(backoff, clock, 100, 400)
    assert backoff.seconds > 4
    for _ in range(8):
        run_second(backoff, clock, 100, 0)
    assert backoff.seconds == 1.0
    assert run_second(backoff, clock, 100, 5) == "1"  # a few refusals under light load: no backoff


def test_a_refusal_names_the_current_wait():
    clock = Clock()
    admission = Admission(2, Backoff(clock))
    with admission.hold(2):
        with pytest.raises(ApiError) as refused:
            with admission.hold(1):
                pass
    assert refused.value.status == 503 and refused.value.code == "overloaded"
    assert refused.value.headers == {"Retry-After": "1"}
    assert admission.held == 0
