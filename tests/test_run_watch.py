"""The one line a restarted worker group gets: who was lost, or who failed and why."""

from __future__ import annotations

from ray.exceptions import ActorDiedError

from sgmft.run_watch import RunWatch


def _watch() -> RunWatch:
    watch = RunWatch("run")
    watch.workers = {0: ("a" * 16, "10.0.0.1"), 1: ("b" * 16, "10.0.0.2")}
    return watch


def test_a_dead_worker_is_named_and_not_the_survivors_that_lost_it():
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [10.0.0.2]:15779")
    line = _watch().restart_line({0: gloo, 1: ActorDiedError()})
    assert line == "worker group restarted: lost worker 1 on node bbbbbbbb (10.0.0.2), its process or node died"


def test_a_survivor_heard_first_says_a_peer_was_lost_and_a_failing_worker_its_error():
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [10.0.0.2]:15779")
    line = _watch().restart_line({0: gloo})
    assert line.startswith("worker group restarted: worker 0 on node aaaaaaaa (10.0.0.1) lost a peer in a collective")
    assert "Connection closed by peer" in line and "lost worker" not in line
    line = _watch().restart_line({1: ValueError("bad batch")})
    assert line == "worker group restarted: worker 1 on node bbbbbbbb (10.0.0.2): ValueError: bad batch"
