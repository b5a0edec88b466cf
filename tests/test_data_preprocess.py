"""THE preprocessing function on real inputs and on inputs the tests make themselves.

Every property is checked on images generated in memory (tests/hostile_images.py), so a
fresh clone covers it; the same checks also run on the workshop corpus (Pillow's test
images and real Weibo posts) where it exists next to the repository, and skip otherwise.
"""

from __future__ import annotations

import csv
import functools
import io
import pickle
import random
from dataclasses import dataclass
from pathlib import Path

import hostile_images as hi
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


@pytest.fixture(scope="module")
def corpus() -> Path:
    """The workshop corpus, or a skip (``$SGMFT_TEST_CORPUS`` can point elsewhere)."""
    return hi.require_corpus()


@dataclass(frozen=True)
class Inputs:
    """One source's images by role: generated in memory, or files of the workshop corpus."""

    source: str
    jpeg: bytes
    png: bytes
    webp: bytes
    large_jpeg: bytes  # big enough that JPEG decoding takes the reduced-scale (draft) path
    fuzz_originals: tuple[bytes, ...]
    truncated_jpeg: bytes
    truncated_png: bytes
    undecodable: bytes
    bomb: bytes  # a header declaring billions of pixels
    orientation_6: bytes  # the same picture as ``jpeg``, stored rotated, EXIF orientation 6
    orientation_3_webp: bytes  # the same again as WebP, upside down, EXIF orientation 3
    orientation_rectangle: bytes  # 2x1 stored, 1x2 upright
    bad_exif: bytes
    bad_exif_size: tuple[int, int]
    transparent: tuple[bytes, ...]  # pixel (0, 0) fully transparent
    animated: bytes
    animated_later_frame: int
    cmyk: bytes
    cmyk_reference: bytes  # the same picture as RGB


@functools.lru_cache(maxsize=1)
def generated_inputs() -> Inputs:
    return Inputs(
        source="generated", jpeg=hi.good_jpeg(), png=hi.good_png(), webp=hi.good_webp(),
        large_jpeg=hi.encode(hi.photo((1024, 768)), "JPEG", quality=90),
        fuzz_originals=(hi.good_jpeg(), hi.good_png(), hi.good_webp(), hi.animated_gif(), *hi.good_photos(3)),
        truncated_jpeg=hi.truncated_jpeg(), truncated_png=hi.truncated_png(), undecodable=hi.not_an_image_random(),
        bomb=hi.decompression_bomb_gif(), orientation_6=hi.exif_orientation_jpeg(6),
        orientation_3_webp=hi.exif_orientation_webp(3), orientation_rectangle=hi.orientation_rectangle_jpeg(),
        bad_exif=hi.broken_exif_jpeg(), bad_exif_size=hi.PHOTO_SIZE,
        transparent=(hi.palette_png_with_transparency(), hi.rgba_png(), hi.rgba_webp()),
        animated=hi.animated_gif(), animated_later_frame=1, cmyk=hi.cmyk_jpeg(), cmyk_reference=hi.good_jpeg(),
    )


def corpus_inputs(corpus: Path) -> Inputs:
    def read(name: str) -> bytes:
        return (corpus / "images" / name).read_bytes()

    return Inputs(
        source="corpus", jpeg=read("hopper.jpg"), png=read("hopper.png"), webp=read("flower.webp"),
        large_jpeg=read("junk_jpeg_header.jpg"),
        fuzz_originals=tuple(read(n) for n in ("hopper.jpg", "hopper.png", "hopper.webp", "hopper.gif", "flower.jpg")),
        truncated_jpeg=read("truncated_jpeg.jpg"), truncated_png=read("truncated_image.png"),
        undecodable=read("broken.png"), bomb=read("decompression_bomb.gif"),
        orientation_6=read("hopper_orientation_6.jpg"), orientation_3_webp=read("hopper_orientation_3.webp"),
        orientation_rectangle=read("orientation_rectangle.jpg"), bad_exif=read("hopper_bad_exif.jpg"),
        bad_exif_size=(500, 500), transparent=(read("transparent.png"), read("transparent.webp")),
        animated=read("chi.gif"), animated_later_frame=5, cmyk=read("pil_sample_cmyk.jpg"),
        cmyk_reference=read("pil_sample_rgb.jpg"),
    )


@pytest.fixture(params=["generated", "corpus"], scope="module")
def inputs(request) -> Inputs:
    if request.param == "generated":
        return generated_inputs()
    return corpus_inputs(hi.require_corpus())


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


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sample", [pytest.param(x, id=x.name) for x in hi.CATALOG])
def test_every_generated_image_is_decoded_or_refused_as_expected(sample):
    try:
        pixels = decode_image(sample.data(), SPEC)
        outcome = "ok"
        assert pixels.shape == (3, 64, 64) and pixels.dtype == np.float32
        assert np.isfinite(pixels).all()
    except ImageDecodeError as exc:
        outcome = "reject"
        assert exc.code.startswith("image_") and str(exc)
        assert exc.code == (sample.code or exc.code), (sample.what, exc.code, str(exc))
    assert outcome == sample.expect, sample.what


@pytest.mark.parametrize("role, code", [
    ("truncated_jpeg", "image_truncated"),
    ("truncated_png", "image_truncated"),
    ("undecodable", "image_undecodable"),
    ("bomb", "image_too_large"),
])
def test_refusals_carry_a_reason_code(inputs, role, code):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(getattr(inputs, role), SPEC)
    assert info.value.code == code


@pytest.mark.parametrize("bomb", [hi.decompression_bomb_gif, hi.decompression_bomb_png], ids=["gif", "png"])
def test_generated_bombs_are_refused_from_the_header(bomb, monkeypatch):
    data = bomb()
    assert len(data) < 100  # a few dozen bytes declaring billions of pixels
    with pytest.raises(ImageDecodeError) as info:
        load_image(data, SPEC.max_image_pixels)
    assert info.value.code == "image_too_large" and "before decoding" in str(info.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # our own check alone
    with pytest.raises(ImageDecodeError) as info:
        load_image(data, SPEC.max_image_pixels)
    assert info.value.code == "image_too_large" and "before decoding" in str(info.value)
    # Between our limit (40 M) and Pillow's: only the header check of load_image refuses it.
    monkeypatch.undo()
    with pytest.raises(ImageDecodeError, match="49000000 pixels exceeds the limit of 40000000") as info:
        load_image(hi.over_limit_png(), SPEC.max_image_pixels)
    assert info.value.code == "image_too_large"


def test_pixel_limit_is_checked_from_the_header_before_decoding(inputs, monkeypatch):
    # Without Pillow's own guard, our header check alone must refuse the bomb.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(inputs.bomb, SPEC)
    assert info.value.code == "image_too_large" and "before decoding" in str(info.value)
    small_limit = PreprocessSpec(image_size=64, max_image_pixels=100 * 100)
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        decode_image(inputs.jpeg, small_limit)  # 120x90 generated, 128x128 in the corpus


@pytest.mark.parametrize("data", [b"", None])
def test_no_bytes_is_image_empty(data):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, SPEC)
    assert info.value.code == "image_empty"


@pytest.mark.timeout(60)
def test_corrupted_files_never_raise_anything_but_image_decode_error(inputs):
    rng = random.Random(0)
    for original in inputs.fuzz_originals:
        for _ in range(20):
            data = bytearray(original[: rng.randrange(1, len(original))] if rng.random() < 0.5 else original)
            for _ in range(rng.randrange(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            try:
                decode_image(bytes(data), SPEC)
            except ImageDecodeError:
                pass


def test_exif_orientation_is_applied(inputs):
    upright = decode_image(inputs.jpeg, SPEC)
    rotated_file = decode_image(inputs.orientation_6, SPEC)
    raw = Image.open(io.BytesIO(inputs.orientation_6)).convert("RGB").resize((64, 64), Image.Resampling.BICUBIC)
    raw = decode_image(_png(raw), SPEC)  # the same pixels with the orientation ignored
    assert np.abs(rotated_file - upright).mean() < 0.25 * np.abs(raw - upright).mean()
    webp = decode_image(inputs.orientation_3_webp, SPEC)
    assert np.abs(webp - upright).mean() < 0.15
    # A 2x1 JPEG whose EXIF says "rotate": upright it is 1 wide, 2 high.
    assert Image.open(io.BytesIO(inputs.orientation_rectangle)).size == (2, 1)
    assert load_image(inputs.orientation_rectangle, 10**6).size == (1, 2)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_broken_exif_falls_back_to_the_unrotated_image(inputs):
    image = load_image(inputs.bad_exif, 10**7)
    assert image.mode == "RGB" and image.size == inputs.bad_exif_size


def test_alpha_is_flattened_on_white(inputs):
    for data in inputs.transparent:
        assert Image.open(io.BytesIO(data)).convert("RGBA").getpixel((0, 0))[3] == 0
        rgb = denormalize(decode_image(data, SPEC), SPEC)
        assert np.all(rgb[0, 0] > 250), rgb[0, 0]


def test_animation_gives_its_first_frame(inputs):
    frames = Image.open(io.BytesIO(inputs.animated))
    first = frames.convert("RGBA")
    frames.seek(inputs.animated_later_frame)
    later = frames.convert("RGBA")
    decoded = decode_image(inputs.animated, SPEC)
    assert np.abs(decoded - decode_image(_png(first), SPEC)).max() < 1e-5
    assert np.abs(decoded - decode_image(_png(later), SPEC)).mean() > 0.01


def test_modes_are_converted_sensibly(inputs):
    cmyk = decode_image(inputs.cmyk, SPEC)
    rgb = decode_image(inputs.cmyk_reference, SPEC)
    assert Image.open(io.BytesIO(inputs.cmyk)).mode == "CMYK"
    assert np.abs(cmyk - rgb).mean() < 0.2
    gray16 = hi.gray16_image(30000)
    assert gray16.mode == "I;16"
    value = denormalize(decode_image(_png(gray16), SPEC), SPEC)[4, 4]
    assert np.allclose(value, 30000 / 257, atol=1.5), value  # scaled, not clipped to white


def test_matches_chinese_clip_image_transform(inputs):
    from cn_clip.clip import image_transform

    for data in (inputs.png, inputs.jpeg, inputs.webp):
        expected = image_transform(64)(Image.open(io.BytesIO(data))).numpy()
        assert np.allclose(decode_image(data, SPEC), expected, atol=1e-5)
    # Large JPEGs decode at a reduced DCT scale first: not bit-equal, but within a grey level.
    expected = image_transform(64)(Image.open(io.BytesIO(inputs.large_jpeg))).numpy()
    got = decode_image(inputs.large_jpeg, SPEC)
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


def _generated_weibo_texts() -> list[str]:
    """Weibo-like posts of every kind the synthetic generator writes, plus long ones."""
    from sgmft.data.labels import DEFAULT_LABELS
    from sgmft.data.synth import chatter_sentences, cue_text

    chatter, _ = chatter_sentences(DEFAULT_LABELS)
    rng = np.random.default_rng(0)
    cues = [cue_text(rng, DEFAULT_LABELS[i % len(DEFAULT_LABELS)]) for i in range(300)]
    long_posts = ["，".join(chatter[i:i + 4]) + " #话题# @某人 http://t.cn/abc ＡＢＣ全角 繁體字 😀" for i in range(0, 200)]
    return chatter + cues + long_posts


def test_tokenize_equals_cn_clip_on_generated_weibo_posts():
    from cn_clip.clip import tokenize as cn_clip_tokenize

    texts = _generated_weibo_texts()
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


def test_preprocess_batch_shapes_and_pass_through(inputs):
    batch = {
        "post_id": np.array(["a", "b"], dtype=object),
        "text": np.array(["今天在医院排队挂号", None], dtype=object),
        "image": np.array([inputs.jpeg, inputs.webp], dtype=object),
        "label": np.array(["hospital", "scenic"], dtype=object),
    }
    out = preprocess_batch(batch, SPEC)
    assert set(out) == {"input_ids", "pixel_values", "post_id", "label"}
    assert out["input_ids"].dtype == np.int64 and out["input_ids"].shape == (2, 52)
    assert out["pixel_values"].dtype == np.uint8 and out["pixel_values"].shape == (2, 3, 64, 64)  # normalised on the device
    assert out["input_ids"][1, :3].tolist() == [101, 102, 0]  # None text reads as ""
    assert list(out["post_id"]) == ["a", "b"] and list(out["label"]) == ["hospital", "scenic"]


def test_preprocess_batch_errors_raise_or_are_recorded(inputs):
    batch = {
        "post_id": np.array(["good", "bad"], dtype=object),
        "text": np.array(["x", "y"], dtype=object),
        "image": np.array([inputs.jpeg, inputs.truncated_jpeg], dtype=object),
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
