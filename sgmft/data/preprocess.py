"""THE preprocessing of a post: one function for training, evaluation, prediction and serving.

Images: safe Pillow decoding (pixel limit checked from the header before any pixel is
decoded, truncated files refused), EXIF orientation applied, first frame of animations,
alpha flattened on white, every mode brought to 8-bit RGB, then Chinese-CLIP's
``image_transform`` up to its normalisation: Resize((S, S), BICUBIC), kept as uint8
(3, S, S). Pixels travel as bytes through Ray Data, the object store and Serve (a quarter
of float32); the CLIP mean/std normalisation is the model's first operation, on its
device (:func:`sgmft.models.backbone.normalize_pixels`). Text: the ``cn_clip`` tokenizer
and vocabulary, exactly as ``cn_clip.clip.tokenize``.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sgmft.config import CLIP_MEAN, CLIP_STD, PAD_TOKEN_ID, Config, image_size_of
from sgmft.data.tokenizer import tokenizer

ON_ERROR_CHOICES = ("raise", "record")
_JPEG_DRAFT_FACTOR = 2
"""JPEGs are DCT-downscaled to no less than twice the target size before the bicubic
resize: several times faster on large photos, and under 1/255 mean difference."""


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything that decides what the model sees; the same spec online and offline."""

    image_size: int
    context_length: int = 52
    max_image_pixels: int = 40_000_000

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.context_length < 3:
            raise ValueError(f"context_length must be >= 3 ([CLS] text [SEP]), got {self.context_length}")
        if self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be >= 1, got {self.max_image_pixels}")

    @classmethod
    def from_config(cls, cfg: Config) -> PreprocessSpec:
        return cls(
            image_size=image_size_of(cfg.model.backbone.preset),
            context_length=cfg.data.context_length,
            max_image_pixels=cfg.data.max_image_pixels,
        )


class ImageDecodeError(ValueError):
    """An image that cannot be used; ``code`` is a short machine-readable reason."""

    def __init__(self, code: str, message: str, post_id: str | None = None):
        self.code = code
        self.message = message
        self.post_id = post_id
        prefix = f"post {post_id}: " if post_id is not None else ""
        super().__init__(f"{prefix}{message}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Errors cross process boundaries in Ray; rebuild from the fields, not from args.
        return (type(self), (self.code, self.message, self.post_id))


# --- images -------------------------------------------------------------------------

def open_image(data: bytes, max_image_pixels: int) -> Image.Image:
    """Encoded image bytes -> a PIL image whose header has been read and checked (format,
    size, pixel limit), no pixel decoded yet. Raises :class:`ImageDecodeError`."""
    if data is None or len(data) == 0:
        raise ImageDecodeError("image_empty", "no image bytes")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("image_too_large", f"refused before decoding: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("image_undecodable", "not an image in a format Pillow can identify") from exc
    except Exception as exc:  # a malformed header can raise nearly anything; none may escape
        raise ImageDecodeError("image_undecodable", f"unreadable image header: {type(exc).__name__}: {exc}") from exc
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError("image_zero_size", f"{image.format} image has size {width}x{height}")
    # Pillow only warns between its own limit and twice it; a warning is a refusal here too.
    limit = min(max_image_pixels, Image.MAX_IMAGE_PIXELS or max_image_pixels)
    if width * height > limit:
        raise ImageDecodeError("image_too_large", f"{image.format} image of {width}x{height} = "
                               f"{width * height} pixels exceeds the limit of {limit} (refused before decoding)")
    return image


def load_image(data: bytes, max_image_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Decode encoded image bytes into an upright 8-bit RGB PIL image.

    ``draft_size`` lets JPEGs decode at a reduced scale that still covers
    ``draft_size`` x ``draft_size``. Raises :class:`ImageDecodeError` for anything unusable.
    """
    image = open_image(data, max_image_pixels)
    width, height = image.size
    try:
        if draft_size and image.format == "JPEG":
            image.draft(None, (draft_size, draft_size))
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("image_too_large", str(exc)) from exc
    except MemoryError as exc:
        raise ImageDecodeError("image_too_large", f"{width}x{height} image did not fit in memory") from exc
    except Exception as exc:
        code = "image_truncated" if "truncat" in str(exc).lower() else "image_undecodable"
        raise ImageDecodeError(code, f"{image.format} image ({width}x{height}) failed to decode: "
                               f"{type(exc).__name__}: {exc}") from exc
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:
        pass  # a broken EXIF block loses only the orientation, not the image
    try:
        return _to_rgb(image)
    except Exception as exc:
        raise ImageDecodeError("image_undecodable", f"cannot convert {image.mode} image to RGB: {exc}") from exc


_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: alpha flattened on white, 16/32-bit and float scaled rather than clipped."""
    if image.mode in _HIGH_DEPTH_MODES:
        # Pillow's own conversion clips at 255, which turns 16-bit photos white.
        image = Image.fromarray(_high_depth_to_uint8(np.asarray(image), image.mode), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _high_depth_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    values = values.astype(np.float64)
    peak = float(values.max(initial=0.0))
    if mode.startswith("I;16"):
        scale = 255.0 / 65535.0
    elif mode == "F":  # floats come as 0..1 or 0..255; anything brighter is scaled by its peak
        scale = 255.0 if peak <= 1.0 else 1.0 if peak <= 255.0 else 255.0 / peak
    else:  # "I": 8-bit or 16-bit values held in 32-bit integers
        scale = 1.0 if peak <= 255.0 else 255.0 / 65535.0 if peak <= 65535.0 else 255.0 / peak
    return np.clip(values * scale + 0.5, 0, 255).astype(np.uint8)


def image_pixels(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """Encoded image bytes -> uint8 (3, S, S) RGB: what the model receives, before normalisation."""
    size = spec.image_size
    image = load_image(data, spec.max_image_pixels, draft_size=size * _JPEG_DRAFT_FACTOR)
    image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 (..., 3, S, S) -> float32 CLIP-normalised; the numpy twin of the model's first step."""
    mean = np.asarray(CLIP_MEAN, np.float32)[:, None, None]
    std = np.asarray(CLIP_STD, np.float32)[:, None, None]
    return (pixels.astype(np.float32) / 255.0 - mean) / std


def decode_image(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    """Encoded image bytes -> float32 (3, S, S), CLIP-normalised, as the model sees them."""
    return normalize(image_pixels(data, spec))


def denormalize(pixels: np.ndarray, spec: PreprocessSpec | None = None) -> np.ndarray:
    """float32 (3, S, S) back to 0..255 RGB values (H, W, 3), for checks and display."""
    mean = np.asarray(CLIP_MEAN, np.float32)[:, None, None]
    std = np.asarray(CLIP_STD, np.float32)[:, None, None]
    return ((pixels * std + mean) * 255.0).transpose(1, 2, 0)


# --- text ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=65536)
def _token_ids(text: str) -> tuple[int, ...]:
    # Cached per text: Ray workers live across epochs and see the same posts each epoch.
    tok = tokenizer()
    return tuple(tok.convert_tokens_to_ids(tok.tokenize(text)))


def tokenize(texts: Sequence[str], context_length: int = 52) -> np.ndarray:
    """int64 (N, context_length): [CLS] tokens [SEP], zero-padded, as ``cn_clip.clip.tokenize``."""
    if isinstance(texts, str):
        raise TypeError("tokenize expects a list of texts, got one string")
    if context_length < 3:
        raise ValueError(f"context_length must be >= 3, got {context_length}")
    vocab = tokenizer().vocab
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    out = np.full((len(texts), context_length), PAD_TOKEN_ID, dtype=np.int64)
    for row, text in enumerate(texts):
        ids = _token_ids(text)[: context_length - 2]
        out[row, 0] = cls_id
        out[row, 1: 1 + len(ids)] = ids
        out[row, 1 + len(ids)] = sep_id
    return out


# --- batches ------------------------------------------------------------------------

def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, float) and value != value:  # NaN from pandas-made batches
        return ""
    return str(value)


def preprocess_batch(batch: Mapping[str, Any], spec: PreprocessSpec, on_error: str = "raise") -> dict[str, np.ndarray]:
    """A column batch of posts -> model inputs.

    ``batch`` has ``image`` (encoded bytes per row) and optionally ``text``, ``post_id``,
    ``label``. Returns ``input_ids`` int64 (N, L) and ``pixel_values`` uint8 (N, 3, S, S),
    with ``post_id``/``label`` passed through. ``on_error="raise"`` raises
    :class:`ImageDecodeError` naming the post; ``"record"`` zero-fills failed rows and adds
    an ``error`` column ("" when fine, ``"code: message"`` otherwise).
    """
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    if "image" not in batch:
        raise KeyError(f"a batch needs an 'image' column; it has {sorted(batch)}")
    images = batch["image"]
    n = len(images)
    texts = batch["text"] if "text" in batch else [None] * n
    if len(texts) != n:
        raise ValueError(f"batch columns differ in length: {n} images, {len(texts)} texts")
    post_ids = batch.get("post_id")
    size = spec.image_size
    pixels = np.zeros((n, 3, size, size), dtype=np.uint8)
    errors = [""] * n
    for row, data in enumerate(images):
        try:
            pixels[row] = image_pixels(data, spec)
        except ImageDecodeError as exc:
            post_id = None if post_ids is None else str(post_ids[row])
            if on_error == "raise":
                raise ImageDecodeError(exc.code, f"{exc.code}: {exc.message}", post_id=post_id) from exc
            errors[row] = f"{exc.code}: {exc.message}"
    out = {"input_ids": tokenize([_as_text(t) for t in texts], spec.context_length), "pixel_values": pixels}
    for key in ("post_id", "label"):
        if key in batch:
            out[key] = np.asarray(batch[key], dtype=object)
    if on_error == "record":
        out["error"] = np.asarray(errors, dtype=object)
    return out


def encode_labels(labels_column: Sequence[str | None], labels: Sequence[str]) -> np.ndarray:
    """Label strings -> int64 indices into ``labels``; an unknown or missing label is an error."""
    index = {label: i for i, label in enumerate(labels)}
    out = np.empty(len(labels_column), dtype=np.int64)
    for row, value in enumerate(labels_column):
        try:
            out[row] = index[value]
        except (KeyError, TypeError):
            shown = ", ".join(list(labels)[:12]) + (", ..." if len(labels) > 12 else "")
            what = "a missing label" if value is None else f"unknown label {value!r}"
            raise ValueError(f"row {row} has {what}; known labels: [{shown}]") from None
    return out
