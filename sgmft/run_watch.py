"""A Ray Train run watched from its driver: a lost worker said in one line, a stall made an error.

:class:`RunWatch` is a callback that Ray Train runs in the run's controller (an actor on the
driver's node). It notes where each worker runs and which epoch the last checkpoint holds;
when a worker is lost and the worker group restarts, it posts one line to the progress board
(:mod:`sgmft.progress`): the worker, its node, why, and (merged with what the restarted rank
0 says) the epoch it resumed from. It also hands the board the controller, so the driver can
stop the run.

:func:`watch_fit` runs ``trainer.fit()`` with a watchdog: a run whose board has heard nothing
(no step, no line) for ``train.stall_timeout_s`` is aborted, and :class:`RunStalled` names
what Ray has not been able to place (:func:`pending_demands`), instead of a silent hang.

The callback hooks (controller start, state changes, reports, worker group start) are Ray
Train V2's internal callback interface: its public ``UserCallback`` sees neither the start
of the controller nor a restart.
"""

from __future__ import annotations

import threading
from typing import Any

from ray.train.v2._internal.execution.callback import ControllerCallback, ReportCallback, WorkerGroupCallback

from sgmft.progress import find_board

WATCH_INTERVAL_S = 2.0


class RunStalled(RuntimeError):
    """A run that made no progress for ``train.stall_timeout_s``."""


def _died(error: BaseException) -> bool:
    """Whether ``error`` says the worker's process (or its node) is gone, rather than that its
    code failed: Ray's health check, or an actor that died."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    return isinstance(error, (ActorDiedError, ActorUnavailableError)) or "HealthCheck" in type(error).__name__


PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
             "NCCL communicator was aborted")
"""What gloo and NCCL say when the other end of a collective is gone."""


def _peer_lost(error: BaseException) -> bool:
    return any(sign in str(error) for sign in PEER_LOST)


def _short_error(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:120] if lines else ''}"


class RunWatch(ControllerCallback, ReportCallback, WorkerGroupCallback):
    """In the run's controller: the board learns the controller, each restart and its cause."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.checkpoint_epoch: int | None = None
        self.workers: dict[int, tuple[str, str]] = {}
        """World rank -> (node id, node IP) of the worker group that runs now."""

    def after_controller_start(self, train_run_context: Any) -> None:
        import ray

        board = find_board()
        if board is not None:
            board.watch.remote(self.key, ray.get_runtime_context().current_actor)

    def after_worker_group_start(self, worker_group: Any) -> None:
        self.workers = {rank: (w.metadata.node_id, w.metadata.node_ip) for rank, w in enumerate(worker_group.get_workers())}

    def after_report(self, training_report: Any, metrics: list[dict[str, Any]]) -> None:
        if training_report.checkpoint is not None and metrics and "epoch" in metrics[0]:
            self.checkpoint_epoch = int(metrics[0]["epoch"])

    def after_controller_state_update(self, previous_state: Any, current_state: Any) -> None:
        from ray.train.v2._internal.execution.controller.state import RestartingState

        if not isinstance(current_state, RestartingState):
            return
        line = self.restart_line(getattr(current_state.training_failed_error, "worker_failures", {}) or {})
        board = find_board()
        if board is None:
            print(f"{line}; {self.resume_point()}", flush=True)
        else:
            board.restarted.remote(self.key, line, self.checkpoint_epoch is not None, self.resume_point())

    def restart_line(self, failures: dict[int, BaseException]) -> str:
        """``worker group restarted: lost worker 1 on node 3f2a9c1d (127.0.0.1), its process or
        node died``: the workers that died, not the others that failed because they did
        (DDP's collectives lose their peer); a worker whose code failed, with its error.

        The controller may hear the survivors' failed collectives before Ray has declared the
        dead worker's node lost (seconds to tens of seconds): then the line says, once, which
        workers lost a peer, and names the workers that said nothing as the likely loss."""
        died = sorted(rank for rank, e in failures.items() if _died(e))
        if died:
            lost = [f"worker {rank} on node {self._node(rank)}, its process or node died" for rank in died]
            return "worker group restarted: lost " + "; ".join(lost)
        peer_lost = sorted(rank for rank, e in failures.items() if _peer_lost(e))
        parts = [f"worker {rank} on node {self._node(rank)}: {_short_error(e)}"
                 for rank, e in sorted(failures.items()) if rank not in peer_lost]
        if peer_lost:
            silent = sorted(set(self.workers) - set(failures))
            if silent:
                parts.insert(0, "likely lost " + "; ".join(f"worker {rank} on node {self._node(rank)}" for rank in silent)
                             + ", silent while its peers' collectives failed")
            survivors = ", ".join(f"{rank} on node {self._node(rank)}" for rank in peer_lost)
            parts.append(f"{'workers' if len(peer_lost) > 1 else 'worker'} {survivors} lost a peer in a collective "
                         f"(a worker's process or node is gone): {_short_error(failures[peer_lost[0]])}")
        return "worker group restarted: " + ("; ".join(parts) or "a worker failed")

    def _node(self, rank: int) -> str:
        node_id, node_ip = self.workers.get(rank, ("?", "?"))
        return f"{node_id[:8]} ({node_ip})"

    def resume_point(self) -> str:
        if self.checkpoint_epoch is None:
            return "starting over at epoch 1 (no checkpoint yet)"
        return f"resuming from the checkpoint of epoch {self.checkpoint_epoch}"


def pending_demands(limit: int = 8) -> str:
    """What the cluster has been asked for and cannot place now, in a few words: pending
    placement groups (a worker group's reservation), actors and tasks, with what each needs,
    and the CPUs and GPUs that are free on each alive node."""
    import ray
    from ray.util.state import list_actors, list_nodes, list_placement_groups, list_tasks

    # this cluster's, not whichever Ray the state API would find on the machine; a node that
    # died does not answer, and what the others say is still worth saying
    where = {"address": ray.get_runtime_context().gcs_address, "detail": True, "raise_on_missing_output": False}
    parts = []
    try:
        for pg in list_placement_groups(filters=[("state", "=", "PENDING")], limit=limit, **where):
            bundles = [{k: v for k, v in b.get("unit_resources", {}).items() if not k.startswith("bundle")}
                       for b in pg.bundles or []]
            parts.append(f"a placement group of {len(bundles)} bundles {_bundles(bundles)}")
        actors = list_actors(filters=[("state", "=", "PENDING_CREATION")], limit=limit, **where)
        parts += [f"actor {a.class_name} {_resources(a.required_resources)}" for a in actors]
        tasks = list_tasks(filters=[("state", "=", "PENDING_NODE_ASSIGNMENT")], limit=limit, **where)
        parts += [f"task {t.name} {_resources(t.required_resources)}" for t in tasks]
        nodes = list_nodes(filters=[("state", "=", "ALIVE")], limit=100, **where)
    except Exception as exc:  # the state API is the dashboard's: name what is known
        return f"(Ray's state API did not answer: {type(exc).__name__}: {exc})"
    free = _free_per_node()
    cluster = ", ".join(f"{n.node_id[:8]} {_resources(free.get(n.node_id, {}))} free of "
                        f"{_resources({k: v for k, v in n.resources_total.items() if k in ('CPU', 'GPU')})}" for n in nodes)
    waiting = "; ".join(parts) if parts else "nothing Ray reports as unplaceable (the run itself is stuck)"
    return f"pending: {waiting}. Nodes: {cluster}"


def _resources(resources: dict[str, float] | None) -> str:
    shown = {k: round(float(v), 2) for k, v in (resources or {}).items() if k in ("CPU", "GPU") or not k.startswith(("node:", "memory", "object_store"))}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}"


def _bundles(bundles: list[dict[str, float]]) -> str:
    shapes = {_resources(b) for b in bundles}
    return " + ".join(sorted(shapes)) if len(shapes) > 1 else (f"of {shapes.pop()} each" if shapes else "")


def _free_per_node() -> dict[str, dict[str, float]]:
    """CPUs and GPUs free on each node now: the autoscaler's view of the GCS (what ``ray
    status`` prints); empty where this Ray has none."""
    try:
        import ray
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
    except Exception:
        return {}
    free = {}
    for node in status.active_nodes + status.idle_nodes:
        usage = {u.resource_name: u.total - u.used for u in node.resource_usage.usage}
        free[node.node_id] = {k: v for k, v in usage.items() if k in ("CPU", "GPU")}
    return free


def fit_watched(trainer: Any, key: str, stall_timeout_s: float) -> Any:
    """``trainer.fit()`` with :class:`RunWatch` in its callbacks and :func:`watch_fit`'s
    watchdog, under the driver's progress board (one is opened, printing to stdout, when the
    caller shows no progress)."""
    from sgmft import progress

    trainer.run_config.callbacks = [*(trainer.run_config.callbacks or []), RunWatch(key)]
    if progress.showing():
        return watch_fit(trainer, key, stall_timeout_s)
    with progress.Progress():
        return watch_fit(trainer, key, stall_timeout_s)


def watch_fit(trainer: Any, key: str, stall_timeout_s: float) -> Any:
    """``trainer.fit()``, aborted with :class:`RunStalled` when the progress board has heard
    nothing of run ``key`` for ``stall_timeout_s`` seconds (the board is the driver's
    :class:`sgmft.progress.Progress`, which must be open)."""
    import ray

    board = find_board()
    if board is None:
        raise RuntimeError("watch_fit needs the driver's progress board (open a sgmft.progress.Progress first)")
    ray.get(board.heard.remote(key))  # the clock starts now
    before = _job_placement_groups()
    stalled: list[str] = []
    done = threading.Event()

    def watchdog() -> None:
        while not done.wait(WATCH_INTERVAL_S):
            try:
                idle, controller = ray.get(board.idle.remote(key), timeout=30)
            except Exception:  # a slow board is not a stalled run
                continue
            if idle >= stall_timeout_s:
                try:
                    stalled.append(f"training made no progress for {idle:.0f} s "
                                   f"(train.stall_timeout_s={stall_timeout_s:g}); {pending_demands()}")
                finally:  # whatever went wrong in saying it, the run is stopped
                    _abort(controller, before)
                return

    thread = threading.Thread(target=watchdog, name="sgmft-stall-watch", daemon=True)
    thread.start()
    try:
        result = trainer.fit()
    except Exception as exc:
        if stalled:
            raise RunStalled(stalled[0]) from exc
        raise
    finally:
        done.set()
        thread.join()
    if stalled:
        raise RunStalled(stalled[0])
    return result


def _job_placement_groups(pending_only: bool = False) -> set[str]:
    """The ids of this job's placement groups (those still waiting for resources, with ``pending_only``)."""
    import ray
    from ray.util.state import list_placement_groups

    filters = [("creator_job_id", "=", ray.get_runtime_context().get_job_id())]
    if pending_only:
        filters.append(("state", "=", "PENDING"))
    try:
        return {pg.placement_group_id for pg in list_placement_groups(
            address=ray.get_runtime_context().gcs_address, filters=filters, limit=1000, raise_on_missing_output=False)}
    except Exception:  # the state API is the dashboard's: then nothing is removed
        return set()


def _abort(controller: Any, before: set[str]) -> None:
    """Stop a run: its controller aborts the worker group and exits, or is killed. A worker
    group's reservation still waiting to be placed (this job's pending placement groups that
    were not there before the run) belongs to the job, not the controller, and would wait on."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    if controller is not None:
        try:
            # a controller waiting on its placement group does not answer: it is killed below
            ray.get(controller.abort.remote(), timeout=10)
        except Exception:  # it exits while answering (ray.actor.exit_actor), or does not answer
            pass
        try:
            ray.kill(controller)  # nothing left to do when the abort went through
        except Exception:
            pass
    for pg_id in _job_placement_groups(pending_only=True) - before:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
