"""The Serve application: a FastAPI ingress deployment bound to a batched model deployment.

    SGMFTIngress (HTTP, preprocessing, adaptive batching)  --batches-->  SGMFTModel (forwards, autoscaling)

With ``serve.model_placement: ingress`` (CPU-only nodes) there is no SGMFTModel: each
ingress replica holds a :class:`ServedModel` and runs its own batches.

``build_app(cfg)`` builds it from a :class:`~sgmft.config.Config`; ``app_builder(args)`` is
the entry point of ``serve_config.yaml`` (``import_path: serve_app.app:app_builder``).
"""

from __future__ import annotations

import asyncio
import os
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from sgmft.config import Config, ConfigError, ServeConfig, apply_overrides, config_from_dict, load_config
from serve_app.errors import RETRY_AFTER, ApiError
from sgmft.model_dir import resolve_source

INGRESS_NAME, MODEL_NAME = "SGMFTIngress", "SGMFTModel"
INGRESS_RESOURCE_SHARE = 0.001
"""What an ingress replica asks of ``serve.ingress_node_resource``: a node given 1 of it holds
up to a thousand."""
# What a handle call raises when the replica serving it died or is going away; the post is
# then retried on another replica (predictions are idempotent).
REPLICA_GONE = (ActorDiedError, ActorUnavailableError, RayActorError, ReplicaUnavailableError)
# Test-only: a model replica exits when a post's text is this value (tests set it on the
# app's runtime env to check that poisonous batches end). Unset, nothing a client sends can
# reach that exit.
CRASH_TEXT_ENV = "SGMFT_TEST_CRASH_ON_TEXT"


@dataclass
class PostBatch:
    """Posts crossing from an ingress to a model replica as one object: stacked token ids,
    and each image as uint8 pixels the ingress decoded or as JPEG bytes for the model's device."""

    input_ids: np.ndarray  # int64 (B, L)
    pixel_values: np.ndarray | None  # uint8 (B - len(jpegs), 3, S, S): the other rows' images, in row order
    sent: float  # time.time() when the ingress sent it, for the queue-wait metric
    jpegs: dict[int, bytes] = field(default_factory=dict)  # row -> JPEG bytes (serve.jpeg_decode)

    @classmethod
    def of(cls, posts: list[tuple[np.ndarray, np.ndarray | bytes]]) -> PostBatch:
        """(token ids, pixels or JPEG bytes) per post -> one batch."""
        jpegs = {row: image for row, (_, image) in enumerate(posts) if isinstance(image, bytes)}
        pixels = [image for _, image in posts if not isinstance(image, bytes)]
        return cls(np.stack([ids for ids, _ in posts]), np.stack(pixels) if pixels else None, time.time(), jpegs)


class ServedModel:
    """A model directory loaded for serving: batches of posts in, each post's top-k out.

    Held by a model replica (``serve.model_placement: replica``) or by every ingress
    replica (``ingress``).
    """

    def __init__(self, model_dir: str, max_batch_size: int, top_k: int, compile: bool = False, cuda_graphs: bool = False):
        from sgmft.inference import InferenceRunner, batch_buckets
        from serve_app.metrics import ModelMetrics

        self.runner = InferenceRunner(model_dir, buckets=batch_buckets(max_batch_size), compile=compile,
                                      cuda_graphs=cuda_graphs)
        self._max_batch_size, self._top_k = max_batch_size, top_k
        self._failure: str | None = None
        self._metrics = ModelMetrics()
        self.runner.warmup(min(max_batch_size, 2))
        self._crash_ids = self._crash_trigger()

    def _crash_trigger(self) -> np.ndarray | None:
        from sgmft.data.preprocess import tokenize

        text = os.environ.get(CRASH_TEXT_ENV)
        return None if not text else tokenize([text], self.runner.spec.context_length)[0]

    def run(self, batches: list[PostBatch]) -> list[list[dict[str, Any]]]:
        """Each batch's posts -> their top-k labels and the size of the forward they ran in.

        Runs on the caller's thread: a forward thread holds the GIL for most of a CPU forward
        and starves the replica's request handling; blocked here, arrivals pile up for the next run.
        """
        input_ids = np.concatenate([b.input_ids for b in batches])
        if self._crash_ids is not None and (input_ids == self._crash_ids).all(axis=1).any():
            os._exit(1)  # test-only (CRASH_TEXT_ENV): a post that kills its replica
        pixel_values, errors = self._pixels(batches)
        results: list[dict[str, Any]] = []
        for i in range(0, len(input_ids), self._max_batch_size):
            forward_start = time.time()
            probs = self._forward(input_ids[i:i + self._max_batch_size], pixel_values[i:i + self._max_batch_size])
            size = len(probs)
            self._metrics.observe_batch(size, [forward_start - b.sent for b in batches], time.time() - forward_start)
            results += [{"top_k": top, "batch_size": size} for top in self.runner.top_k(probs, self._top_k)]
        for row, exc in errors.items():  # an image no decoder could use: its post's error, as the ingress gives it
            results[row] = {"error": {"code": exc.code, "message": exc.message}}
        out, offset = [], 0
        for b in batches:
            out.append(results[offset:offset + len(b.input_ids)])
            offset += len(b.input_ids)
        return out

    def _pixels(self, batches: list[PostBatch]) -> tuple[Any, dict[int, Any]]:
        """The batches' images in row order: their pixels as they came or, where JPEGs came,
        one uint8 tensor on the model's device with the JPEGs decoded there; and the rows whose
        image no decoder could use, each with its ImageDecodeError."""
        import torch

        from sgmft.data.device_decode import decode_jpegs
        from sgmft.inference import to_device

        if not any(b.jpegs for b in batches):
            return np.concatenate([b.pixel_values for b in batches]), {}
        jpeg_rows, encoded, pixel_rows, offset = [], [], [], 0
        for b in batches:
            jpeg_rows += [offset + row for row in b.jpegs]
            encoded += b.jpegs.values()
            pixel_rows += [offset + row for row in range(len(b.input_ids)) if row not in b.jpegs]
            offset += len(b.input_ids)
        spec, device = self.runner.spec, self.runner.device
        decoded, errors = decode_jpegs(encoded, spec, device)
        if not pixel_rows:  # every image came as a JPEG: the decoded rows are the batch's, in order
            return decoded, errors
        pixels = torch.empty((offset, 3, spec.image_size, spec.image_size), dtype=torch.uint8, device=device)
        pixels[jpeg_rows] = decoded
        pixels[pixel_rows] = to_device(np.concatenate([b.pixel_values for b in batches if b.pixel_values is not None]), device)
        return pixels, {jpeg_rows[i]: exc for i, exc in errors.items()}

    def _forward(self, input_ids: np.ndarray, pixel_values: Any) -> np.ndarray:
        """``pixel_values``: uint8 pixels from the ingresses, or a tensor already on the device."""
        try:
            return self.runner.probabilities(input_ids, pixel_values)
        except RuntimeError as exc:
            # Inputs are validated by the ingress, so a failing forward on a GPU is the device's
            # fault (CUDA error, out of memory): report unhealthy so Serve replaces this replica.
            if self.runner.device.type == "cuda":
                self._failure = f"{type(exc).__name__}: {exc}"
            raise

    def check_health(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"model replica failed a forward and needs replacing: {self._failure}")

    def close(self) -> None:
        self.runner.close()


@serve.deployment(name=MODEL_NAME)
class ModelDeployment:
    """Loads a model directory once per replica; runs the batches that ingresses send.

    Every batch queued when a forward ends, from any ingress, goes into the next run (in
    forwards of at most ``max_batch_size`` posts), so batches grow with the load even
    without a timer (``batch_wait_timeout_s: 0``): on a GPU the forward of 128 posts costs
    little more than that of 8.
    """

    def __init__(self, model_dir: str, max_batch_size: int, merge_batches: int, merge_wait_s: float,
                 top_k: int, compile: bool = False, cuda_graphs: bool = False):
        self._model = ServedModel(model_dir, max_batch_size, top_k, compile, cuda_graphs)
        # The decorator's arguments are fixed at import; the configured values apply per replica.
        self.run.set_max_batch_size(merge_batches)
        self.run.set_batch_wait_timeout_s(merge_wait_s)

    def info(self) -> dict[str, Any]:
        return self._model.runner.info()

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0)  # set per replica in __init__
    async def run(self, batches: list[PostBatch]) -> list[list[dict[str, Any]]]:
        return self._model.run(batches)

    def check_health(self) -> None:
        self._model.check_health()

    def __del__(self) -> None:
        model = getattr(self, "_model", None)
        if model is not None:
            model.close()


@serve.deployment(name=INGRESS_NAME)
@serve.ingress()
class SGMFTIngress:
    """HTTP in, preprocessing, and posts batched here before they cross to a model replica.

    One handle call per batch rather than per post: per-call overhead (routing, a task, the
    object store) was most of the serving time when every post crossed on its own.
    """

    async def __init__(self, model: DeploymentHandle | None, serve_cfg: ServeConfig):
        """``model``: the model deployment's handle, or None to load ``serve_cfg.model_dir``
        here and run the forwards in this replica (``serve.model_placement: ingress``)."""
        from serve_app.batching import AdaptiveBatcher
        from serve_app.metrics import IngressMetrics
        from sgmft.inference import spec_from_info

        self._model = model
        self._serve_cfg = s = serve_cfg
        self._local = None if model is not None else ServedModel(
            s.model_dir, s.max_batch_size, s.top_k, s.compile, s.cuda_graphs)
        # Whoever holds the model directory gives the metadata and preprocessing spec, so what
        # is preprocessed here is what that model was trained on.
        self.info: dict[str, Any] = self._local.runner.info() if self._local else await model.info.remote()
        self.info["jpeg_decode"] = jpeg_decode_place(s, self.info["device"])
        self._spec = spec_from_info(self.info)
        self._metrics = IngressMetrics()
        self._batcher = AdaptiveBatcher(self._send, s.max_batch_size, batches_in_flight(s), s.ingress_max_posts)
        self._retrying = 0  # batches waiting to be retried on another model replica

    def __serve_build_asgi_app__(self):
        from serve_app.api import create_api

        return create_api(self, self._serve_cfg, self._spec, self._metrics)

    def preparing(self) -> AbstractContextManager[None]:
        return self._batcher.preparing()

    async def predict(self, input_ids: np.ndarray, image: np.ndarray | bytes) -> dict[str, Any]:
        """One post's model inputs -> ``{"top_k", "batch_size"}`` (or ``{"error"}``), batched with
        concurrent posts."""
        from serve_app.batching import QueueFull

        try:
            return await self._batcher.submit((input_ids, image))
        except QueueFull as exc:
            raise ApiError(503, "overloaded", f"{exc}; retry later", RETRY_AFTER) from exc

    async def _send(self, posts: list[tuple[np.ndarray, np.ndarray | bytes]]) -> list[dict[str, Any]]:
        batch = PostBatch.of(posts)
        if self._local is not None:
            return self._local.run([batch])[0]
        return await self._call_model(batch)

    async def _call_model(self, batch: PostBatch) -> list[dict[str, Any]]:
        """One model call, retried while replicas die, until ``serve.retry_deadline_s``; each
        attempt is bounded by what is left of it, so a replica that hangs cannot hold the
        batch, and a batch during which ``serve.max_replica_deaths`` replicas died in a row
        is not sent to another: the likeliest cause is the batch itself."""
        s = self._serve_cfg
        deadline = time.monotonic() + s.retry_deadline_s
        delay, dead = 0.05, set()
        while True:
            batch.sent = time.time()
            try:
                return await asyncio.wait_for(self._model.run.remote(batch), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError as exc:
                raise ApiError(503, "model_timeout", "no model replica answered within serve.retry_deadline_s="
                               f"{s.retry_deadline_s:g}s", RETRY_AFTER) from exc
            except BackPressureError as exc:
                raise ApiError(503, "overloaded", f"the model's queue is full, retry later ({exc})", RETRY_AFTER) from exc
            except DeploymentUnavailableError as exc:
                raise ApiError(503, "model_unavailable", f"the model deployment is unavailable: {exc}", RETRY_AFTER) from exc
            except REPLICA_GONE as exc:
                if not isinstance(exc, ActorUnavailableError):  # unreachable for now is not dead
                    dead.add(replica_of(exc))  # the same dead replica seen twice counts once
                self._check_retry(len(dead), deadline, delay, exc)
            self._metrics.observe_retry()
            self._retrying += 1
            try:
                await asyncio.sleep(delay)
            finally:
                self._retrying -= 1
            delay = min(delay * 2, 1.0)

    def _check_retry(self, deaths: int, deadline: float, delay: float, exc: Exception) -> None:
        """Raise the error that ends a batch whose model replica went away, or return to retry it."""
        s = self._serve_cfg
        if deaths >= s.max_replica_deaths:
            self._metrics.observe_killer_batch()
            raise ApiError(500, "batch_killed_replicas", f"{deaths} model replicas died in a row while running the batch "
                           f"this post was in (serve.max_replica_deaths={s.max_replica_deaths}); it is not retried") from exc
        if time.monotonic() + delay > deadline:
            raise ApiError(503, "model_unavailable", "no model replica answered before the retry deadline "
                           f"({type(exc).__name__})", RETRY_AFTER) from exc
        if self._retrying >= batches_in_flight(s):
            raise ApiError(503, "model_unavailable", f"{self._retrying} batches are already waiting for a model replica; "
                           "retry later", RETRY_AFTER) from exc

    def check_health(self) -> None:
        if not self.info.get("labels"):
            raise RuntimeError("the ingress has no model metadata")
        if self._local is not None:
            self._local.check_health()

    def __del__(self) -> None:
        local = getattr(self, "_local", None)
        if local is not None:
            local.close()


def jpeg_decode_place(s: ServeConfig, model_device: str) -> str:
    """Where this app decodes JPEG posts (``serve.jpeg_decode``): ``model`` or ``ingress``."""
    if s.jpeg_decode == "auto":
        return "model" if model_device.startswith("cuda") else "ingress"
    return s.jpeg_decode


def autoscaling_config(min_replicas: int, max_replicas: int, target_ongoing: float, upscale_delay_s: float,
                       downscale_delay_s: float, initial_replicas: int | None = None) -> dict[str, Any]:
    """Serve's autoscaling config.

    Ray averages ongoing requests over ``look_back_period_s`` (default 30 s) from metrics
    pushed every ``metrics_interval_s`` (default 10 s); with those defaults any delay under
    ~30 s would be meaningless. The window follows the upscale delay instead (1-30 s), and
    metrics are pushed twice per window.
    """
    look_back = min(max(upscale_delay_s, 1.0), 30.0)
    return {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "initial_replicas": initial_replicas,
        "target_ongoing_requests": target_ongoing,
        "upscale_delay_s": upscale_delay_s,
        "downscale_delay_s": downscale_delay_s,
        "look_back_period_s": look_back,
        "metrics_interval_s": look_back / 2,
    }


def replica_of(exc: Exception) -> str:
    """The model replica an error names (a new object where it names none: counted alone)."""
    return str(getattr(exc, "actor_id", None) or getattr(exc, "_replica_id", None) or id(exc))


def cluster_resource(name: str) -> float:
    """How much of a resource the Ray cluster reports; 0 where this process is not connected
    to Ray (an app built only to be checked)."""
    import ray

    return float(ray.cluster_resources().get(name, 0)) if ray.is_initialized() else 0.0


def ingress_node_resource(s: ServeConfig) -> str | None:
    """The custom resource that places ingress replicas, where some node has it; none when
    the ingress holds the model (``model_placement: ingress``), which may need a GPU node."""
    if s.model_placement != "replica" or not s.ingress_node_resource:
        return None
    return s.ingress_node_resource if cluster_resource(s.ingress_node_resource) > 0 else None


def cpus_for_ingress(s: ServeConfig) -> int:
    """The CPUs Ray reports on the nodes ingress replicas may use (those with the ingress
    resource, where one is used), at least 1."""
    import ray

    resource = ingress_node_resource(s)
    if resource is None:
        return max(1, int(cluster_resource("CPU")))
    return max(1, int(sum(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"] and n["Resources"].get(resource))))


def default_ingress_replicas(s: ServeConfig) -> int:
    """One ingress replica per CPU that Ray reports where ingress replicas may go, as many as
    fit beside the model replicas' reservation there (the CPU side of serving scales with the
    node). GPU model replicas are not counted against the ingress nodes' CPUs."""
    cpus = cpus_for_ingress(s)
    per_ingress = s.num_cpus_per_replica if s.ingress_cpus_per_replica is None else s.ingress_cpus_per_replica
    beside = s.model_placement == "replica" and (ingress_node_resource(s) is None or not s.num_gpus_per_replica)
    models = s.num_cpus_per_replica * s.max_replicas if beside else 0.0
    fit = int((cpus - models) / per_ingress) if per_ingress > 0 else cpus
    return max(1, min(cpus, fit))


def ingress_max_replicas(s: ServeConfig) -> int:
    return max(s.ingress_replicas, s.ingress_max_replicas or s.ingress_replicas)


def batches_per_replica(s: ServeConfig) -> int:
    """``max_ongoing_requests`` (posts per model replica) as full batches, rounded up."""
    return -(-s.max_ongoing_requests // s.max_batch_size)


def batches_in_flight(s: ServeConfig) -> int:
    """Batches one ingress keeps in flight: enough full batches to load every model replica."""
    return max(2, batches_per_replica(s) * s.max_replicas)


def build_app(cfg: Config, replica_env: dict[str, str] | None = None) -> serve.Application:
    """The ingress bound to the model deployment, with the options of ``cfg.serve``; with
    ``serve.model_placement: ingress`` the ingress alone, each replica holding the model.

    The model deployment's requests are batches, so its posts-based settings are divided
    by ``max_batch_size``: ``target_ongoing_requests: 8`` with batches of 16 aims for half
    a batch in flight per replica (Serve takes fractional targets). ``replica_env``: environment
    variables of the model's replicas (tests set ``CRASH_TEXT_ENV`` there).
    """
    s = cfg.serve
    if not s.model_dir:
        raise ConfigError("serve.model_dir: empty; give a model directory path or URI (s3://, gs://, file://)")
    s = replace(s, model_dir=resolve_source(s.model_dir), ingress_replicas=s.ingress_replicas or default_ingress_replicas(s))
    ingress_resources: dict[str, Any] = {
        "num_cpus": s.num_cpus_per_replica if s.ingress_cpus_per_replica is None else s.ingress_cpus_per_replica}
    if ingress_node_resource(s):
        ingress_resources["resources"] = {s.ingress_node_resource: INGRESS_RESOURCE_SHARE}
    model: serve.Application | None = None
    env = {"runtime_env": {"env_vars": replica_env}} if replica_env else {}
    if s.model_placement == "ingress":
        ingress_resources.update(num_gpus=s.num_gpus_per_replica, **env)
    else:
        queued_batches = max(2, batches_per_replica(s)) * ingress_max_replicas(s)  # every ingress's, all merged
        model = ModelDeployment.options(
            max_ongoing_requests=queued_batches,
            # A backstop: every ingress keeps at most batches_in_flight batches at the model, so
            # this queue fills only if that bound breaks; a full one answers 503, never waits.
            max_queued_requests=2 * batches_in_flight(s) * ingress_max_replicas(s),
            autoscaling_config=autoscaling_config(s.min_replicas, s.max_replicas, s.target_ongoing_requests / s.max_batch_size,
                                                  s.upscale_delay_s, s.downscale_delay_s, s.initial_replicas),
            ray_actor_options={"num_cpus": s.num_cpus_per_replica, "num_gpus": s.num_gpus_per_replica, **env},
        ).bind(s.model_dir, s.max_batch_size, queued_batches, s.batch_wait_timeout_s, s.top_k, s.compile, s.cuda_graphs)
    replicas: dict[str, Any] = {"num_replicas": s.ingress_replicas}
    if ingress_max_replicas(s) > s.ingress_replicas:
        replicas = {"autoscaling_config": autoscaling_config(
            s.ingress_replicas, ingress_max_replicas(s), 2 * s.max_batch_size, s.upscale_delay_s, s.downscale_delay_s)}
    # Requests over ingress_max_posts still reach the app, which refuses them in its own error
    # shape within milliseconds; Serve's queue in front of it is a bound of last resort. Not
    # with the model in the ingress: its forwards hold the event loop, so requests let in
    # would wait for them before being refused (p99 14 s at 512 clients); Serve refuses those.
    return SGMFTIngress.options(
        max_ongoing_requests=s.ingress_max_posts * (1 if s.model_placement == "ingress" else 4),
        max_queued_requests=s.ingress_max_posts,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=1),
        ray_actor_options=ingress_resources,
        **replicas,
    ).bind(model, s)


APP_BUILDER_ARGS = ("config", "model_dir", "overrides")


def config_from_builder_args(args: dict[str, Any] | None) -> Config:
    """The Config that ``app_builder`` deploys; see there for ``args``."""
    args = dict(args or {})
    unknown = sorted(set(args) - set(APP_BUILDER_ARGS))
    if unknown:
        raise ConfigError(f"app_builder args: unknown {unknown} (known: {list(APP_BUILDER_ARGS)})")
    config, overrides = args.get("config"), [str(x) for x in args.get("overrides") or []]
    if isinstance(config, dict):
        cfg = config_from_dict(apply_overrides(config, overrides))
    elif config is None or isinstance(config, (str, Path)):
        cfg = load_config(config, overrides)
    else:
        raise ConfigError(f"app_builder args: config must be a file path or a mapping, got {type(config).__name__}")
    if args.get("model_dir"):
        cfg.serve.model_dir = str(args["model_dir"])
    return cfg


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for ``serve deploy``/``serve run`` configs.

    ``args``: ``config`` (a YAML file path on the cluster, or the config inline as a
    mapping; optional), ``model_dir`` (path or URI; sets serve.model_dir) and ``overrides``
    (``section.key=value`` strings, as ``--set`` on the CLI).
    """
    return build_app(config_from_builder_args(args))
