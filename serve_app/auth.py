"""API keys for the HTTP API (``serve.api_key_env``): ``Authorization: Bearer KEY`` on
every route but ``/healthz``.

The keys are read from the environment variable that ``serve.api_key_env`` names, in the
ingress replica when it builds its app (start-up), so they never travel in the deployment's
config or the Serve application's args. The variable must be set in the environment of the
cluster's Ray processes (``ray start``'s environment; for ``sgmft serve`` without
RAY_ADDRESS, the local Ray is started by that process and inherits its environment).

A missing or wrong key gets 401 with the API's one error shape and ``WWW-Authenticate:
Bearer``; the given key is compared with every configured key in constant time
(``hmac.compare_digest``) and is never logged or echoed. Refusals are counted by the
request metrics (status 401) and, per reason, by ``observe_auth_refusal`` when the metrics
object has it (``ray_sgmft_auth_refusals_total``).
"""

from __future__ import annotations

import hmac
import os
from typing import Any, Callable, Mapping, Sequence

from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from sgmft.config import ConfigError
from serve_app.errors import error_response

PUBLIC_PATHS = frozenset({"/healthz"})  # liveness probes and load balancers carry no key
REFUSED = "unauthorized"


def load_api_keys(env_name: str, environ: Mapping[str, str] | None = None) -> tuple[bytes, ...]:
    """The comma-separated keys of ``env_name`` (surrounding blanks dropped), as UTF-8 bytes.
    An unset or empty variable is a configuration error naming it (never a silently open API)."""
    raw = (os.environ if environ is None else environ).get(env_name)
    keys = tuple(k.strip().encode("utf-8") for k in (raw or "").split(",") if k.strip())
    if not keys:
        state = "not set" if raw is None else "empty"
        raise ConfigError(f"serve.api_key_env={env_name}: the environment variable {env_name} is {state} in the "
                          f"ingress replica; set it to one or more API keys, comma-separated, in the environment "
                          f"of the cluster's Ray processes (or set serve.api_key_env to null for an open API)")
    return keys


def bearer_credentials(headers: Headers) -> bytes | None:
    """The raw bytes after ``Bearer `` in the Authorization header (scheme case-insensitive), or None."""
    scheme, _, credentials = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip().encode("latin-1")  # Starlette decoded the header bytes as latin-1


def key_matches(given: bytes, keys: Sequence[bytes]) -> bool:
    """Constant time in the given key's content: every configured key is compared, no early exit."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    return matched


class ApiKeyMiddleware:
    """Refuse requests without a valid ``Authorization: Bearer KEY`` (401), except to the
    routes whose path is in ``public`` (matched as the router matches, so a route prefix
    is handled). Installed inside the request metrics middleware, which counts the 401s,
    and outside the body limit, so an unauthenticated body is never read."""

    def __init__(self, app: ASGIApp, keys: Sequence[bytes], routes: list[BaseRoute],
                 on_refusal: Callable[[str], None] | None = None, public: frozenset[str] = PUBLIC_PATHS):
        if not keys:
            raise ValueError("ApiKeyMiddleware needs at least one key")
        self.app = app
        self.keys = tuple(keys)
        self.routes = routes  # the router's list: routes added after install are seen
        self.on_refusal = on_refusal
        self.public = public

    def is_public(self, scope: Scope) -> bool:
        return any(getattr(route, "path", None) in self.public and route.matches(scope)[0] == Match.FULL
                   for route in self.routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.is_public(scope):
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        given = bearer_credentials(headers)
        if given is not None and key_matches(given, self.keys):
            return await self.app(scope, receive, send)
        reason = "missing" if given is None else "invalid"
        if self.on_refusal is not None:
            self.on_refusal(reason)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})  # policy violation
        if reason == "missing":
            message, challenge = "an API key is required: send the header Authorization: Bearer <key>", 'Bearer realm="sgmft"'
        else:
            message, challenge = "the API key is not valid", 'Bearer realm="sgmft", error="invalid_token"'
        response_headers = {"WWW-Authenticate": challenge}
        if headers.get("content-length", "0").strip() not in ("", "0") or "transfer-encoding" in headers:
            response_headers["Connection"] = "close"  # the body stays unread: the connection cannot be reused
        await error_response(401, REFUSED, message, headers=response_headers)(scope, receive, send)


def install_api_keys(app: Any, env_name: str | None, metrics: Any = None) -> None:
    """Require API keys on ``app`` (a FastAPI app) when ``env_name`` is set; read the keys now."""
    if not env_name:
        return
    app.add_middleware(ApiKeyMiddleware, keys=load_api_keys(env_name), routes=app.router.routes,
                       on_refusal=getattr(metrics, "observe_auth_refusal", None))
