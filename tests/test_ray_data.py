"""Ray Data pipelines on a real local Ray: read_split -> preprocessed -> torch batches."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import hostile_images as hi
import numpy as np
import pyarrow.parquet as pq
import pytest

from sgmft.data.preprocess import PreprocessSpec
from sgmft.data.schema import load_labels, split_files, write_split
from sgmft.data.synth import synthesize

pytestmark = pytest.mark.slow
SPEC = PreprocessSpec(image_size=32, context_length=24)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ray-data") / "ds"
    synthesize(out, n=300, seed=1, text_noise=0.3, image_noise=0.3, image_swap=0.1, image_size=48, rows_per_shard=64)
    return out


def _parquet_rows(dataset: Path, split: str) -> list[dict]:
    return [r for f in split_files(dataset, split) for r in pq.read_table(f, columns=["post_id", "label"]).to_pylist()]


def test_torch_batches_have_the_right_shapes_and_every_row(ray_cluster, dataset):
    import torch

    from sgmft.ray_data import split_dataset

    labels = load_labels(dataset)
    ds = split_dataset(dataset, "train", SPEC, labels, batch_size=32)
    seen = Counter()
    rows = 0
    for batch in ds.iter_torch_batches(batch_size=50):
        assert set(batch) == {"input_ids", "pixel_values", "label_id"}
        n = len(batch["label_id"])
        assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (n, 24)
        assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape == (n, 3, 32, 32)  # normalised on the device
        assert batch["label_id"].dtype == torch.int64
        assert torch.isfinite(batch["pixel_values"]).all() and (batch["input_ids"][:, 0] == 101).all()
        seen.update(batch["label_id"].tolist())
        rows += n
    expected = Counter(labels.index(r["label"]) for r in _parquet_rows(dataset, "train"))
    assert rows == sum(expected.values()) == 240
    assert seen == expected


def test_keep_ids_returns_every_post_once(ray_cluster, dataset):
    from sgmft.ray_data import preprocessed, read_split

    ds = preprocessed(read_split(dataset, "val"), SPEC, None, keep_ids=True, batch_size=16)
    ids = [pid for batch in ds.iter_batches(batch_size=16) for pid in batch["post_id"]]
    assert sorted(ids) == sorted(r["post_id"] for r in _parquet_rows(dataset, "val"))


@pytest.mark.parametrize("source", ["generated", "corpus"])
def test_bad_images_are_recorded_or_raise_naming_the_post(ray_cluster, tmp_path, source):
    from sgmft.ray_data import split_dataset

    if source == "generated":
        good, bad = hi.good_jpeg(), hi.truncated_jpeg()
    else:  # the workshop corpus, where it exists
        images = hi.require_corpus() / "images"
        good, bad = (images / "hopper.jpg").read_bytes(), (images / "truncated_jpeg.jpg").read_bytes()
    rows = [{"post_id": f"p{i}", "text": "文本", "image": bad if i == 7 else good, "label": "a"} for i in range(20)]
    write_split(rows, tmp_path, "test", rows_per_shard=10)
    ds = split_dataset(tmp_path, "test", SPEC, ["a"], on_error="record", keep_ids=True)
    out = {pid: (ok, err) for b in ds.iter_batches(batch_size=8) for pid, ok, err in zip(b["post_id"], b["ok"], b["error"])}
    assert len(out) == 20 and out["p7"][0] == False and out["p7"][1].startswith("image_truncated")  # noqa: E712
    assert all(ok for pid, (ok, _) in out.items() if pid != "p7")
    tensors_only = split_dataset(tmp_path, "test", SPEC, ["a"], on_error="record")
    oks = np.concatenate([b["ok"].numpy() for b in tensors_only.iter_torch_batches(batch_size=8)])
    assert oks.sum() == 19
    with pytest.raises(Exception, match="post p7") as info:
        split_dataset(tmp_path, "test", SPEC, ["a"]).materialize()
    assert "image_truncated" in str(info.value)


def test_unknown_label_fails_clearly(ray_cluster, dataset):
    from sgmft.ray_data import split_dataset

    with pytest.raises(Exception, match="unknown label"):
        split_dataset(dataset, "test", SPEC, ["home", "school"]).materialize()
