"""Pixels travel as uint8 and are normalised on the model's device, once, for every path."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sgmft.config import Config
from sgmft.data.preprocess import PreprocessSpec, image_pixels, normalize, preprocess_batch
from sgmft.models.backbone import normalize_pixels
from sgmft.models.model import build_model
from sgmft.config import CLIP_MEAN, CLIP_STD

SPEC = PreprocessSpec(image_size=32)


def _photo(size=(96, 64), seed=0, fmt="JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def test_uint8_pixels_match_the_float_transform_before_normalisation():
    """The uint8 path equals Chinese-CLIP's float transform (Resize -> ToTensor) to within 1/255."""
    from cn_clip.clip.utils import image_transform

    for fmt in ("PNG", "WEBP", "JPEG"):
        data = _photo(fmt=fmt, size=(40, 40))  # small: the JPEG draft scaling never applies
        ours = image_pixels(data, SPEC)
        assert ours.dtype == np.uint8 and ours.shape == (3, 32, 32)
        reference = image_transform(32)(Image.open(io.BytesIO(data)).convert("RGB")).numpy()  # normalised float
        mean = np.asarray(CLIP_MEAN, np.float32)[:, None, None]
        std = np.asarray(CLIP_STD, np.float32)[:, None, None]
        reference_01 = reference * std + mean
        assert np.abs(ours / 255.0 - reference_01).max() <= 1 / 255 + 1e-6, fmt
        assert np.allclose(normalize(ours), reference, atol=1e-5), fmt


def test_device_normalisation_equals_the_numpy_one_and_passes_floats_through():
    pixels = np.random.default_rng(1).integers(0, 256, (2, 3, 8, 8), dtype=np.uint8)
    on_device = normalize_pixels(torch.from_numpy(pixels))
    assert on_device.dtype == torch.float32
    assert np.allclose(on_device.numpy(), normalize(pixels), atol=1e-6)
    already = torch.randn(2, 3, 8, 8)
    assert normalize_pixels(already) is already


def test_the_model_gives_the_same_logits_for_uint8_and_normalised_float_input():
    torch.manual_seed(0)
    model = build_model(Config().model, load_pretrained=False).eval()
    batch = preprocess_batch({"text": ["今天在健身房", ""], "image": [_photo(seed=2), _photo(seed=3, fmt="PNG")]}, SPEC)
    ids = torch.from_numpy(batch["input_ids"])
    with torch.inference_mode():
        from_bytes = model(ids, torch.from_numpy(batch["pixel_values"])).logits
        from_floats = model(ids, torch.from_numpy(normalize(batch["pixel_values"]))).logits
    assert torch.allclose(from_bytes, from_floats, atol=1e-5)


def test_pixel_bytes_are_a_quarter_of_float32():
    batch = preprocess_batch({"text": ["a"] * 4, "image": [_photo(seed=i) for i in range(4)]}, SPEC)
    assert batch["pixel_values"].dtype == np.uint8
    assert batch["pixel_values"].nbytes * 4 == normalize(batch["pixel_values"]).nbytes == 4 * 3 * 32 * 32 * 4


@pytest.mark.slow
def test_ray_data_carries_uint8_pixels_a_quarter_of_the_float_bytes(ray_cluster, tmp_path):
    """Through Ray Data and a materialized split the pixel column stays uint8: 4x fewer bytes."""
    from sgmft.data.synth import synthesize
    from sgmft.ray_data import split_dataset

    synthesize(tmp_path / "ds", n=60, seed=0, image_size=32)
    ds = split_dataset(tmp_path / "ds", "train", SPEC, None, batch_size=16, concurrency=1).materialize()
    as_float = ds.map_batches(lambda b: {"pixel_values": normalize(b["pixel_values"])}, batch_format="numpy").materialize()
    only_pixels = ds.select_columns(["pixel_values"]).materialize()
    assert only_pixels.size_bytes() * 4 == pytest.approx(as_float.size_bytes(), rel=0.02)
    (first,) = only_pixels.take_batch(1, batch_format="numpy")["pixel_values"][:1]
    assert first.dtype == np.uint8
