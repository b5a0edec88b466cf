"""The synthetic generator: deterministic, balanced, noisy as asked, and fusion-worthy."""

from __future__ import annotations

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
from sgmft.data.synth import TEXT_BANKS, cue_words, synthesize


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
    # Independent draws: text noise is as common among image-noise posts as overall.
    neutral = [r for r in rows if r["meta_image_kind"] == "neutral"]
    assert abs(sum(not r["meta_text_cue"] for r in neutral) / len(neutral) - no_cue) < 0.08


def test_texts_carry_cues_only_where_meant(synth_1000):
    banned = cue_words(DEFAULT_LABELS)
    rows = _rows(synth_1000)
    for r in rows:
        if r["meta_text_cue"]:
            assert any(place in r["text"] for place in TEXT_BANKS[r["label"]].places), r["text"]
        else:
            assert not any(word in r["text"] for word in banned), r["text"]
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
DIGEST_ARGS = dict(n=40, seed=11, text_noise=0.5, image_noise=0.2, image_swap=0.1, image_size=32, rows_per_shard=16)
ROWS_SHA256 = "8178c0681290888580fa7f5f0a8cf42af1dbdb6d93c6ca0d60cb583c3724ba98"
IMAGES_SHA256 = "bb4b2aa1d94e5d8737aa70c51c496132d4d8391929a9e304bda6547da69c7616"


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
    with pytest.raises(DatasetError, match="already holds a dataset"):
        synthesize(tmp_path / "ds", n=30, seed=0, text_noise=0.0, image_noise=0.0, image_swap=0.0)
