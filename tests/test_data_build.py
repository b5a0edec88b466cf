"""The dataset builder: manifests and Weibo dumps, quarantine with reasons, reproducible shards.

Hostile images and Weibo dumps are generated here (tests/hostile_images.py and
:func:`_weibo_lines`); the same checks also run on the workshop corpus where it exists.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import hostile_images as hi
import numpy as np
import pyarrow.parquet as pq
import pytest

from sgmft.data.build import build_dataset, load_label_source
from sgmft.data.schema import DatasetError, read_quarantine, split_files, validate_dataset
from sgmft.data.synth import category_style, chatter_sentences, draw_category_image
from sgmft.data.weibo import BadWeiboRecord, WeiboPost, image_name, parse_weibo_dump

LABELS = ["school", "hospital", "gym"]


def _write_image(path: Path, label_index: int, seed: int) -> None:
    image = draw_category_image(np.random.default_rng(seed), category_style(label_index, len(LABELS)), 48)
    image.save(path, "JPEG" if path.suffix == ".jpg" else "PNG")


def _rows_of(root: Path) -> list[dict]:
    return [r for split in ("train", "val", "test") for f in split_files(root, split) for r in pq.read_table(f).to_pylist()]


@pytest.fixture(scope="module")
def corpus() -> Path:
    """The workshop corpus, or a skip (``$SGMFT_TEST_CORPUS`` can point elsewhere)."""
    return hi.require_corpus()


@pytest.fixture
def manifest_dir(tmp_path: Path) -> Path:
    """A manifest of 30 good rows and one of each kind of bad row."""
    folder = tmp_path / "raw"
    (folder / "img").mkdir(parents=True)
    rows = []
    for i in range(30):
        label = LABELS[i % 3]
        name = f"img/{i:03d}.{'jpg' if i % 2 else 'png'}"
        _write_image(folder / name, i % 3, i)
        rows.append({"post_id": f"p{i:03d}", "text": f"第{i}条 在{label}", "image": name, "label": label})
    _write_image(folder / "img" / "abs.png", 0, 99)
    (folder / "img" / "junk.jpg").write_bytes(b"this is not an image at all")
    (folder / "img" / "cut.jpg").write_bytes(hi.truncated_jpeg())
    rows += [
        {"post_id": "abs", "text": "absolute path", "image": str(folder / "img" / "abs.png"), "label": "school", "meta_city": "成都"},
        {"post_id": "gone", "text": "文件不见了", "image": "img/missing.jpg", "label": "gym"},
        {"post_id": "junk", "text": "坏图", "image": "img/junk.jpg", "label": "gym"},
        {"post_id": "cut", "text": "截断", "image": "img/cut.jpg", "label": "gym"},
        {"post_id": "zoo", "text": "动物园", "image": "img/000.png", "label": "zoo"},
        {"post_id": "p001", "text": "duplicate id", "image": "img/002.png", "label": "school"},
        {"post_id": "empty", "text": "", "label": "school"},
        {"post_id": "nolabel", "text": "没有标签", "image": "img/003.jpg"},
        {"post_id": "textonly", "text": "只有文字", "label": "school"},
        {"post_id": "badsplit", "text": "x", "image": "img/004.png", "label": "gym", "split": "holdout"},
        {"text": "no id: one is made up", "image": "img/005.jpg", "label": "hospital", "user": "someone"},
    ]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines.insert(5, "{not json")
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


EXPECTED_REASONS = {
    "image_missing": 2, "image_undecodable": 1, "image_truncated": 1, "label_unknown": 1,
    "post_id_duplicate": 1, "empty_post": 1, "label_missing": 1, "split_invalid": 1, "bad_record": 1,
}


def test_manifest_quarantine_reasons_and_counts(manifest_dir, tmp_path):
    out = tmp_path / "ds"
    report = build_dataset(manifest_dir / "manifest.jsonl", out, labels=LABELS, seed=1)
    assert report["read"] == 42 and report["kept"] == 32 and report["quarantined"] == 10
    assert report["read"] == report["kept"] + report["quarantined"]
    assert report["quarantine_reasons"] == EXPECTED_REASONS
    assert report["ignored_fields"] == {"user": 1}
    quarantine = read_quarantine(out)
    assert len(quarantine) == 10 and all({"source", "post_id", "reason", "detail"} <= set(q) for q in quarantine)
    by_id = {q["post_id"]: q for q in quarantine}
    assert by_id["gone"]["reason"] == "image_missing" and "missing.jpg" in by_id["gone"]["detail"]
    assert by_id["junk"]["reason"] == "image_undecodable"
    assert by_id["zoo"]["reason"] == "label_unknown" and "'zoo'" in by_id["zoo"]["detail"]
    assert by_id["p001"]["reason"] == "post_id_duplicate" and "manifest.jsonl:2" in by_id["p001"]["detail"]
    assert by_id[None]["reason"] == "bad_record" and by_id[None]["source"].endswith("manifest.jsonl:6")
    validate_dataset(out)
    assert json.loads((out / "labels.json").read_text()) == LABELS
    rows = _rows_of(out)
    assert len(rows) == 32 == sum(report["splits"].values())
    assert Counter(r["label"] for r in rows) == {"school": 11, "hospital": 11, "gym": 10}
    made_up = [r for r in rows if r["text"].startswith("no id")]
    assert made_up[0]["post_id"] == "manifest-000042"
    assert {r["meta_city"] for r in rows} == {None, "成都"}


def test_rebuild_is_byte_identical_and_labels_default_to_sorted(manifest_dir, tmp_path):
    report = build_dataset(manifest_dir / "manifest.jsonl", tmp_path / "a", seed=5)
    build_dataset(manifest_dir / "manifest.jsonl", tmp_path / "b", seed=5)
    assert report["labels"] == ["gym", "hospital", "school", "zoo"]  # no label set given: sorted, zoo kept
    for split in ("train", "val", "test"):
        files_a, files_b = split_files(tmp_path / "a", split), split_files(tmp_path / "b", split)
        assert [Path(f).name for f in files_a] == [Path(f).name for f in files_b]
        for fa, fb in zip(files_a, files_b):
            assert Path(fa).read_bytes() == Path(fb).read_bytes()
    assert (tmp_path / "a" / "quarantine.jsonl").read_bytes() == (tmp_path / "b" / "quarantine.jsonl").read_bytes()
    with pytest.raises(DatasetError, match="already holds a dataset"):
        build_dataset(manifest_dir / "manifest.jsonl", tmp_path / "a", seed=5)
    build_dataset(manifest_dir / "manifest.jsonl", tmp_path / "a", seed=5, overwrite=True, rows_per_shard=4)
    assert len(split_files(tmp_path / "a", "train")) > 1
    validate_dataset(tmp_path / "a")


def test_csv_manifest_with_given_splits(manifest_dir, tmp_path):
    path = manifest_dir / "manifest.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["post_id", "text", "image", "label", "split"])
        writer.writeheader()
        for i in range(12):
            writer.writerow({"post_id": f"c{i}", "text": "多行\n文本" if i == 0 else f"t{i}",
                             "image": f"img/{i:03d}.{'jpg' if i % 2 else 'png'}", "label": LABELS[i % 3],
                             "split": ["train", "val", "test", ""][i % 4]})
    report = build_dataset(path, tmp_path / "ds", labels=LABELS)
    assert report["kept"] == 12 and report["quarantined"] == 0
    rows = {r["post_id"]: r for r in _rows_of(tmp_path / "ds")}
    assert rows["c0"]["text"] == "多行\n文本"
    assert pq.read_table(split_files(tmp_path / "ds", "val")[0]).column("post_id").to_pylist() == ["c1", "c5", "c9"]


def test_validate_dataset_names_the_problem(manifest_dir, tmp_path):
    out = tmp_path / "ds"
    build_dataset(manifest_dir / "manifest.jsonl", out, labels=LABELS)
    (out / "labels.json").write_text(json.dumps(["school", "gym"]))
    with pytest.raises(DatasetError, match="not in labels.json"):
        validate_dataset(out)
    (out / "labels.json").unlink()
    with pytest.raises(DatasetError, match="no labels.json"):
        validate_dataset(out)
    (out / "labels.json").write_text(json.dumps(LABELS))
    shutil.copy(split_files(out, "train")[0], out / "val" / "part-00009.parquet")
    with pytest.raises(DatasetError, match="duplicate post_id"):
        validate_dataset(out)
    with pytest.raises(DatasetError, match="split 'test'"):
        split_files(tmp_path / "nowhere", "test")


def _hostile_manifest(folder: Path, samples: list[tuple[str, bytes, str, str | None]]) -> Path:
    """A manifest with one post per (name, bytes, expect, code), images written under ``folder``."""
    (folder / "img").mkdir(parents=True)
    lines = []
    for i, (name, data, _, _) in enumerate(samples):
        (folder / "img" / name).write_bytes(data)
        lines.append(json.dumps({"post_id": name, "text": f"第{i}条", "image": f"img/{name}", "label": LABELS[i % 3]},
                                ensure_ascii=False))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "manifest.jsonl"


@pytest.mark.parametrize("source", ["generated", "corpus"])
def test_every_hostile_image_is_kept_or_quarantined_with_its_reason(source, tmp_path):
    if source == "generated":
        samples = [(x.name, x.data(), x.expect, x.code) for x in hi.CATALOG]
    else:
        images = hi.require_corpus() / "images"
        with open(images / "MANIFEST.tsv", encoding="utf-8") as fh:
            rows = [r for r in csv.DictReader(fh, delimiter="\t") if r["expect"] != "either"]
        codes = {"decompression_bomb.gif": "image_too_large", "truncated_jpeg.jpg": "image_truncated",
                 "truncated_image.png": "image_truncated", "broken.png": "image_undecodable"}
        samples = [(r["file"], (images / r["file"]).read_bytes(), r["expect"], codes.get(r["file"])) for r in rows]
    report = build_dataset(_hostile_manifest(tmp_path / "raw", samples), tmp_path / "ds", labels=LABELS, seed=0)
    quarantined = {q["post_id"]: q for q in read_quarantine(tmp_path / "ds")}
    kept = {r["post_id"] for r in _rows_of(tmp_path / "ds")}
    for name, _, expect, code in samples:
        if expect == "ok":
            assert name in kept, quarantined.get(name)
        else:
            assert name in quarantined, name
            reason = quarantined[name]["reason"]
            assert reason.startswith("image_") and reason == (code or reason), (name, quarantined[name])
    assert report["read"] == len(samples) == len(kept) + len(quarantined)
    validate_dataset(tmp_path / "ds")


def _weibo_lines(n: int, start_id: int = 3900000000000000) -> list[str]:
    """A Weibo dump of ``n`` posts in the format of Jin et al. (2017), as the corpus has them:
    meta line (15 fields), image URLs ending in null (none for every fourth post), text
    (with links, entities and link labels to clean; empty for every tenth post)."""
    chatter, _ = chatter_sentences(LABELS)
    lines = []
    for i in range(n):
        post_id = start_id + i * 7919
        lines.append(f"{post_id}|null|null|null|{1447078683000 + i * 60_000}|true|{i}|{i % 5}|{i * 3}|null|0|null|null|null|微博 weibo.com")
        lines.append("null" if i % 4 == 0 else
                     f"http://ww1.sinaimg.cn/large/a{i:04d}x.jpg|http://ww3.sinaimg.cn/large/b{i:04d}y.jpg|null")
        text = "" if i % 10 == 9 else chatter[i % len(chatter)]
        if i % 3 == 0 and text:
            text += f" http://t.cn/R{i:04d}zz O网页链接 &amp; 更多"
        lines.append(text)
    return lines


def _images_and_labels(posts: list[WeiboPost], tmp_path: Path) -> tuple[list[WeiboPost], Path]:
    """Images on disk for the first 40 posts that list one, and labels for 30 of them plus 5
    posts without an image: the build keeps 30, quarantines 10 as label_missing."""
    images = tmp_path / "images" / "nonrumor_images"
    images.mkdir(parents=True)
    with_images = [p for p in posts if p.image_urls][:40]
    for i, post in enumerate(with_images):
        # The second listed image is the one on disk: the builder must look past the first.
        _write_image(images / image_name(post.image_urls[-1]), i % 3, i)
    labelled = with_images[:30] + [p for p in posts if p.image_urls][100:105]
    label_file = tmp_path / "labels.csv"
    with open(label_file, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["post_id", "label"])
        writer.writerows([p.post_id, LABELS[i % 3]] for i, p in enumerate(labelled))
    return with_images, label_file


def _build_and_check_weibo(dumps: list[Path], posts: list[WeiboPost], tmp_path: Path) -> list[dict]:
    """Build the dumps with images and labels for some posts; every row is kept or
    quarantined for its reason, and the kept rows are clean. Returns the kept rows."""
    with_images, label_file = _images_and_labels(posts, tmp_path)
    report = build_dataset(dumps, tmp_path / "ds", "weibo", image_root=tmp_path / "images",
                           label_source=label_file, labels=LABELS, seed=0)
    assert report["read"] == len(posts) and report["kept"] == 30
    assert report["read"] == report["kept"] + report["quarantined"]
    reasons = report["quarantine_reasons"]
    assert reasons["label_missing"] == 10  # images present, no label
    assert reasons["image_missing"] + reasons.get("empty_post", 0) == len(posts) - 40
    validate_dataset(tmp_path / "ds")
    rows = _rows_of(tmp_path / "ds")
    assert {r["post_id"] for r in rows} == {p.post_id for p in with_images[:30]}
    assert all("http" not in r["text"] for r in rows)
    assert all(r["meta_image"].startswith("nonrumor_images/") and r["meta_publish_time"] > 10**12 for r in rows)
    return rows


def test_weibo_dump_build_on_a_generated_dump(tmp_path):
    dump = tmp_path / "test_nonrumor.txt"
    dump.write_text("\n".join(_weibo_lines(200)) + "\n", encoding="utf-8-sig")  # with a BOM, as the corpus
    posts = list(parse_weibo_dump(dump))
    assert all(isinstance(p, WeiboPost) for p in posts) and len(posts) == 200
    assert posts[0].publish_time_ms == 1447078683000 and posts[1].image_urls[-1].endswith("b0001y.jpg")
    rows = _build_and_check_weibo([dump], posts, tmp_path)
    assert all("网页链接" not in r["text"] and "&amp;" not in r["text"] for r in rows)
    assert any("& 更多" in r["text"] for r in rows)  # entities unescaped, not dropped
    assert all(r["meta_image"].startswith("nonrumor_images/") and r["meta_publish_time"] > 10**12 for r in rows)


def _check_resync(good: list[str], tmp_path: Path) -> None:
    """Garbage before two good records, and a meta line directly followed by another: the
    parser reports each bad stretch and picks the records up again."""
    path = tmp_path / "dump.txt"
    path.write_text("\n".join(["garbage line", "more garbage", *good[:3], good[3], *good[3:6]]), encoding="utf-8")
    parsed = list(parse_weibo_dump(path))
    assert isinstance(parsed[0], BadWeiboRecord) and parsed[0].line == 1
    assert isinstance(parsed[1], WeiboPost) and parsed[1].line == 3
    assert isinstance(parsed[2], BadWeiboRecord)  # a meta line directly followed by another
    assert isinstance(parsed[3], WeiboPost) and parsed[3].post_id == good[3].split("|")[0]


def test_weibo_parser_resynchronises_after_garbage_in_a_generated_dump(tmp_path):
    good = _weibo_lines(2)
    _check_resync(good, tmp_path)


def _weibo_files(corpus: Path) -> list[Path]:
    return sorted((corpus / "weibo-rumor-2017").glob("test_*.txt"))


def test_weibo_dump_build_on_the_real_corpus(corpus, tmp_path):
    posts = [p for f in _weibo_files(corpus) for p in parse_weibo_dump(f)]
    assert all(isinstance(p, WeiboPost) for p in posts) and len(posts) == 1996
    _build_and_check_weibo(_weibo_files(corpus), posts, tmp_path)


def test_weibo_parser_resynchronises_after_garbage(tmp_path, corpus):
    good = _weibo_files(corpus)[0].read_text(encoding="utf-8-sig").split("\n")[:6]
    _check_resync(good, tmp_path)


def test_label_source_formats_and_conflicts(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"1": "gym", "2": "school"}))
    (tmp_path / "b.jsonl").write_text('{"post_id": 1, "label": "gym"}\n{"post_id": "2", "label": "school"}\n')
    assert load_label_source(tmp_path / "a.json") == load_label_source(tmp_path / "b.jsonl") == {"1": "gym", "2": "school"}
    (tmp_path / "c.csv").write_text("post_id,label\n1,gym\n1,school\n")
    with pytest.raises(DatasetError, match="labelled both"):
        load_label_source(tmp_path / "c.csv")
    (tmp_path / "d.csv").write_text("id,category\n1,gym\n")
    with pytest.raises(DatasetError, match="post_id and label"):
        load_label_source(tmp_path / "d.csv")


def test_unlabeled_prediction_set(manifest_dir, tmp_path):
    report = build_dataset(manifest_dir / "manifest.jsonl", tmp_path / "ds", labels=LABELS, unlabeled=True)
    assert report["quarantine_reasons"].get("label_missing") is None  # "nolabel" is kept, in test
    rows = {r["post_id"]: r for r in pq.read_table(split_files(tmp_path / "ds", "test")).to_pylist()}
    assert rows["nolabel"]["label"] is None
    validate_dataset(tmp_path / "ds")


def test_a_pair_manifest_builds_a_pair_dataset_split_at_random(manifest_dir, tmp_path):
    """Pairs for sgmft pretrain: no label needed in any split, any label given dropped, bad
    images still quarantined with their reasons, and read = kept + quarantined."""
    report = build_dataset(manifest_dir / "manifest.jsonl", tmp_path / "pairs", pairs=True)
    assert report["labels"] == [] and report["pairs"] is True
    assert "label_missing" not in report["quarantine_reasons"] and "label_unknown" not in report["quarantine_reasons"]
    assert report["quarantine_reasons"]["image_truncated"] == 1
    assert report["read"] == report["kept"] + report["quarantined"]
    rows = _rows_of(tmp_path / "pairs")
    assert {r["post_id"] for r in rows} >= {"nolabel", "zoo"} and all(r["label"] is None for r in rows)
    assert all(report["splits"][s] > 0 for s in ("train", "val", "test"))
    validate_dataset(tmp_path / "pairs")
