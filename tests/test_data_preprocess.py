"""THE preprocessing function on real inputs: Pillow's test images and real Weibo posts."""

from __future__ import annotations

import csv
import io
import pickle
import random

import numpy as np
import pytest
from PIL import Image

from sgmft.data.preprocess import (
    ImageDecodeError,
    PreprocessSpec,
    decode_image,
    denormalize,
    encode_labels,
    load_image,
    preprocess_batch,
    tokenize,
)
from sgmft.data.weibo import WeiboPost, parse_weibo_dump

SPEC = PreprocessSpec(image_size=64)


def _manifest(corpus):
    with open(corpus / "images" / "MANIFEST.tsv", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def _image(corpus, name: str) -> bytes:
    return (corpus / "images" / name).read_bytes()


@pytest.mark.timeout(60)  # a hang in any decoder fails here instead of stalling the suite
def test_every_manifest_image_is_decoded_or_refused_as_expected(corpus):
    rows = _manifest(corpus)
    assert {r["expect"] for r in rows} == {"ok", "reject", "either"}
    outcomes = {}
    for row in rows:
        try:
            pixels = decode_image(_image(corpus, row["file"]), SPEC)
            outcomes[row["file"]] = "ok"
            assert pixels.shape == (3, 64, 64) and pixels.dtype == np.float32, row["file"]
            assert np.isfinite(pixels).all(), row["file"]
        except ImageDecodeError as exc:
            outcomes[row["file"]] = "reject"
            assert exc.code.startswith("image_") and str(exc), row["file"]
    for row in rows:
        if row["expect"] != "either":
            assert outcomes[row["file"]] == row["expect"], f"{row['file']} ({row['what it exercises']})"


@pytest.mark.parametrize("name, code", [
    ("truncated_jpeg.jpg", "image_truncated"),
    ("truncated_image.png", "image_truncated"),
    ("broken.png", "image_undecodable"),
    ("decompression_bomb.gif", "image_too_large"),
])
def test_refusals_carry_a_reason_code(corpus, name, code):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(_image(corpus, name), SPEC)
    assert info.value.code == code


def test_pixel_limit_is_checked_from_the_header_before_decoding(corpus, monkeypatch):
    # Without Pillow's own guard, our header check alone must refuse the 4.3-gigapixel GIF.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(_image(corpus, "decompression_bomb.gif"), SPEC)
    assert info.value.code == "image_too_large" and "before decoding" in str(info.value)
    small_limit = PreprocessSpec(image_size=64, max_image_pixels=100 * 100)
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        decode_image(_image(corpus, "flower.jpg"), small_limit)  # 480x360


@pytest.mark.parametrize("data", [b"", None])
def test_no_bytes_is_image_empty(data):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, SPEC)
    assert info.value.code == "image_empty"


@pytest.mark.timeout(60)
def test_corrupted_files_never_raise_anything_but_image_decode_error(corpus):
    rng = random.Random(0)
    for name in ("hopper.jpg", "hopper.png", "hopper.webp", "hopper.gif", "flower.jpg"):
        original = _image(corpus, name)
        for _ in range(20):
            data = bytearray(original[: rng.randrange(1, len(original))] if rng.random() < 0.5 else original)
            for _ in range(rng.randrange(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            try:
                decode_image(bytes(data), SPEC)
            except ImageDecodeError:
                pass


def test_exif_orientation_is_applied(corpus):
    upright = decode_image(_image(corpus, "hopper.jpg"), SPEC)
    rotated_file = decode_image(_image(corpus, "hopper_orientation_6.jpg"), SPEC)
    raw = Image.open(io.BytesIO(_image(corpus, "hopper_orientation_6.jpg"))).convert("RGB").resize((64, 64), Image.Resampling.BICUBIC)
    raw = decode_image(_png(raw), SPEC)  # the same pixels with the orientation ignored
    assert np.abs(rotated_file - upright).mean() < 0.25 * np.abs(raw - upright).mean()
    webp = decode_image(_image(corpus, "hopper_orientation_3.webp"), SPEC)
    assert np.abs(webp - upright).mean() < 0.15
    # A 2x1 JPEG whose EXIF says "rotate": upright it is 1 wide, 2 high.
    assert Image.open(io.BytesIO(_image(corpus, "orientation_rectangle.jpg"))).size == (2, 1)
    assert load_image(_image(corpus, "orientation_rectangle.jpg"), 10**6).size == (1, 2)


def test_broken_exif_falls_back_to_the_unrotated_image(corpus):
    image = load_image(_image(corpus, "hopper_bad_exif.jpg"), 10**7)
    assert image.mode == "RGB" and image.size == (500, 500)


def test_alpha_is_flattened_on_white(corpus):
    for name in ("transparent.png", "transparent.webp"):
        assert Image.open(corpus / "images" / name).getpixel((0, 0))[3] == 0
        rgb = denormalize(decode_image(_image(corpus, name), SPEC), SPEC)
        assert np.all(rgb[0, 0] > 250), (name, rgb[0, 0])


def test_animation_gives_its_first_frame(corpus):
    data = _image(corpus, "chi.gif")
    frames = Image.open(io.BytesIO(data))
    first = frames.convert("RGBA")
    frames.seek(5)
    later = frames.convert("RGBA")
    decoded = decode_image(data, SPEC)
    assert np.abs(decoded - decode_image(_png(first), SPEC)).max() < 1e-5
    assert np.abs(decoded - decode_image(_png(later), SPEC)).mean() > 0.01


def test_modes_are_converted_sensibly(corpus):
    cmyk = decode_image(_image(corpus, "pil_sample_cmyk.jpg"), SPEC)
    rgb = decode_image(_image(corpus, "pil_sample_rgb.jpg"), SPEC)
    assert np.abs(cmyk - rgb).mean() < 0.2
    gray16 = Image.fromarray(np.full((8, 8), 30000, dtype=np.uint16))  # mode I;16
    value = denormalize(decode_image(_png(gray16), SPEC), SPEC)[4, 4]
    assert np.allclose(value, 30000 / 257, atol=1.5), value  # scaled, not clipped to white


def test_matches_chinese_clip_image_transform(corpus):
    from cn_clip.clip import image_transform

    for name in ("hopper.png", "hopper.jpg", "flower.webp"):
        expected = image_transform(64)(Image.open(corpus / "images" / name)).numpy()
        assert np.allclose(decode_image(_image(corpus, name), SPEC), expected, atol=1e-5), name
    # Large JPEGs decode at a reduced DCT scale first: not bit-equal, but within a grey level.
    expected = image_transform(64)(Image.open(corpus / "images" / "junk_jpeg_header.jpg")).numpy()
    got = decode_image(_image(corpus, "junk_jpeg_header.jpg"), SPEC)
    assert np.abs(got - expected).mean() < 1 / 255 / 0.26


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _weibo_texts(corpus) -> list[str]:
    folder = corpus / "weibo-rumor-2017"
    return [p.text for f in sorted(folder.glob("test_*.txt")) for p in parse_weibo_dump(f) if isinstance(p, WeiboPost)]


def test_tokenize_equals_cn_clip_on_real_weibo_posts(corpus):
    from cn_clip.clip import tokenize as cn_clip_tokenize

    texts = _weibo_texts(corpus)
    assert len(texts) > 1900
    for length in (52, 16):
        ours = tokenize(texts, length)
        assert ours.dtype == np.int64 and ours.shape == (len(texts), length)
        assert np.array_equal(ours, cn_clip_tokenize(texts, length).numpy()), length
    assert (tokenize(texts, 16)[:, -1] != 0).sum() > 100  # long posts were truncated, ending in [SEP]


def test_tokenize_edge_cases():
    from cn_clip.clip import tokenize as cn_clip_tokenize

    texts = ["", " ", "a", "😀" * 60, "ＡＢＣ全角，繁體字", "[哈哈]#话题#@用户"]
    assert np.array_equal(tokenize(texts, 52), cn_clip_tokenize(texts, 52).numpy())
    empty = tokenize([""], 8)[0]
    assert empty.tolist() == [101, 102, 0, 0, 0, 0, 0, 0]  # [CLS][SEP], padded with 0
    with pytest.raises(TypeError):
        tokenize("a string, not a list", 8)


def test_preprocess_batch_shapes_and_pass_through(corpus):
    batch = {
        "post_id": np.array(["a", "b"], dtype=object),
        "text": np.array(["今天在医院排队挂号", None], dtype=object),
        "image": np.array([_image(corpus, "hopper.jpg"), _image(corpus, "flower.webp")], dtype=object),
        "label": np.array(["hospital", "scenic"], dtype=object),
    }
    out = preprocess_batch(batch, SPEC)
    assert set(out) == {"input_ids", "pixel_values", "post_id", "label"}
    assert out["input_ids"].dtype == np.int64 and out["input_ids"].shape == (2, 52)
    assert out["pixel_values"].dtype == np.float32 and out["pixel_values"].shape == (2, 3, 64, 64)
    assert out["input_ids"][1, :3].tolist() == [101, 102, 0]  # None text reads as ""
    assert list(out["post_id"]) == ["a", "b"] and list(out["label"]) == ["hospital", "scenic"]


def test_preprocess_batch_errors_raise_or_are_recorded(corpus):
    batch = {
        "post_id": np.array(["good", "bad"], dtype=object),
        "text": np.array(["x", "y"], dtype=object),
        "image": np.array([_image(corpus, "hopper.jpg"), _image(corpus, "truncated_jpeg.jpg")], dtype=object),
    }
    with pytest.raises(ImageDecodeError) as info:
        preprocess_batch(batch, SPEC)
    assert info.value.post_id == "bad" and "post bad" in str(info.value) and info.value.code == "image_truncated"
    out = preprocess_batch(batch, SPEC, on_error="record")
    assert out["error"][0] == "" and out["error"][1].startswith("image_truncated: ")
    assert np.all(out["pixel_values"][1] == 0) and np.any(out["pixel_values"][0] != 0)
    with pytest.raises(ValueError, match="on_error"):
        preprocess_batch(batch, SPEC, on_error="ignore")


def test_decode_error_survives_pickling():
    error = pickle.loads(pickle.dumps(ImageDecodeError("image_empty", "no bytes", post_id="p1")))
    assert (error.code, error.post_id, str(error)) == ("image_empty", "p1", "post p1: no bytes")


def test_encode_labels():
    labels = ["home", "school", "gym"]
    assert encode_labels(np.array(["gym", "home"], dtype=object), labels).tolist() == [2, 0]
    with pytest.raises(ValueError, match="unknown label 'zoo'"):
        encode_labels(["home", "zoo"], labels)
    with pytest.raises(ValueError, match="missing label"):
        encode_labels([None], labels)


def test_constants_match_the_backbone_and_torch_stays_out():
    import subprocess
    import sys

    from sgmft.data import preprocess
    from sgmft.models import backbone

    assert (preprocess.CLIP_MEAN, preprocess.CLIP_STD, preprocess.PAD_TOKEN_ID) == \
        (backbone.CLIP_MEAN, backbone.CLIP_STD, backbone.PAD_TOKEN_ID)
    # Ray Data workers import this module: it must not drag torch in.
    code = "import sys, sgmft.ray_data, sgmft.data.preprocess; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_spec_from_config():
    from sgmft.config import Config

    cfg = Config()
    cfg.data.context_length = 40
    cfg.model.backbone.preset = "small"
    spec = PreprocessSpec.from_config(cfg)
    assert (spec.image_size, spec.context_length, spec.max_image_pixels) == (112, 40, cfg.data.max_image_pixels)
    with pytest.raises(ValueError, match="context_length"):
        PreprocessSpec(image_size=32, context_length=2)
