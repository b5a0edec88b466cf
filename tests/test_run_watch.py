"""The one line a restarted worker group gets: who was lost, or who failed and why."""

from __future__ import annotations

from ray.exceptions import ActorDiedError

from sgmft.run_watch import RunWatch


def _watch() -> RunWatch:
    watch = RunWatch("run")
    watch.workers = {0: ("a" * 16, "10.0.0.1"), 1: ("b" * 16, "10.0.0.2"), 2: ("c" * 16, "10.0.0.3")}
    return watch


def test_a_dead_worker_is_named_and_not_the_survivors_that_lost_it():
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [10.0.0.2]:15779")
    line = _watch().restart_line({0: gloo, 1: ActorDiedError()})
    assert line == "worker group restarted: lost worker 1 on node bbbbbbbb (10.0.0.2), its process or node died"


def test_survivors_heard_first_say_once_that_a_peer_was_lost_and_name_the_silent_worker():
    closed = RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [10.0.0.2]:15779")
    reset = RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:29592: Connection reset by peer")
    line = _watch().restart_line({0: closed, 2: reset})
    assert line == ("worker group restarted: likely lost worker 1 on node bbbbbbbb (10.0.0.2), silent while its "
                    "peers' collectives failed; workers 0 on node aaaaaaaa (10.0.0.1), 2 on node cccccccc (10.0.0.3) "
                    "lost a peer in a collective (a worker's process or node is gone): RuntimeError: "
                    "[gloo/transport/tcp/pair.cc:561] Connection closed by peer [10.0.0.2]:15779")
    assert line.count("lost a peer in a collective") == 1 and "died" not in line


def test_a_failing_worker_says_its_error():
    line = _watch().restart_line({1: ValueError("bad batch")})
    assert line == "worker group restarted: worker 1 on node bbbbbbbb (10.0.0.2): ValueError: bad batch"
