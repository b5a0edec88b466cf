"""JPEG posts decoded in batches on the model's device (nvJPEG on a GPU, through torchvision).

On a GPU model replica the forward is cheap and the CPU side bounds throughput: decoding and
resizing a 640x480 JPEG costs ~3.7 ms of one core, so a 16-core node decodes at most ~4,300
posts/s. So a JPEG that passes the ingress's header checks (the same checks, and errors, as
THE preprocessing function) crosses as its encoded bytes, a third of its 224 px pixels, and
the model replica decodes the whole batch on its device (torchvision uses the hardware JPEG
decoder of A100/H100/H200 cards for baseline JPEGs) and resizes it there with the
antialiased bicubic filter Pillow uses. What the device decoder refuses is decoded on the CPU
by :func:`sgmft.data.preprocess.image_pixels`, with its errors, so a client sees the same
answers and the same error codes on either path.

Only whole, upright, colour JPEGs cross encoded: nvJPEG ignores EXIF orientation, and
greyscale, CMYK and other formats keep the CPU path, where the conversions are written once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from sgmft.data.preprocess import ImageDecodeError, PreprocessSpec, image_pixels, open_image

_EXIF_ORIENTATION = 0x0112
_JPEG_END = b"\xff\xd9"


def device_decodable(data: bytes, spec: PreprocessSpec) -> bool:
    """Whether ``data`` may cross encoded to the model's device: a colour (YCbCr) JPEG within
    the pixel limit, upright, and whole. Whole means it ends with its end-of-image marker:
    nvJPEG decodes a truncated file without a word (seen on an H200) where the CPU path
    answers ``image_truncated``. Raises :class:`ImageDecodeError` for what the header alone
    refuses, as the CPU path would."""
    image = open_image(data, spec.max_image_pixels)
    if image.format != "JPEG" or image.mode != "RGB" or not data.rstrip(b"\0").endswith(_JPEG_END):
        return False
    try:
        return image.getexif().get(_EXIF_ORIENTATION, 1) == 1
    except Exception:
        return False  # an EXIF block Pillow cannot read: the CPU path decides what it means


def decode_jpegs(encoded: Sequence[bytes], spec: PreprocessSpec, device: torch.device
                 ) -> tuple[torch.Tensor, dict[int, ImageDecodeError]]:
    """JPEG bytes -> uint8 (N, 3, S, S) on ``device``, and the rows that no decoder could
    use (left black), each with the error the CPU path gives it.

    The batch is decoded in one call; if the device decoder refuses it, each image is tried
    alone, and each it refuses is decoded on the CPU.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    size = spec.image_size
    out = torch.zeros((len(encoded), 3, size, size), dtype=torch.uint8, device=device)
    if not encoded:
        return out, {}
    tensors = [torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()) for data in encoded]
    try:
        decoded = dict(enumerate(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)))
    except Exception:  # one bad image fails the batched call: find it
        decoded = {}
        for row, tensor in enumerate(tensors):
            try:
                decoded[row] = decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device)
            except Exception:
                pass
    _resize_into(out, decoded, size)
    errors: dict[int, ImageDecodeError] = {}
    for row in sorted(set(range(len(encoded))) - set(decoded)):
        try:
            out[row] = torch.from_numpy(image_pixels(encoded[row], spec)).to(device)
        except ImageDecodeError as exc:
            errors[row] = exc
    return out, errors


def _resize_into(out: torch.Tensor, images: dict[int, torch.Tensor], size: int) -> None:
    """Each (3, H, W) image resized to (3, size, size) into its row of ``out``, those of one
    shape in one call."""
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for row, image in images.items():
        by_shape[tuple(image.shape)].append(row)
    for rows in by_shape.values():
        stacked = torch.stack([images[row] for row in rows]).float()
        resized = torch.nn.functional.interpolate(stacked, size=(size, size), mode="bicubic", antialias=True,
                                                  align_corners=False)
        out[rows] = resized.round_().clamp_(0, 255).to(torch.uint8)
