"""Batch prediction on Ray Data keeps every row; one-post prediction from the CLI.

Images are generated (tests/hostile_images.py); the same checks also run on the workshop
corpus where it exists next to the repository.
"""

import json

import hostile_images as hi
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sgmft.model_dir import save_model_dir
from sgmft.config import Config, model_config_for
from sgmft.data.labels import DEFAULT_LABELS
from sgmft.models.model import build_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    cfg = Config(model=model_config_for("tiny", num_labels=len(DEFAULT_LABELS)))
    return save_model_dir(tmp_path_factory.mktemp("model") / "m", build_model(cfg.model), cfg, DEFAULT_LABELS, {"version": "t1"})


def images_of(source: str) -> dict[str, bytes]:
    """Good and bad images by role: generated in memory, or files of the workshop corpus."""
    if source == "generated":
        return {"jpeg": hi.good_jpeg(), "webp": hi.good_webp(), "transparent_png": hi.rgba_png(),
                "truncated_jpeg": hi.truncated_jpeg(), "bomb": hi.decompression_bomb_gif(),
                "undecodable": hi.not_an_image_random()}
    images = hi.require_corpus() / "images"
    files = {"jpeg": "hopper.jpg", "webp": "flower.webp", "transparent_png": "transparent.png",
             "truncated_jpeg": "truncated_jpeg.jpg", "bomb": "decompression_bomb.gif", "undecodable": "broken.png"}
    return {role: (images / name).read_bytes() for role, name in files.items()}


@pytest.mark.parametrize("source", ["generated", "corpus"])
def test_batch_prediction_writes_every_row_and_reconciles(ray_cluster, tmp_path, model_dir, source):
    from sgmft.predict import predict_dataset

    images = images_of(source)
    good = [images["jpeg"], images["webp"], images["transparent_png"]]
    bad = [b"not an image at all", images["truncated_jpeg"], images["bomb"]]
    rows = good * 10 + bad
    table = pa.table({"post_id": [f"p{i}" for i in range(len(rows))], "text": ["在商场吃饭"] * len(rows),
                      "image": pa.array(rows, type=pa.binary())})
    (tmp_path / "in").mkdir()
    pq.write_table(table.slice(0, 20), tmp_path / "in" / "a.parquet")
    pq.write_table(table.slice(20), tmp_path / "in" / "b.parquet")

    report = predict_dataset(model_dir, tmp_path / "in", tmp_path / "out", batch_size=8)
    assert report == {"read": 33, "written": 33, "predicted": 30, "failed": 3}
    out = pq.read_table(tmp_path / "out").to_pylist()
    assert sorted(r["post_id"] for r in out) == sorted(f"p{i}" for i in range(33))
    failed = {r["post_id"]: r["error"] for r in out if r["error"]}
    assert set(failed) == {"p30", "p31", "p32"}
    assert all(failed[p].startswith("image_") for p in failed), failed
    for r in out:
        if not r["error"]:
            assert r["predicted_label"] in DEFAULT_LABELS
            assert abs(sum(r["probabilities"]) - 1.0) < 1e-4 and r["probability"] == pytest.approx(max(r["probabilities"]))
    assert json.loads((tmp_path / "out" / "_report.json").read_text())["failed"] == 3
    with pytest.raises(FileExistsError):
        predict_dataset(model_dir, tmp_path / "in", tmp_path / "out")


@pytest.mark.parametrize("source", ["generated", "corpus"])
def test_one_post_from_the_cli(model_dir, source, tmp_path, capsys):
    from sgmft.cli import main

    images = images_of(source)
    (tmp_path / "good.jpg").write_bytes(images["jpeg"])
    (tmp_path / "broken.png").write_bytes(images["undecodable"])
    assert main(["predict", "--model", str(model_dir), "--text", "今天在医院排队", "--image", str(tmp_path / "good.jpg")]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["label"] in DEFAULT_LABELS and answer["model_version"] == "t1"
    probabilities = [t["probability"] for t in answer["top_k"]]
    assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True) and answer["top_k"][0]["label"] == answer["label"]
    assert main(["predict", "--model", str(model_dir), "--text", "x", "--image", str(tmp_path / "broken.png")]) == 2
    assert "image_" in capsys.readouterr().err


def _blank_inputs(runner, n: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    size, length = runner.spec.image_size, runner.spec.context_length
    ids = rng.integers(1000, 20000, (n, length)).astype(np.int64)
    ids[:, length // 2:] = 0  # padded tail, as real texts have
    return ids, rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def test_runner_pads_to_buckets_only_where_graphs_are_specialised(model_dir):
    """On a CPU neither compile nor graphs are on, so no batch is padded and none is captured."""
    from sgmft.inference import InferenceRunner, batch_buckets

    runner = InferenceRunner(model_dir, device="cpu", buckets=batch_buckets(8), cuda_graphs=True)
    runner.warmup()
    assert runner.buckets == () and runner._padded(3) == 3
    assert runner.info()["cuda_graph_batch_sizes"] == [] and runner.info()["compiled_batch_sizes"] == []
    with pytest.raises(ValueError, match="buckets"):
        InferenceRunner(model_dir, device="cpu", cuda_graphs=True)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_matches_the_eager_forward(model_dir):
    import numpy as np

    from sgmft.inference import InferenceRunner, batch_buckets

    eager = InferenceRunner(model_dir, device="cuda")
    graphs = InferenceRunner(model_dir, device="cuda", buckets=batch_buckets(8), cuda_graphs=True)
    graphs.warmup()
    assert graphs.info()["cuda_graph_batch_sizes"] == [1, 2, 4, 8]
    for n in (1, 3, 8, 5):  # 5 after 8: stale rows from a larger batch must not leak into a smaller one
        ids, pixels = _blank_inputs(graphs, n, seed=n)
        np.testing.assert_allclose(graphs.probabilities(ids, pixels), eager.probabilities(ids, pixels), atol=2e-3)
