"""Request and response models: they validate JSON input and document the API at /docs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator


class PostIn(BaseModel):
    """One post as JSON. ``text`` may be empty; both fields must be present."""

    post_id: str | None = Field(None, description="Echoed back in the result, to match answers to posts.")
    text: str = Field(..., description="The post's text (Chinese). Longer than serve.max_text_chars: truncated, "
                                        "and the result says ``text_truncated: true``.")
    image_base64: str = Field(..., min_length=1, description="The encoded image file (JPEG, PNG, WebP, GIF, BMP, ...) in "
                                                "standard base64; a ``data:image/...;base64,`` prefix is accepted.")

    @field_validator("post_id")
    @classmethod
    def _echoable(cls, value: str | None) -> str | None:
        # It is echoed back: a lone surrogate (valid in JSON escapes, not in UTF-8) could not be.
        if value is not None and not is_valid_unicode(value):
            raise ValueError("must be valid Unicode text (it contains a lone surrogate)")
        return value


def is_valid_unicode(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class LabelProbability(BaseModel):
    label: str
    probability: float


class Prediction(BaseModel):
    post_id: str | None = Field(None, description="The request's post_id, when it gave one.")
    label: str = Field(..., description="The most probable semantic location category.")
    top_k: list[LabelProbability] = Field(..., description="The serve.top_k most probable labels, most probable first.")
    model_version: str
    text_truncated: bool = Field(..., description="True when the text was cut to serve.max_text_chars characters "
                                                  "or to the model's context length in tokens.")
    batch_size: int = Field(..., description="Diagnostic: how many posts the model ran together with this one "
                                             "(dynamic batching).")


class ErrorDetail(BaseModel):
    code: str = Field(..., description="Machine-readable reason, e.g. malformed_json, missing_field, "
                                       "invalid_base64, image_too_large, image_undecodable, body_too_large.")
    message: str = Field(..., description="What was wrong, for a person.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class BatchItemResult(BaseModel):
    """A prediction, or ``error`` for a post that could not be used; the others still answer."""

    index: int = Field(..., description="Position of the post in the request.")
    post_id: str | None = None
    label: str | None = None
    top_k: list[LabelProbability] | None = None
    text_truncated: bool | None = None
    batch_size: int | None = None
    error: ErrorDetail | None = None


class BatchResponse(BaseModel):
    model_version: str
    results: list[BatchItemResult] = Field(..., description="One per post, in request order.")
    num_ok: int
    num_failed: int


class LabelsResponse(BaseModel):
    labels: list[str] = Field(..., description="The model's label set, in output order.")
    display_names: dict[str, str] = Field(..., description="Chinese display names of the default labels.")


class ModelResponse(BaseModel):
    version: str
    source: str = Field(..., description="Where the model directory was loaded from (path or URI).")
    labels: list[str]
    device: str
    preprocess: dict[str, Any] = Field(..., description="The preprocessing spec: image size, context length, pixel limit.")
    config: dict[str, Any] = Field(..., description="The model directory's config.json.")
    metrics: dict[str, Any] = Field(..., description="The model directory's metrics.json (training/evaluation metrics).")
    compiled_batch_sizes: list[int] = Field(default_factory=list, description="Batch sizes compiled at start-up (serve.compile).")
    cuda_graph_batch_sizes: list[int] = Field(default_factory=list, description="Batch sizes captured as CUDA graphs at start-up (serve.cuda_graphs, GPU only).")
    jpeg_decode: Literal["ingress", "model"] = Field("ingress", description="Where JPEG posts are decoded: the ingress's CPUs, or in batches on the model's device (serve.jpeg_decode).")


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    model_version: str


def batch_request_schema(max_items: int) -> dict[str, Any]:
    """OpenAPI schema of the batch request body (parsed by hand so bad items fail alone)."""
    posts = {"type": "array", "minItems": 1, "maxItems": max_items, "items": PostIn.model_json_schema()}
    return {"oneOf": [{"type": "object", "required": ["posts"], "properties": {"posts": posts}}, posts]}


MULTIPART_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["text", "image"],
    "properties": {
        "text": {"type": "string", "description": "The post's text (may be empty)."},
        "image": {"type": "string", "format": "binary", "description": "The image file."},
        "post_id": {"type": "string"},
    },
}
