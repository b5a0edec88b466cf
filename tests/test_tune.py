"""Ray Tune on the session's local Ray: a 3-trial ASHA search, the feature cache, the ablation grid."""

import json
from pathlib import Path

import pytest

from sgmft.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def base_overrides(tmp_path: Path, run_name: str) -> list[str]:
    return [f"train.storage_path={tmp_path}", f"train.run_name={run_name}", "data.synth.n=120", "data.batch_size=16",
            "data.synth.text_noise=0.1", "data.synth.image_noise=0.1", "data.synth.image_swap=0.0", "train.num_workers=1",
            "tune.cpus_per_worker=0.25"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from sgmft.data.synth import synthesize

    path = tmp_path_factory.mktemp("tune-data") / "synthetic"
    synthesize(path, n=120, seed=0, text_noise=0.1, image_noise=0.1, image_swap=0.0)
    return path


def test_asha_search_picks_and_exports_a_servable_best_model(ray_cluster, tmp_path, dataset, corpus):
    from sgmft.inference import InferenceRunner
    from sgmft.tune import tune

    cfg = load_config(REPO / "jobs" / "configs" / "tune.yaml", [*base_overrides(tmp_path, "search"), f"data.path={dataset}",
                                                                "tune.num_samples=3", "train.epochs=2",
                                                                "tune.max_concurrent_trials=3"])
    outcome = tune(cfg)
    assert len(outcome.table) == 3
    epochs = sorted(row["epochs"] for row in outcome.table)
    assert all(1 <= e <= 2 for e in epochs) and epochs[-1] == 2  # ASHA may stop some early; the best runs on
    for name in ("trials.csv", "trials.md", "trials.png", "best_config.json"):
        assert (outcome.experiment_dir / name).is_file(), name
    # the exported model is the best epoch of the best trial: no trial ended better
    assert outcome.best_metrics["val_accuracy"] >= max(row["val_accuracy"] for row in outcome.table) - 1e-9
    sampled_lrs = {row["train.lr"] for row in outcome.table}
    assert len(sampled_lrs) == 3
    assert json.loads((outcome.experiment_dir / "best_config.json").read_text())["train"]["lr"] in sampled_lrs
    prediction = InferenceRunner(outcome.model_dir).predict_post("周末在商场逛街", (corpus / "images" / "hopper.jpg").read_bytes())
    labels = json.loads((dataset / "labels.json").read_text())
    assert prediction["label"] in labels and len(prediction["top_k"]) == 3


def test_bad_search_space_is_refused_with_its_key(tmp_path):
    from sgmft.tune import search_space

    with pytest.raises(ConfigError, match="train.lr"):
        search_space({"train.lr": {"logarithmic": [1, 2]}})
    with pytest.raises(ConfigError, match="model.dropout"):
        search_space({"model.dropout": {"uniform": [0.1]}})


def test_cached_features_equal_live_ones_and_train_the_same(ray_cluster, tmp_path, dataset):
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from sgmft.data.preprocess import PreprocessSpec, preprocess_batch
    from sgmft.data.schema import split_files
    from sgmft.features import FeatureCacheError, cache_features
    from sgmft.models.backbone import build_backbone
    from sgmft.train import train

    def config(run_name, *extra):
        return load_config(REPO / "jobs" / "configs" / "demo.yaml", [
            *base_overrides(tmp_path, run_name), f"data.path={dataset}", "model.backbone.policy=frozen",
            "train.epochs=1", "train.lr=3e-3", *extra])

    cfg = config("cache")
    torch.manual_seed(cfg.train.seed)  # the backbone weights the cache and the training runs share
    manifest = cache_features(cfg, dataset, tmp_path / "features")
    assert manifest["rows"] == {"train": 100, "val": 10, "test": 10}

    # the cache holds exactly what the live backbone computes for the same posts (fp16 storage)
    cached = pq.read_table(sorted((tmp_path / "features" / "split=val").glob("*.parquet"))).to_pylist()
    posts = {r["post_id"]: r for r in pq.read_table(split_files(dataset, "val")).to_pylist()}
    batch = {k: np.array([posts[r["post_id"]][k] for r in cached], dtype=object) for k in ("text", "image")}
    inputs = preprocess_batch(batch, PreprocessSpec.from_config(cfg))
    torch.manual_seed(cfg.train.seed)
    live = build_backbone(cfg.model.backbone).eval()(torch.from_numpy(inputs["input_ids"]), torch.from_numpy(inputs["pixel_values"]))
    for name in ("image_tokens", "text_embeds"):
        stored = torch.tensor(np.stack([np.asarray(r[name], dtype=np.float32) for r in cached]))
        torch.testing.assert_close(stored, getattr(live, name).detach(), atol=2e-2, rtol=1e-2)

    end_to_end = train(config("e2e"), evaluate_test=False)
    from_cache = train(config("cached", f"train.features_path={tmp_path / 'features'}"), evaluate_test=False)
    for a, b in zip(end_to_end.history, from_cache.history, strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) < 0.1, (end_to_end.history, from_cache.history)
    # a cache made for another backbone is refused by name
    with pytest.raises(FeatureCacheError, match="preset"):
        train(config("wrong", f"train.features_path={tmp_path / 'features'}", "model.backbone.preset=small"))


def test_ablation_grid_writes_the_table(ray_cluster, tmp_path, dataset):
    from sgmft.ablate import ablate

    cfg = load_config(REPO / "jobs" / "configs" / "demo.yaml", [*base_overrides(tmp_path, "ablate"), f"data.path={dataset}",
                                                                "train.epochs=1"])
    outcome = ablate(cfg, variants=["full", "text_only"], seeds=[0])
    assert {r["variant"] for r in outcome.rows} == {"full", "text_only"}
    lines = (outcome.directory / "ablation.md").read_text().splitlines()
    assert lines[0].startswith("| variant") and any(l.startswith("| full | 1 |") for l in lines)
