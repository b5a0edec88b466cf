"""The synthetic generator: deterministic, balanced, noisy as asked, fusion-worthy, and its
cases (two-object pictures picked by the text, misleading text) as configured and checkable."""

from __future__ import annotations

import colorsys
import hashlib
import io
import json
import re
from collections import Counter
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sgmft.data.labels import DEFAULT_LABELS
from sgmft.data.preprocess import PreprocessSpec, preprocess_batch
from sgmft.data.schema import DatasetError, split_files, validate_dataset
from sgmft.data import synth
from sgmft.data.synth import CASES, TEXT_BANKS, category_style, cue_words, synthesize


def _rows(root: Path) -> list[dict]:
    """Every row of the dataset, with the split it is in."""
    rows = []
    for split in ("train", "val", "test"):
        for path in split_files(root, split):
            rows += [{**row, "split": split} for row in pq.read_table(path).to_pylist()]
    return rows


@pytest.fixture(scope="module")
def synth_1000(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ds"
    synthesize(out, n=1000, seed=3, text_noise=0.3, image_noise=0.25, image_swap=0.15, image_size=48)
    return out


def test_two_runs_are_byte_identical(tmp_path):
    args = dict(n=150, seed=7, text_noise=0.3, image_noise=0.3, image_swap=0.1, image_size=40, rows_per_shard=50)
    synthesize(tmp_path / "a", **args)
    synthesize(tmp_path / "b", **args)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len([f for f in files_a if f.suffix == ".parquet"]) >= 3
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    synthesize(tmp_path / "c", **{**args, "seed": 8})
    assert (tmp_path / "c" / "train" / "part-00000.parquet").read_bytes() != (tmp_path / "a" / "train" / "part-00000.parquet").read_bytes()


def test_layout_counts_and_validation(synth_1000):
    validate_dataset(synth_1000)
    report = json.loads((synth_1000 / "report.json").read_text())
    assert json.loads((synth_1000 / "labels.json").read_text()) == DEFAULT_LABELS
    assert (synth_1000 / "quarantine.jsonl").read_text() == ""
    rows = _rows(synth_1000)
    assert len(rows) == 1000 and len({r["post_id"] for r in rows}) == 1000
    per_label = Counter(r["label"] for r in rows)
    assert set(per_label.values()) == {100}
    per_split = Counter((r["split"], r["label"]) for r in rows)
    for label in DEFAULT_LABELS:  # stratified 80/10/10
        assert (per_split["train", label], per_split["val", label], per_split["test", label]) == (80, 10, 10)
    assert report["splits"] == {"train": 800, "val": 100, "test": 100}
    assert report["counts"]["val"]["gym"] == 10
    assert set(report["image_formats"]) == {"JPEG", "PNG", "WEBP"}
    assert {Image.open(io.BytesIO(r["image"])).format for r in rows} == {"JPEG", "PNG", "WEBP"}


def test_noise_shares_follow_the_settings(synth_1000):
    rows = _rows(synth_1000)
    n = len(rows)
    no_cue = sum(not r["meta_text_cue"] for r in rows) / n
    kinds = Counter(r["meta_image_kind"] for r in rows)
    assert abs(no_cue - 0.3) < 0.05
    assert abs(kinds["neutral"] / n - 0.25) < 0.05 and abs(kinds["swap"] / n - 0.15) < 0.04
    for r in rows:
        if r["meta_image_kind"] == "cue":
            assert r["meta_image_label"] == r["label"]
        elif r["meta_image_kind"] == "swap":
            assert r["meta_image_label"] not in (None, r["label"])
        else:
            assert r["meta_image_label"] is None
    # No case shares asked: only the six cases of the independent draws, as before.
    assert {r["meta_case"] for r in rows} == {"both_cues", "text_only_cue", "image_only_cue", "no_cue",
                                              "text_cue_swapped_image", "swapped_image"}
    # Independent draws: text noise is as common among image-noise posts as overall.
    neutral = [r for r in rows if r["meta_image_kind"] == "neutral"]
    assert abs(sum(not r["meta_text_cue"] for r in neutral) / len(neutral) - no_cue) < 0.08


def test_texts_carry_cues_only_where_meant(synth_1000):
    banned = cue_words(DEFAULT_LABELS)
    rows = _rows(synth_1000)
    for r in rows:
        if r["meta_text_cue"]:
            assert any(place in r["text"] for place in TEXT_BANKS[r["label"]].places), r["text"]
            assert r["meta_text_label"] == r["label"]
        else:
            assert not any(word in r["text"] for word in banned), r["text"]
            assert r["meta_text_label"] is None
    assert any(r["text"] == "" for r in rows)  # image-only posts exist
    assert "http" not in "".join(r["text"] for r in rows)


def test_fusion_beats_each_modality_alone(synth_1000):
    """Simple per-modality classifiers: the best of text or image alone stays well below both."""
    rows = _rows(synth_1000)
    spec = PreprocessSpec(image_size=16)
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] != "train"]

    def pixels(batch):
        return preprocess_batch({"image": [r["image"] for r in batch], "text": [r["text"] for r in batch]},
                                spec)["pixel_values"].reshape(len(batch), -1)

    x_train, x_test = pixels(train), pixels(test)
    centroids = np.stack([x_train[[r["label"] == lab for r in train]].mean(0) for lab in DEFAULT_LABELS])
    image_pred = [DEFAULT_LABELS[i] for i in ((x_test[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)]

    def text_pred(text):
        hits = [lab for lab in DEFAULT_LABELS if any(p in text for p in TEXT_BANKS[lab].places)]
        return hits[0] if hits else None

    truth = [r["label"] for r in test]
    text_only = np.mean([text_pred(r["text"]) == y for r, y in zip(test, truth)])
    image_only = np.mean([p == y for p, y in zip(image_pred, truth)])
    both = np.mean([(text_pred(r["text"]) or p) == y for r, p, y in zip(test, image_pred, truth)])
    print(f"text only {text_only:.3f}, image only {image_only:.3f}, both {both:.3f}")
    assert image_only > 0.45 and text_only > 0.6
    assert both > max(text_only, image_only) + 0.1, (text_only, image_only, both)


# The digest of :func:`_canonical_rows` for DIGEST_ARGS; see test_a_small_set_has_a_pinned_digest.
# ROWS_SHA256 moved on purpose when the meta_case, meta_text_label, meta_image_other_label,
# meta_label_side and meta_text_ref columns were added (issue #14); without them the rows
# hash to the earlier 8178c068..., and IMAGES_SHA256 did not move: at case shares of 0 the
# generator draws exactly what it drew before.
DIGEST_ARGS = dict(n=40, seed=11, text_noise=0.5, image_noise=0.2, image_swap=0.1, image_size=32, rows_per_shard=16)
ROWS_SHA256 = "fc4872bb2a2496f0dd0b6c10e4d8e35ce7580b203ffc3d446371b242a6c4bdca"
IMAGES_SHA256 = "bb4b2aa1d94e5d8737aa70c51c496132d4d8391929a9e304bda6547da69c7616"
# The same with two-object and misleading-text posts, so their drawing is pinned too.
CASES_DIGEST_ARGS = dict(DIGEST_ARGS, two_object_share=0.25, misleading_share=0.15)
CASES_ROWS_SHA256 = "31794d11b19fe9a6b6e86a92ced1b409876088b4e3a7d6b8528b747cab86a66c"
CASES_IMAGES_SHA256 = "eedb3ab627d559277b924eef0f4a5dc95eb17318e59c21e1d61ce175d6765b3b"


def _canonical_rows(root: Path) -> tuple[str, str]:
    """sha256 of the rows without their images, and of the image bytes, in split/shard/row order.

    Row contents, not Parquet file bytes: the files also hold the pyarrow version that
    wrote them, so their bytes change with pyarrow while the dataset does not.
    """
    rows, images = hashlib.sha256(), hashlib.sha256()
    for row in _rows(root):
        image = row.pop("image")
        rows.update(json.dumps(row, ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n")
        images.update(hashlib.sha256(image).digest())
    return rows.hexdigest(), images.hexdigest()


def test_a_small_set_has_a_pinned_digest(tmp_path):
    """The same arguments give the same dataset on every machine and every clone.

    Two constants, so a failure says what moved: ROWS_SHA256 covers post_id, text, label,
    split and meta columns (numpy's seeded generators and the packaged chatter alone
    decide them); IMAGES_SHA256 covers the encoded image bytes, which also depend on the
    encoders Pillow bundles (libjpeg-turbo, libwebp, zlib): a Pillow upgrade that changes
    its encoders' output changes it, and then the constant is recomputed on purpose.
    """
    report = synthesize(tmp_path / "ds", **DIGEST_ARGS)
    assert report["noise_text"]["source"] == "sgmft.data/chatter_zh.txt"
    rows_sha, images_sha = _canonical_rows(tmp_path / "ds")
    assert rows_sha == ROWS_SHA256, "post ids, texts, labels, splits or meta changed"
    assert images_sha == IMAGES_SHA256, "image bytes changed (drawing, seeds or Pillow's encoders)"
    synthesize(tmp_path / "cases", **CASES_DIGEST_ARGS)
    rows_sha, images_sha = _canonical_rows(tmp_path / "cases")
    assert rows_sha == CASES_ROWS_SHA256, "rows of the two-object / misleading-text cases changed"
    assert images_sha == CASES_IMAGES_SHA256, "image bytes of the cases changed (drawing, seeds or Pillow's encoders)"


@pytest.fixture(scope="module")
def synth_cases(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cases") / "ds"
    synthesize(out, n=1000, seed=5, text_noise=0.3, image_noise=0.3, image_swap=0.1, image_size=48,
               two_object_share=0.3, misleading_share=0.2)
    return out


def test_cases_follow_the_configured_shares(synth_cases):
    rows = _rows(synth_cases)
    report = json.loads((synth_cases / "report.json").read_text())
    n = len(rows)
    cases = Counter(r["meta_case"] for r in rows)
    assert set(cases) == set(CASES)  # every case occurs
    assert report["cases"] == {case: cases[case] for case in CASES}
    per_split = {s: Counter(r["meta_case"] for r in rows if r["split"] == s) for s in ("train", "val", "test")}
    assert report["cases_per_split"] == {s: {case: c[case] for case in CASES} for s, c in per_split.items()}
    two = cases["two_objects_by_position"] + cases["two_objects_by_colour"]
    assert abs(two / n - 0.3) < 0.05 and abs(cases["misleading_text"] / n - 0.2) < 0.04
    assert abs(cases["two_objects_by_position"] / two - 0.5) < 0.08  # position or colour, half each
    assert report["realized_noise"]["two_objects"] == two / n and report["noise"]["misleading_share"] == 0.2
    # The noise shares apply to the other half of the posts.
    regular = [r for r in rows if r["meta_case"] in ("both_cues", "text_only_cue", "image_only_cue", "no_cue",
                                                         "text_cue_swapped_image", "swapped_image")]
    assert abs(sum(not r["meta_text_cue"] for r in regular) / len(regular) - 0.3) < 0.06
    assert abs(sum(r["meta_image_kind"] == "neutral" for r in regular) / len(regular) - 0.3) < 0.06


def test_case_texts_say_what_the_case_says(synth_cases):
    """Two-object texts name no place but a side or a shape colour; misleading texts name
    another category's place, never the label's."""
    banned = cue_words(DEFAULT_LABELS)
    refs = {"left": "左", "right": "右", "white": "白", "black": "黑"}
    for r in _rows(synth_cases):
        if r["meta_case"].startswith("two_objects"):
            assert not r["meta_text_cue"] and r["meta_text_label"] is None
            assert not any(word in r["text"] for word in banned), r["text"]
            assert refs[r["meta_text_ref"]] in r["text"] and not any(w in r["text"] for k, w in refs.items() if k != r["meta_text_ref"])
            by_position = r["meta_case"] == "two_objects_by_position"
            assert (r["meta_text_ref"] in ("left", "right")) == by_position
            if by_position:
                assert r["meta_text_ref"] == r["meta_label_side"]
            assert r["meta_image_kind"] == "two_objects" and r["meta_image_label"] == r["label"]
            assert r["meta_image_other_label"] not in (None, r["label"])
        elif r["meta_case"] == "misleading_text":
            other = r["meta_text_label"]
            assert other not in (None, r["label"]) and not r["meta_text_cue"]
            assert any(place in r["text"] for place in TEXT_BANKS[other].places), r["text"]
            assert not any(place in r["text"] for place in TEXT_BANKS[r["label"]].places), r["text"]
            assert r["meta_image_kind"] == "cue" and r["meta_image_label"] == r["label"]
        else:
            assert r["meta_image_other_label"] is None and r["meta_label_side"] is None and r["meta_text_ref"] is None


def _half_hue(pixels: np.ndarray) -> float:
    """Circular mean hue of a half's background (its coloured pixels; the shapes are white or black)."""
    hsv = np.array([colorsys.rgb_to_hsv(*(p / 255.0)) for p in pixels.reshape(-1, 3)])
    coloured = hsv[(hsv[:, 1] > 0.3) & (hsv[:, 2] > 0.25)]
    angle = 2 * np.pi * coloured[:, 0]
    return float(np.arctan2(np.sin(angle).mean(), np.cos(angle).mean()) / (2 * np.pi)) % 1.0


def _hue_distance(a: float, b: float) -> float:
    return min(abs(a - b), 1 - abs(a - b))


def _black_pixels(pixels: np.ndarray) -> int:
    """Near-black pixels of a half: only a black shape has them (backgrounds are lighter)."""
    return int((pixels.max(-1) < 60).sum())


def test_two_object_images_hold_two_categories_where_the_text_says(synth_cases):
    """Each half has its category's hue (hues are 0.1 apart with 10 labels), the label's on
    ``meta_label_side``, the other category's on the other side; one shape is white and the
    other black, and the label's is the colour a colour-referring text names."""
    hues = {label: category_style(i, len(DEFAULT_LABELS)).hue for i, label in enumerate(DEFAULT_LABELS)}
    checked, errors = Counter(), []
    for r in _rows(synth_cases):
        if r["meta_image_kind"] != "two_objects":
            continue
        pixels = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"))
        assert pixels.shape[1] > pixels.shape[0]  # side by side: wider than tall
        half = pixels.shape[1] // 2
        left, right = pixels[:, :half], pixels[:, half:]
        sides = {"left": left, "right": right}
        label_half = sides[r["meta_label_side"]]
        other_half = sides["right" if r["meta_label_side"] == "left" else "left"]
        label_hue, other_hue = _half_hue(label_half), _half_hue(other_half)
        want, other = hues[r["label"]], hues[r["meta_image_other_label"]]
        # each half near its category's hue (drawn with the jitter single pictures have), and
        # the two pictures where the metadata puts them rather than the other way round
        assert _hue_distance(label_hue, want) < 0.08 and _hue_distance(other_hue, other) < 0.08, r["post_id"]
        assert (_hue_distance(label_hue, want) + _hue_distance(other_hue, other)
                < _hue_distance(label_hue, other) + _hue_distance(other_hue, want)), r["post_id"]
        errors += [_hue_distance(label_hue, want), _hue_distance(other_hue, other)]
        label_black, other_black = _black_pixels(label_half), _black_pixels(other_half)
        assert max(label_black, other_black) >= 4 and min(label_black, other_black) <= max(label_black, other_black) / 4
        label_shade = "black" if label_black > other_black else "white"
        if r["meta_case"] == "two_objects_by_colour":
            assert r["meta_text_ref"] == label_shade, (r["post_id"], r["meta_text_ref"], label_shade)
        checked[r["meta_case"]] += 1
    assert checked["two_objects_by_position"] > 100 and checked["two_objects_by_colour"] > 100
    assert np.median(errors) < 0.02  # jitter, texture and JPEG move a half's hue a little


def test_chatter_ships_with_the_package_and_names_no_place():
    text = resources.files("sgmft.data").joinpath("chatter_zh.txt").read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    assert 150 <= len(lines) <= 300 and len(set(lines)) == len(lines)
    # Cue words of every curated category, and the fallback bank of uncurated labels.
    banned = set(cue_words(DEFAULT_LABELS)) | set(synth._bank("some-label").activities)
    for line in lines:
        assert not [w for w in banned if w in line], line
        assert "http" not in line and len(line) <= 140, line
    sentences, source = synth.chatter_sentences(DEFAULT_LABELS)
    assert sentences == lines and source == "sgmft.data/chatter_zh.txt"
    # A label whose name is an everyday word drops the chatter that says it.
    custom, _ = synth.chatter_sentences(["天气", "home"])
    assert custom and not any("天气" in s for s in custom) and len(custom) < len(lines)


def test_product_code_reads_nothing_beside_the_repository():
    """No module of sgmft/, serve_app/ or jobs/ builds a path into ../shared (absent on a clone)."""
    repo = Path(__file__).resolve().parents[1]
    quoted = re.compile(r"""["']shared["']|\.\./shared|SGMFT_CORPUS""")
    offenders = [f"{path.relative_to(repo)}:{i}" for folder in ("sgmft", "serve_app", "jobs")
                 for path in sorted((repo / folder).rglob("*.py"))
                 for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if quoted.search(line)]
    assert offenders == []


def test_custom_labels_and_bad_arguments(tmp_path):
    report = synthesize(tmp_path / "ds", n=30, seed=0, text_noise=0.0, image_noise=0.0, image_swap=0.0,
                        image_size=32, labels=["cafe", "library", "beach"])
    assert report["labels"] == ["cafe", "library", "beach"]
    rows = _rows(tmp_path / "ds")
    assert all(r["label"] in r["text"] for r in rows)  # uncurated labels still get cue text
    with pytest.raises(DatasetError, match="image_noise \\+ image_swap"):
        synthesize(tmp_path / "x", n=10, seed=0, text_noise=0.1, image_noise=0.8, image_swap=0.3)
    with pytest.raises(DatasetError, match="two_object_share \\+ misleading_share"):
        synthesize(tmp_path / "x", n=10, seed=0, two_object_share=0.7, misleading_share=0.4)
    with pytest.raises(DatasetError, match="two_object_share needs at least two labels"):
        synthesize(tmp_path / "x", n=10, seed=0, image_swap=0.0, two_object_share=0.1, labels=["cafe"])
    with pytest.raises(DatasetError, match="already holds a dataset"):
        synthesize(tmp_path / "ds", n=30, seed=0, text_noise=0.0, image_noise=0.0, image_swap=0.0)
