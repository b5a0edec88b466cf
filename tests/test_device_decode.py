"""JPEGs decoded on the model's device give what THE preprocessing function gives, and what
the device decoder refuses gets the CPU path's errors. Runs on the CPU (torchvision's libjpeg)
here, and on nvJPEG where a GPU is present (the ``cuda`` cases, run by benchmarks/gpu_suite.sh).
"""

from __future__ import annotations

import hostile_images as hi
import numpy as np
import pytest
import torch

from sgmft.data.device_decode import decode_jpegs, device_decodable
from sgmft.data.preprocess import ImageDecodeError, PreprocessSpec, image_pixels

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]


def photos(n: int = 6) -> list[bytes]:
    return [hi.encode(hi.photo(size=size, seed=i), "JPEG", quality=q)
            for i, (size, q) in enumerate([((640, 480), 90), ((480, 640), 75), ((1280, 960), 95)] * (n // 3))]


def test_only_whole_upright_colour_jpegs_cross_encoded():
    spec = PreprocessSpec(image_size=224)
    assert all(device_decodable(data, spec) for data in photos())
    for name in ("good_png", "good_webp", "gray_jpeg", "cmyk_jpeg", "exif_orientation_jpeg", "truncated_jpeg"):
        assert not device_decodable(getattr(hi, name)(), spec), name


@pytest.mark.parametrize("data", [b"", hi.encode(hi.photo(size=(400, 300)), "JPEG")], ids=["empty", "over_the_limit"])
def test_the_header_checks_refuse_as_the_cpu_path_does(data):
    spec = PreprocessSpec(image_size=32, max_image_pixels=100_000)
    with pytest.raises(ImageDecodeError) as cpu:
        image_pixels(data, spec)
    with pytest.raises(ImageDecodeError) as header:
        device_decodable(data, spec)
    assert header.value.code == cpu.value.code


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [32, 224])
def test_jpegs_decode_to_the_pixels_of_the_cpu_path(device, size):
    spec = PreprocessSpec(image_size=size)
    data = photos()
    decoded, errors = decode_jpegs(data, spec, torch.device(device))
    assert errors == {} and decoded.device.type == device and decoded.dtype == torch.uint8
    reference = np.stack([image_pixels(d, spec) for d in data]).astype(np.int16)
    difference = np.abs(decoded.cpu().numpy().astype(np.int16) - reference)
    # Pillow first decodes large JPEGs at a reduced DCT scale; the device resizes from full size.
    assert difference.mean() < 1.5 and np.percentile(difference, 99) <= 8, (difference.mean(), difference.max())


@pytest.mark.parametrize("device", DEVICES)
def test_what_no_decoder_can_use_gets_the_cpu_paths_error(device):
    """A truncated JPEG never comes here: nvJPEG decodes one without a word (seen on an H200)
    where the CPU path answers ``image_truncated``, so it is kept off the device (test above)."""
    spec = PreprocessSpec(image_size=32)
    good = photos(3)[0]
    bad = {1: b"\xff\xd8\xff\xe0 not a jpeg at all \xff\xd9", 3: b"\xff\xd8\xff\xdb" + bytes(70) + b"\xff\xd9"}
    data = [good, bad[1], good, bad[3]]
    decoded, errors = decode_jpegs(data, spec, torch.device(device))
    expected = {}
    for row, image in bad.items():
        with pytest.raises(ImageDecodeError) as cpu:
            image_pixels(image, spec)
        expected[row] = cpu.value.code
    assert {row: exc.code for row, exc in errors.items()} == expected
    assert torch.equal(decoded[0], decoded[2]) and decoded[0].any()
    assert not decoded[1].any() and not decoded[3].any()
