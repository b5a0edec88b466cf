"""The HTTP API as a FastAPI app, independent of Ray: routes, body limit, content types,
error shape, and the glue to the one preprocessing function.

Preprocessing (decode + tokenise) runs here, in the ingress, in a thread pool:

- a client's bad image is refused before it reaches the model's batch queue, so it can
  never fail or delay a batch of other people's posts;
- decoding is CPU work that scales with ingress replicas (CPU-only, cheap), while the
  model replica (a GPU on a real cluster) only stacks tensors and runs forwards;
- Pillow releases the GIL while decoding, so the thread pool overlaps decodes with each
  other and with the model's forward.

The model receives decoded uint8 pixels (3*S*S bytes, 37 KB at 112 px, 147 KB at 224 px)
instead of the encoded file; they are normalised on the model's device.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sgmft.config import PAD_TOKEN_ID, ServeConfig
from sgmft.data.labels import display_name
from sgmft.data.preprocess import ImageDecodeError, PreprocessSpec, preprocess_batch, tokenize
from serve_app.admission import Admission, AdmissionMiddleware
from serve_app.auth import install_api_keys
from serve_app.errors import ApiError, error_response, format_validation_errors, install_error_handlers
from serve_app.metrics import NullMetrics
from serve_app.schemas import (
    MULTIPART_SCHEMA, BatchItemResult, BatchResponse, ErrorDetail, ErrorResponse, HealthResponse, LabelsResponse,
    ModelResponse, PostIn, Prediction, batch_request_schema, is_valid_unicode,
)

JSON_TYPE, MULTIPART_TYPE = "application/json", "multipart/form-data"


class Backend(Protocol):
    """What the API needs from the model side (the ingress deployment, or an in-process stand-in)."""

    info: dict[str, Any]

    def preparing(self) -> AbstractContextManager[None]:
        """Held while a post is decoded and tokenised, right before its ``predict``."""
        ...

    async def predict(self, input_ids: np.ndarray, image: np.ndarray | bytes) -> dict[str, Any]:
        """One post's token ids and image (uint8 pixels, or JPEG bytes where ``info["jpeg_decode"]``
        is ``model``) -> ``{"top_k": [{"label", "probability"}, ...], "batch_size": int}``, or
        ``{"error": {"code", "message"}}`` for an image the model side could not decode."""
        ...


class Metrics(Protocol):
    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None: ...

    def observe_preprocess(self, seconds: float) -> None: ...


# --- preprocessing glue -------------------------------------------------------------

@dataclass
class PreparedPost:
    input_ids: np.ndarray  # int64 (L,)
    image: np.ndarray | bytes  # uint8 (3, S, S) pixels, or JPEG bytes the model's device decodes
    text_truncated: bool


def prepare_post(text: str, image: bytes, spec: PreprocessSpec, max_text_chars: int,
                 jpeg_to_model: bool = False) -> PreparedPost:
    """Truncate the text, then decode and tokenise with THE preprocessing function; with
    ``jpeg_to_model``, a JPEG the model's device can decode is only checked from its header."""
    from sgmft.data.device_decode import device_decodable

    truncated = len(text) > max_text_chars
    text = text[:max_text_chars]
    try:
        if jpeg_to_model and device_decodable(image, spec):
            post = PreparedPost(tokenize([text], spec.context_length)[0], image, truncated)
        else:
            inputs = preprocess_batch({"text": [text], "image": [image]}, spec, on_error="raise")
            post = PreparedPost(inputs["input_ids"][0], inputs["pixel_values"][0], truncated)
    except ImageDecodeError as exc:
        raise image_error(exc) from exc
    if not truncated:
        # One more position than the model's context: if it fills, the model's copy was cut.
        post.text_truncated = bool(tokenize([text], spec.context_length + 1)[0, -1] != PAD_TOKEN_ID)
    return post


def image_error(exc: ImageDecodeError | dict[str, str]) -> ApiError:
    """The 422 of an image that cannot be used, from the ingress's decode or the model's."""
    code, message = (exc.code, exc.message) if isinstance(exc, ImageDecodeError) else (exc["code"], exc["message"])
    return ApiError(422, code, f"image: {message.removeprefix(f'{code}: ')}")


def decode_base64_image(value: str) -> bytes:
    """Standard base64 (line breaks allowed), optionally as a ``data:...;base64,`` URL."""
    data = value.strip()
    if data.startswith("data:"):
        header, comma, data = data.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(422, "invalid_base64", "image_base64: a data URL must look like data:image/png;base64,<data>")
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(422, "invalid_base64", f"image_base64 is not valid base64: {exc}") from exc


def parse_post(raw: Any, prefix: str = "") -> PostIn:
    if not isinstance(raw, dict):
        where = prefix.rstrip(".") or "body"
        raise ApiError(422, "invalid_field", f"{where}: expected a JSON object with text and image_base64, got {type(raw).__name__}")
    try:
        return PostIn.model_validate(raw)
    except ValidationError as exc:
        code, message = format_validation_errors(exc.errors(), prefix)
        raise ApiError(422, code, message) from exc


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def require_media_type(request: Request, allowed: tuple[str, ...]) -> str:
    kind = media_type(request)
    if kind in allowed or (JSON_TYPE in allowed and kind.endswith("+json")):
        return JSON_TYPE if kind.endswith("json") else kind
    got = f"Content-Type {kind!r}" if kind else "no Content-Type"
    raise ApiError(415, "unsupported_media_type", f"got {got}; send {' or '.join(allowed)}")


async def read_json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except json.JSONDecodeError as exc:
        raise ApiError(400, "malformed_json", f"request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from exc
    except (ValueError, RecursionError) as exc:  # bad UTF-8, nesting too deep, an integer of 5000 digits
        raise ApiError(400, "malformed_json", f"request body is not valid JSON: {exc}") from exc


async def read_multipart(request: Request, max_part_bytes: int) -> tuple[str, bytes, str | None]:
    """(text, image bytes, post_id) from a multipart form with a ``text`` field and an ``image`` file."""
    try:
        form = await request.form(max_files=1, max_fields=16, max_part_size=max_part_bytes)
    except StarletteHTTPException as exc:  # Starlette's report of a malformed multipart body
        raise ApiError(400, "malformed_multipart", f"multipart body cannot be parsed: {exc.detail}") from exc
    try:
        missing = [name for name in ("text", "image") if name not in form]
        if missing:
            raise ApiError(422, "missing_field", "; ".join(f"{name}: Field required" for name in missing))
        text, image, post_id = form["text"], form["image"], form.get("post_id")
        if not isinstance(text, str):
            raise ApiError(422, "invalid_field", "text: must be a plain form field, not a file")
        if not isinstance(image, UploadFile):
            raise ApiError(422, "invalid_field", "image: must be a file upload (multipart file part with a filename)")
        if post_id is not None and not (isinstance(post_id, str) and is_valid_unicode(post_id)):
            raise ApiError(422, "invalid_field", "post_id: must be a plain form field of valid Unicode text")
        return text, await image.read(), post_id
    finally:
        await form.close()


# --- ASGI middleware ----------------------------------------------------------------

class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` with 413: from Content-Length when it is declared,
    and by counting while reading, so a lying or absent header (chunked upload) cannot
    get past it. The body is buffered here once and replayed to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                return await self._refuse(scope, receive, send, 400, "invalid_content_length", f"Content-Length {declared!r} is not a number")
            if int(declared) > self.max_bytes:
                return await self._refuse(scope, receive, send, 413, "body_too_large",
                                          f"request body of {int(declared)} bytes exceeds the limit of {self.max_bytes} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away; nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send, 413, "body_too_large",
                                          f"request body exceeds the limit of {self.max_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, code: str, message: str) -> None:
        # The rest of the body stays unread, so the connection cannot be reused.
        await error_response(status, code, message, headers={"Connection": "close"})(scope, receive, send)


class RequestMetricsMiddleware:
    """Count requests by route template, method and status; time them. Outermost, so the
    body limit's 413s are counted too."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: list[BaseRoute]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def route_of(self, scope: Scope) -> str:
        # The route template, not the raw path: bounded label cardinality. Matched here,
        # not taken from the router, because the body limit may answer before routing.
        for route in self.routes:
            if route.matches(scope)[0] != Match.NONE:
                return getattr(route, "path", "other")
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_recording)
        finally:
            self.metrics.observe_request(self.route_of(scope), scope.get("method", ""), status, time.perf_counter() - start)


# --- the app ------------------------------------------------------------------------

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Malformed JSON or multipart body."},
    413: {"model": ErrorResponse, "description": "Body larger than serve.max_body_bytes."},
    415: {"model": ErrorResponse, "description": "Content-Type not accepted by this route."},
    422: {"model": ErrorResponse, "description": "Missing or invalid field, invalid base64, unusable image "
                                                  "(code image_too_large, image_undecodable, image_truncated, ...)."},
    500: {"model": ErrorResponse, "description": "Code batch_killed_replicas: model replicas died in a row running "
                                                  "the batch this post was in (serve.max_replica_deaths)."},
    503: {"model": ErrorResponse, "description": "Overloaded (more posts than serve.ingress_max_posts), or the model "
                                                  "is unavailable or did not answer in time; retry after Retry-After.",
          "headers": {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}},
}

DESCRIPTION = """Semantic location prediction for Weibo-style posts (Chinese text + one image) with SG-MFT.

Every error has the body `{"error": {"code": "...", "message": "..."}}`; a client's mistake is
always a 4xx. In a batch, a bad post gets its own `error` and the others still answer."""


@dataclass
class PostPredictor:
    """One post through THE preprocessing (in a thread: Pillow releases the GIL) and the backend."""

    backend: Backend
    spec: PreprocessSpec
    max_text_chars: int
    metrics: Metrics
    admission: Admission = field(default_factory=lambda: Admission(1 << 30))
    jpeg_to_model: bool = False

    async def predict(self, text: str, image: bytes, gone: Callable[[], Awaitable[bool]] | None = None) -> dict[str, Any]:
        """``gone``: whether the client has disconnected, asked once the post is prepared, so
        that a post nobody waits for never reaches the model."""
        start = time.perf_counter()
        with self.backend.preparing():  # the batcher waits for posts being prepared
            post = await run_in_threadpool(prepare_post, text, image, self.spec, self.max_text_chars, self.jpeg_to_model)
        self.metrics.observe_preprocess(time.perf_counter() - start)
        if gone is not None and await gone():
            raise ApiError(499, "client_gone", "the client disconnected before its post reached the model")
        out = await self.backend.predict(post.input_ids, post.image)
        if "error" in out:
            raise image_error(out["error"])
        return {"label": out["top_k"][0]["label"], "top_k": out["top_k"], "text_truncated": post.text_truncated,
                "batch_size": out["batch_size"]}

    async def predict_one(self, text: str, image: bytes, gone: Callable[[], Awaitable[bool]]) -> dict[str, Any]:
        with self.admission.hold(1):
            return await self.predict(text, image, gone)

    async def batch(self, items: list[Any], gone: Callable[[], Awaitable[bool]]) -> list[BatchItemResult]:
        """The posts of a batch request, admitted together. A post that cannot be used gets
        its own error; one the server cannot answer (model unavailable, overloaded) fails the
        request with its 5xx, as the single route does, so a client retries it whole."""
        posts = [parse_post(raw, prefix=f"posts[{i}].") for i, raw in enumerate(items)]  # the schema, as documented
        with self.admission.hold(len(posts)):
            results = await asyncio.gather(*(self.batch_item(i, post, gone) for i, post in enumerate(posts)),
                                           return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    async def batch_item(self, index: int, post: PostIn, gone: Callable[[], Awaitable[bool]]) -> BatchItemResult:
        """A post of a batch request: its own error object when its image cannot be used."""
        try:
            result = await self.predict(post.text, decode_base64_image(post.image_base64), gone)
        except ApiError as exc:
            if exc.status >= 500 or exc.status == 499:
                raise
            return BatchItemResult(index=index, post_id=post.post_id,
                                   error=ErrorDetail(code=exc.code, message=exc.message))
        return BatchItemResult(index=index, post_id=post.post_id, **result)


def batch_posts(body: Any, max_items: int) -> list[Any]:
    """The posts of a batch request body: ``{"posts": [...]}`` or the bare list."""
    if isinstance(body, list):
        body = {"posts": body}
    if not isinstance(body, dict) or "posts" not in body:
        raise ApiError(422, "missing_field", 'posts: Field required (send {"posts": [...]} or a JSON list of posts)')
    posts = body["posts"]
    if not isinstance(posts, list):
        raise ApiError(422, "invalid_field", f"posts: expected a list, got {type(posts).__name__}")
    if not posts:
        raise ApiError(422, "empty_batch", "posts: the list is empty")
    if len(posts) > max_items:
        raise ApiError(422, "too_many_posts", f"posts: {len(posts)} posts; at most {max_items} per request")
    return posts


def body_schema(content: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI request body of a route that parses its body by hand (two content types; per-post errors)."""
    return {"requestBody": {"required": True, "content": {kind: {"schema": schema} for kind, schema in content.items()}}}


def create_api(backend: Backend, serve_cfg: ServeConfig, spec: PreprocessSpec, metrics: Metrics | None = None) -> FastAPI:
    """The FastAPI app for one loaded model (``backend.info``)."""
    info = backend.info
    version = str(info["version"])
    metrics = metrics or NullMetrics()
    posts = PostPredictor(backend, spec, serve_cfg.max_text_chars, metrics, Admission(serve_cfg.ingress_max_posts),
                          jpeg_to_model=info.get("jpeg_decode") == "model")
    app = FastAPI(title="SG-MFT semantic location prediction", version=version, description=DESCRIPTION)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=serve_cfg.max_body_bytes)
    app.add_middleware(AdmissionMiddleware, admission=posts.admission)
    install_api_keys(app, serve_cfg.api_key_env, metrics)  # serve.api_key_env; inside the metrics, outside the body limit
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics, routes=app.router.routes)

    @app.post("/v1/predict", response_model=Prediction, response_model_exclude_none=True, responses=ERROR_RESPONSES,
              openapi_extra=body_schema({JSON_TYPE: PostIn.model_json_schema(), MULTIPART_TYPE: MULTIPART_SCHEMA}))
    async def predict(request: Request) -> Prediction:
        """Predict one post: JSON `{"text", "image_base64", "post_id"?}` or a multipart form with
        a `text` field and an `image` file."""
        if require_media_type(request, (JSON_TYPE, MULTIPART_TYPE)) == JSON_TYPE:
            post = parse_post(await read_json(request))
            text, image, post_id = post.text, decode_base64_image(post.image_base64), post.post_id
        else:
            text, image, post_id = await read_multipart(request, serve_cfg.max_body_bytes)
        return Prediction(post_id=post_id, model_version=version, **await posts.predict_one(text, image, request.is_disconnected))

    @app.post("/v1/predict/batch", response_model=BatchResponse, response_model_exclude_none=True, responses=ERROR_RESPONSES,
              openapi_extra=body_schema({JSON_TYPE: batch_request_schema(serve_cfg.max_batch_items)}))
    async def predict_batch(request: Request) -> BatchResponse:
        """Predict up to serve.max_batch_items posts, sent as `{"posts": [...]}` or as a bare JSON list.
        A post whose fields do not match the schema fails the request (422, naming it); a post whose
        image cannot be used (bad base64, undecodable) gets its own `error` and the others still
        answer (HTTP 200)."""
        require_media_type(request, (JSON_TYPE,))
        items = batch_posts(await read_json(request), serve_cfg.max_batch_items)
        # Items are batched in the ingress with every other request's posts before the model call.
        results = await posts.batch(items, request.is_disconnected)
        failed = sum(r.error is not None for r in results)
        return BatchResponse(model_version=version, results=results, num_ok=len(results) - failed, num_failed=failed)

    @app.get("/v1/labels", response_model=LabelsResponse)
    async def labels() -> LabelsResponse:
        """The model's label set, in output order, with display names."""
        return LabelsResponse(labels=info["labels"], display_names={x: display_name(x) for x in info["labels"]})

    @app.get("/v1/model", response_model=ModelResponse)
    async def model() -> ModelResponse:
        """Model version, source, config, preprocessing and the training metrics of metrics.json."""
        return ModelResponse(**info)

    @app.get("/healthz", response_model=HealthResponse)
    async def healthz() -> HealthResponse:
        """200 once the model is loaded and this ingress is serving."""
        return HealthResponse(model_version=version)

    return app
