"""The Serve application: a FastAPI ingress deployment bound to a batched model deployment.

    SGMFTIngress (HTTP, preprocessing)  --handle-->  SGMFTModel (@serve.batch, autoscaling)

``build_app(cfg)`` builds it from a :class:`~sgmft.config.Config`; ``app_builder(args)`` is
the entry point of ``serve_config.yaml`` (``import_path: serve_app.app:app_builder``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from sgmft.config import Config, ConfigError, ServeConfig, apply_overrides, config_from_dict, load_config
from serve_app.errors import ApiError
from serve_app.model import resolve_source

INGRESS_NAME, MODEL_NAME = "SGMFTIngress", "SGMFTModel"


@dataclass
class QueuedPost:
    input_ids: np.ndarray
    pixel_values: np.ndarray
    enqueued: float  # perf_counter when the replica received it, for the queue-wait metric


@serve.deployment(name=MODEL_NAME)
class SGMFTModel:
    """Loads a model directory once per replica; predicts posts in dynamic batches."""

    def __init__(self, model_dir: str, max_batch_size: int, batch_wait_timeout_s: float, top_k: int):
        from serve_app.metrics import ModelMetrics
        from serve_app.model import ModelRunner

        self._runner = ModelRunner(model_dir)
        self._top_k = top_k
        self._failure: str | None = None
        # The decorator's arguments are fixed at import; the configured values apply per replica.
        self.predict_batch.set_max_batch_size(max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._metrics = ModelMetrics()
        self._runner.warmup(min(max_batch_size, 2))

    def info(self) -> dict[str, Any]:
        return self._runner.info()

    async def predict(self, input_ids: np.ndarray, pixel_values: np.ndarray) -> dict[str, Any]:
        """One post's model inputs -> its top-k labels and the size of the batch it ran in."""
        return await self.predict_batch(QueuedPost(input_ids, pixel_values, time.perf_counter()))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def predict_batch(self, posts: list[QueuedPost]) -> list[dict[str, Any]]:
        start = time.perf_counter()
        input_ids = np.stack([p.input_ids for p in posts])
        pixel_values = np.stack([p.pixel_values for p in posts])
        try:
            # Inline, not in a thread: a forward thread holds the GIL for most of a CPU forward and
            # starves the replica's request handling, so posts trickle into the queue (measured:
            # mean batch 3-6 instead of 27 at 32 concurrent clients). Blocked here, arrivals pile
            # up and join the next batch together; batches never overlap anyway.
            probs = self._runner.probabilities(input_ids, pixel_values)
        except RuntimeError as exc:
            # Inputs are validated by the ingress, so a failing forward on a GPU is the device's
            # fault (CUDA error, out of memory): report unhealthy so Serve replaces this replica.
            if self._runner.device.type == "cuda":
                self._failure = f"{type(exc).__name__}: {exc}"
            raise
        self._metrics.observe_batch(len(posts), [start - p.enqueued for p in posts], time.perf_counter() - start)
        return [{"top_k": top, "batch_size": len(posts)} for top in self._runner.top_k(probs, self._top_k)]

    def check_health(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"model replica failed a forward and needs replacing: {self._failure}")

    def __del__(self) -> None:
        runner = getattr(self, "_runner", None)
        if runner is not None:
            runner.close()


@serve.deployment(name=INGRESS_NAME)
@serve.ingress()
class SGMFTIngress:
    """HTTP in, preprocessing, one model call per post (see ``serve_app.api`` for why here)."""

    async def __init__(self, model: DeploymentHandle, serve_cfg: ServeConfig):
        from serve_app.metrics import IngressMetrics
        from serve_app.model import spec_from_info

        self._model = model
        self._serve_cfg = serve_cfg
        # The model replica owns the model directory; take its metadata and preprocessing spec
        # from it, so what is preprocessed here is what that model was trained on.
        self.info: dict[str, Any] = await model.info.remote()
        self._spec = spec_from_info(self.info)
        self._metrics = IngressMetrics()

    def __serve_build_asgi_app__(self):
        from serve_app.api import create_api

        return create_api(self, self._serve_cfg, self._spec, self._metrics)

    async def predict(self, input_ids: np.ndarray, pixel_values: np.ndarray) -> dict[str, Any]:
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        try:
            return await self._model.predict.remote(input_ids, pixel_values)
        except BackPressureError as exc:
            raise ApiError(503, "overloaded", f"the model's queue is full, retry later ({exc})", {"Retry-After": "1"}) from exc
        except DeploymentUnavailableError as exc:
            raise ApiError(503, "model_unavailable", f"the model deployment is unavailable: {exc}") from exc

    def check_health(self) -> None:
        if not self.info.get("labels"):
            raise RuntimeError("the ingress has no model metadata")


def autoscaling_config(s: ServeConfig) -> dict[str, Any]:
    """Serve's autoscaling config from ServeConfig.

    Ray averages ongoing requests over ``look_back_period_s`` (default 30 s) from metrics
    pushed every ``metrics_interval_s`` (default 10 s); with those defaults any delay under
    ~30 s would be meaningless. The window follows the upscale delay instead (1-30 s), and
    metrics are pushed twice per window.
    """
    look_back = min(max(s.upscale_delay_s, 1.0), 30.0)
    return {
        "min_replicas": s.min_replicas,
        "max_replicas": s.max_replicas,
        "initial_replicas": s.initial_replicas,
        "target_ongoing_requests": s.target_ongoing_requests,
        "upscale_delay_s": s.upscale_delay_s,
        "downscale_delay_s": s.downscale_delay_s,
        "look_back_period_s": look_back,
        "metrics_interval_s": look_back / 2,
    }


def ingress_max_ongoing(s: ServeConfig) -> int:
    # The ingress mostly awaits the model: let it hold everything the model replicas can take.
    return max(2 * s.max_ongoing_requests * s.max_replicas, 64)


def build_app(cfg: Config) -> serve.Application:
    """The ingress bound to the model deployment, with the options of ``cfg.serve``."""
    s = cfg.serve
    if not s.model_dir:
        raise ConfigError("serve.model_dir: empty; give a model directory path or URI (s3://, gs://, file://)")
    model = SGMFTModel.options(
        max_ongoing_requests=s.max_ongoing_requests,
        autoscaling_config=autoscaling_config(s),
        ray_actor_options={"num_cpus": s.num_cpus_per_replica, "num_gpus": s.num_gpus_per_replica},
    ).bind(resolve_source(s.model_dir), s.max_batch_size, s.batch_wait_timeout_s, s.top_k)
    return SGMFTIngress.options(
        num_replicas=1,
        max_ongoing_requests=ingress_max_ongoing(s),
        ray_actor_options={"num_cpus": s.num_cpus_per_replica},
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
