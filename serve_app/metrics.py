"""Serving metrics through ``ray.serve.metrics``: exported with Ray's Prometheus metrics
(``ray_sgmft_*``), tagged by Serve with deployment, replica and application.

Created inside replicas only (they need a Ray worker); the API falls back to no metrics.
"""

from __future__ import annotations

LATENCY_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]


class IngressMetrics:
    """HTTP requests by route, method and status; request and preprocessing latency."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter("sgmft_http_requests", description="HTTP requests by route, method and status code.",
                                tag_keys=("route", "method", "status"))
        self.latency = Histogram("sgmft_http_request_latency_s", description="HTTP request latency in the ingress (s).",
                                 boundaries=LATENCY_BUCKETS_S, tag_keys=("route",))
        self.preprocess = Histogram("sgmft_preprocess_latency_s", description="Decode + tokenise time per post (s).",
                                    boundaries=LATENCY_BUCKETS_S)
        self.auth_refusals = Counter("sgmft_auth_refusals", description="Requests refused for a missing or invalid API key.",
                                     tag_keys=("reason",))
        self.retries = Counter("sgmft_model_retries", description="Model calls retried because a model replica died.")
        self.killer_batches = Counter("sgmft_killer_batches", description="Batches answered 500 because serve.max_replica_deaths "
                                                                          "model replicas died in a row running them.")

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"route": route, "method": method, "status": str(status)})
        self.latency.observe(seconds, tags={"route": route})

    def observe_preprocess(self, seconds: float) -> None:
        self.preprocess.observe(seconds)

    def observe_auth_refusal(self, reason: str) -> None:
        """``reason``: missing or invalid (serve_app/auth.py)."""
        self.auth_refusals.inc(tags={"reason": reason})

    def observe_retry(self) -> None:
        self.retries.inc()

    def observe_killer_batch(self) -> None:
        self.killer_batches.inc()


class ModelMetrics:
    """Dynamic batch sizes, time posts wait for a batch, and forward latency per batch."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.batch_size = Histogram("sgmft_batch_size", description="Posts per model forward (dynamic batching).",
                                    boundaries=BATCH_SIZE_BUCKETS)
        # From when the replica's event loop takes the post up (posts arriving during a forward
        # wait for it before that) to the start of its batch's forward.
        self.queue_wait = Histogram("sgmft_queue_wait_s", description="Time a post waits in the replica's batch queue (s).",
                                    boundaries=LATENCY_BUCKETS_S)
        self.model_latency = Histogram("sgmft_model_latency_s", description="Model forward time per batch (s).",
                                       boundaries=LATENCY_BUCKETS_S)
        self.predictions = Counter("sgmft_predictions", description="Posts predicted.")

    def observe_batch(self, size: int, waits_s: list[float], forward_s: float) -> None:
        self.batch_size.observe(size)
        for wait in waits_s:
            self.queue_wait.observe(wait)
        self.model_latency.observe(forward_s)
        self.predictions.inc(size)


class NullMetrics:
    """Stands in outside Ray (the API used in-process)."""

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        pass

    def observe_preprocess(self, seconds: float) -> None:
        pass

    def observe_auth_refusal(self, reason: str) -> None:
        pass
