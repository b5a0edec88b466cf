"""Image inputs the tests make themselves, in memory, with Pillow and numpy.

Every property the tests check on the workshop corpus (``../shared/corpus/images``, absent
from a fresh clone) is also checked on these: good photos in each upload format, and the
hostile ones (truncated files, decompression bombs declared in a header, odd modes,
EXIF rotations, animations, zero-size and not-an-image bytes). Each function returns
encoded bytes (or a PIL image where named so) and is deterministic.

:data:`CATALOG` lists them like the corpus's MANIFEST.tsv: name, expected outcome
(``ok`` or ``reject``), the refusal code where one is certain, and what it exercises.

:func:`corpus_dir` is where the tests look for the workshop corpus: next to the
repository, or ``$SGMFT_TEST_CORPUS`` (read by the tests only; point it at a missing
folder to run the suite as a fresh clone would).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
CORPUS_ENV = "SGMFT_TEST_CORPUS"
PHOTO_SIZE = (120, 90)  # width, height: not square, so a missed rotation changes the shape
EXIF_ORIENTATION = 0x0112


# --- the workshop corpus (optional) ---------------------------------------------------

def corpus_dir() -> Path:
    """The workshop corpus the corpus-based tests read (it may not exist)."""
    override = os.environ.get(CORPUS_ENV)
    return Path(override) if override else REPO.parent / "shared" / "corpus"


def require_corpus() -> Path:
    """:func:`corpus_dir`, or skip the calling test with the reason."""
    import pytest

    path = corpus_dir()
    if not (path / "images").is_dir():
        pytest.skip(f"the workshop corpus is not at {path} (a fresh clone has none; the generated "
                    f"inputs of tests/hostile_images.py cover the same properties)")
    return path


# --- good pictures --------------------------------------------------------------------

def photo(size: tuple[int, int] = PHOTO_SIZE, seed: int = 0) -> Image.Image:
    """A photo-like RGB picture: a sky-to-ground gradient, sensor noise and asymmetric shapes."""
    width, height = size
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    sky, ground = np.array([90, 150, 230], np.float32), np.array([70, 120, 40], np.float32)
    pixels = sky * (1 - ramp) + ground * ramp + rng.normal(0, 8, size=(height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    draw.rectangle((4, 4, width // 3, height // 3), fill=(220, 30, 30))  # top-left: red block
    draw.ellipse((width * 2 // 3, height // 2, width - 4, height - 4), fill=(250, 240, 60))  # bottom-right: sun
    draw.line((0, height - 1, width // 2, height // 3), fill=(255, 255, 255), width=3)
    return image


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def good_jpeg() -> bytes:
    return encode(photo(), "JPEG", quality=90)


def good_png() -> bytes:
    return encode(photo(), "PNG")


def good_webp() -> bytes:
    return encode(photo(), "WEBP", quality=90)


def good_photos(n: int = 8) -> list[bytes]:
    """``n`` different good photos, cycling JPEG, PNG and WebP (for load and batch tests)."""
    formats = (("JPEG", {"quality": 90}), ("PNG", {}), ("WEBP", {"quality": 90}))
    out = []
    for i in range(n):
        fmt, params = formats[i % 3]
        out.append(encode(photo(seed=i), fmt, **params))
    return out


def gray_jpeg() -> bytes:
    return encode(photo().convert("L"), "JPEG", quality=90)


def bmp() -> bytes:
    return encode(photo(), "BMP")


def tiny_palette_png() -> bytes:
    """4x4, far below any model input size."""
    return encode(photo().resize((4, 4)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4), "PNG")


def la_png() -> bytes:
    image = photo().convert("L")
    image.putalpha(200)
    return encode(image, "PNG")


def cmyk_jpeg() -> bytes:
    """:func:`photo` as a CMYK JPEG (as print tools write them); compare with :func:`good_jpeg`."""
    return encode(photo().convert("CMYK"), "JPEG", quality=95)


def gray16_image(value: int = 30000) -> Image.Image:
    """A flat 16-bit grayscale image (mode I;16)."""
    return Image.fromarray(np.full((8, 8), value, dtype=np.uint16))


def gray16_png(value: int = 30000) -> bytes:
    return encode(gray16_image(value), "PNG")


def palette_png_with_transparency() -> bytes:
    """A palette PNG whose index 0 (red), used only in its top-left 10x10 corner, is transparent."""
    quantized = photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=15)
    indices = np.asarray(quantized, np.uint8) + 1
    indices[:10, :10] = 0
    image = Image.fromarray(indices, "P")
    image.putpalette([255, 0, 0] + quantized.getpalette()[: 15 * 3])
    return encode(image, "PNG", transparency=0)


def _rgba_with_transparent_corner() -> Image.Image:
    image = photo().convert("RGBA")
    alpha = np.full(image.size[::-1], 255, np.uint8)
    alpha[:10, :10] = 0  # top-left corner fully transparent (its colour is red underneath)
    image.putalpha(Image.fromarray(alpha, "L"))
    return image


def rgba_png() -> bytes:
    return encode(_rgba_with_transparent_corner(), "PNG")


def rgba_webp() -> bytes:
    return encode(_rgba_with_transparent_corner(), "WEBP", lossless=True)


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return exif.tobytes()


def exif_orientation_jpeg(orientation: int = 6) -> bytes:
    """:func:`photo` stored rotated, with the EXIF orientation that puts it upright again,
    as phones write it (6: the viewer rotates 90 degrees clockwise; 3: 180 degrees)."""
    stored = {6: photo().transpose(Image.Transpose.ROTATE_90), 3: photo().transpose(Image.Transpose.ROTATE_180),
              1: photo()}[orientation]
    return encode(stored, "JPEG", quality=92, exif=_exif(orientation))


def exif_orientation_webp(orientation: int = 3) -> bytes:
    stored = {6: photo().transpose(Image.Transpose.ROTATE_90), 3: photo().transpose(Image.Transpose.ROTATE_180),
              1: photo()}[orientation]
    return encode(stored, "WEBP", quality=92, exif=_exif(orientation))


def orientation_rectangle_jpeg() -> bytes:
    """A 2x1 JPEG whose EXIF says "rotate 90": upright it is 1 wide and 2 high."""
    return encode(Image.new("RGB", (2, 1), (200, 100, 50)), "JPEG", exif=_exif(6))


def broken_exif_jpeg() -> bytes:
    """:func:`good_jpeg` with an EXIF block whose IFD claims 32 entries and breaks off inside
    the first (an orientation of 6 whose value is missing): the picture must still decode,
    unrotated."""
    ifd = struct.pack(">H", 32) + struct.pack(">HHI", EXIF_ORIENTATION, 3, 1)
    payload = b"Exif\x00\x00" + b"MM\x00\x2a" + struct.pack(">I", 8) + ifd
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    data = good_jpeg()
    return data[:2] + segment + data[2:]


def animated_gif() -> bytes:
    """Two frames: :func:`photo`, then its colour negative."""
    first = photo()
    second = Image.fromarray(255 - np.asarray(first), "RGB")
    buffer = io.BytesIO()
    first.save(buffer, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    return buffer.getvalue()


def gif_frames(data: bytes) -> list[Image.Image]:
    """Every frame of a GIF as RGBA, for comparisons."""
    frames = Image.open(io.BytesIO(data))
    out = []
    for index in range(frames.n_frames):
        frames.seek(index)
        out.append(frames.convert("RGBA"))
    return out


# --- hostile bytes --------------------------------------------------------------------

def _noisy_photo() -> Image.Image:
    # Noise keeps the encoded file large, so a cut lands well inside the pixel data.
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, size=(160, 200, 3), dtype=np.uint8), "RGB")


def truncated_jpeg() -> bytes:
    data = encode(_noisy_photo(), "JPEG", quality=90)
    return data[: len(data) * 2 // 3]


def truncated_png() -> bytes:
    data = encode(_noisy_photo(), "PNG")
    return data[: len(data) * 2 // 3]


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header(width: int, height: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))


def png_claiming_size(width: int, height: int) -> bytes:
    """A 60-odd-byte PNG whose header declares ``width`` x ``height`` RGB pixels; one row of data."""
    return (_png_header(width, height) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


def _gif(width: int, height: int) -> bytes:
    """A GIF whose screen and only frame declare ``width`` x ``height``, with a two-colour table."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return screen + frame + b"\x02\x02\x44\x01\x00" + b";"  # LZW min size 2, one tiny block, trailer


def decompression_bomb_gif() -> bytes:
    """A GIF of a few dozen bytes claiming 65535 x 65535 = 4.3 billion pixels."""
    return _gif(65535, 65535)


def decompression_bomb_png() -> bytes:
    """A PNG of a few dozen bytes claiming 100000 x 100000 = 10 billion pixels."""
    return png_claiming_size(100_000, 100_000)


def over_limit_png() -> bytes:
    """7000 x 7000 = 49 M pixels: above the default ``max_image_pixels`` (40 M), below
    Pillow's own bomb limit, so only the header check of ``load_image`` refuses it."""
    return png_claiming_size(7000, 7000)


def zero_width_gif() -> bytes:
    """A GIF declaring a width of 0 (Pillow cannot write one, so the bytes are crafted)."""
    return _gif(0, 32)


def broken_stream_png() -> bytes:
    """A PNG whose compressed pixel data is corrupt while every chunk CRC is right."""
    data = encode(_noisy_photo(), "PNG")
    start = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[start:start + 4])[0]
    body = bytearray(data[start + 8:start + 8 + length])
    for i in range(len(body) // 4, len(body) // 2, 7):
        body[i] ^= 0x5A
    return data[:start] + _png_chunk(b"IDAT", bytes(body)) + data[start + 12 + length:]


def png_text_bomb() -> bytes:
    """A small PNG whose zTXt chunk inflates to 2 MB, over Pillow's text-chunk limit."""
    data = good_png()
    bomb = _png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"\x00" * (2 * 1024 * 1024), 9))
    cut = data.index(b"IDAT") - 4
    return data[:cut] + bomb + data[cut:]


def not_an_image_text() -> bytes:
    return "这不是图片 / this is not an image\n".encode() * 20


def not_an_image_random() -> bytes:
    return b"\x13\x37" + np.random.default_rng(7).bytes(510)


def empty() -> bytes:
    return b""


# --- the catalogue --------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    name: str
    make: Callable[[], bytes]
    expect: str  # "ok" or "reject"
    code: str | None  # the refusal code, where only one is right
    what: str

    def data(self) -> bytes:
        return self.make()


CATALOG: tuple[Sample, ...] = (
    Sample("gen_photo.jpg", good_jpeg, "ok", None, "baseline RGB JPEG"),
    Sample("gen_photo.png", good_png, "ok", None, "RGB PNG"),
    Sample("gen_photo.webp", good_webp, "ok", None, "WebP"),
    Sample("gen_gray.jpg", gray_jpeg, "ok", None, "grayscale (L) JPEG"),
    Sample("gen_photo.bmp", bmp, "ok", None, "BMP"),
    Sample("gen_tiny.png", tiny_palette_png, "ok", None, "4x4 palette PNG: far below the model's input size"),
    Sample("gen_la.png", la_png, "ok", None, "grayscale+alpha PNG"),
    Sample("gen_cmyk.jpg", cmyk_jpeg, "ok", None, "CMYK JPEG"),
    Sample("gen_gray16.png", gray16_png, "ok", None, "16-bit grayscale PNG (mode I;16)"),
    Sample("gen_palette_trns.png", palette_png_with_transparency, "ok", None, "palette PNG with a transparent entry"),
    Sample("gen_rgba.png", rgba_png, "ok", None, "RGBA PNG with transparent pixels"),
    Sample("gen_rgba.webp", rgba_webp, "ok", None, "RGBA WebP with transparent pixels"),
    Sample("gen_orientation_6.jpg", exif_orientation_jpeg, "ok", None, "JPEG with EXIF orientation 6"),
    Sample("gen_orientation_3.webp", exif_orientation_webp, "ok", None, "WebP with EXIF orientation 3"),
    Sample("gen_orientation_rectangle.jpg", orientation_rectangle_jpeg, "ok", None, "2x1 JPEG with orientation 6"),
    Sample("gen_bad_exif.jpg", broken_exif_jpeg, "ok", None, "JPEG with a corrupt EXIF block (must still decode)"),
    Sample("gen_animated.gif", animated_gif, "ok", None, "animated GIF, two different frames"),
    Sample("gen_truncated.jpg", truncated_jpeg, "reject", "image_truncated", "JPEG cut short"),
    Sample("gen_truncated.png", truncated_png, "reject", "image_truncated", "PNG cut short"),
    Sample("gen_broken_stream.png", broken_stream_png, "reject", "image_undecodable", "PNG with a corrupt data stream"),
    Sample("gen_text_bomb.png", png_text_bomb, "reject", "image_undecodable", "PNG whose zTXt inflates past the limit"),
    Sample("gen_bomb.gif", decompression_bomb_gif, "reject", "image_too_large", "GIF header claiming 4.3 G pixels"),
    Sample("gen_bomb.png", decompression_bomb_png, "reject", "image_too_large", "PNG header claiming 10 G pixels"),
    Sample("gen_over_limit.png", over_limit_png, "reject", "image_too_large", "PNG header claiming 49 M pixels"),
    Sample("gen_zero_width.gif", zero_width_gif, "reject", None, "GIF with zero width"),
    Sample("gen_text.txt", not_an_image_text, "reject", "image_undecodable", "text, not an image"),
    Sample("gen_random.bin", not_an_image_random, "reject", "image_undecodable", "random bytes"),
    Sample("gen_empty", empty, "reject", "image_empty", "no bytes at all"),
)
BY_NAME = {s.name: s for s in CATALOG}


def sample(name: str) -> bytes:
    return BY_NAME[name].data()
