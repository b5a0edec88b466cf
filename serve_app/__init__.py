"""Online prediction over HTTP with Ray Serve.

Modules, lightest first (this package imports nothing on its own, so ``sgmft --help``
stays fast):

- ``errors``: the one error shape, ``{"error": {"code", "message"}}``, and its handlers.
- ``schemas``: the request/response models that document the API in OpenAPI (/docs).
- ``api``: the FastAPI app (routes, body limit, content types, preprocessing glue); no Ray.
- ``model``: model directories from a path or a cloud URI, and the batched forward; no Ray.
- ``metrics``: request, batch and latency metrics exported through Ray's Prometheus metrics.
- ``app``: the two Serve deployments, ``build_app(cfg)`` and ``app_builder(args)``.
- ``cli``: ``sgmft serve``.
"""
