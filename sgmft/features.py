"""Backbone features computed once with Ray Data and stored as Parquet.

With a frozen backbone every epoch of every trial would re-run the same ViT on the
same images; caching its token-level outputs lets training and tuning run the head
alone. The cache records the backbone config it came from, so it is never used with
another backbone by mistake.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sgmft import progress
from sgmft.config import BackboneConfig, Config
from sgmft.data.schema import FEATURE_MANIFEST, feature_split_dir, shard_files
from sgmft.inference import autocast, default_device, to_device
from sgmft.models.backbone import build_backbone
from sgmft.ray_data import read_parquet_files

MANIFEST = FEATURE_MANIFEST


class FeatureCacheError(ValueError):
    """The feature cache is missing or was made with another backbone."""


class FeatureExtractor:
    """Ray Data actor: the frozen backbone, run on preprocessed batches."""

    def __init__(self, backbone: dict[str, Any], seed: int, device: str | None = None):
        self.device = torch.device(device) if device else default_device()
        # the seed training uses before building its model, so random-init presets get the same weights
        torch.manual_seed(seed)
        self.backbone = build_backbone(BackboneConfig(**backbone)).to(self.device).eval()
        self.progress = progress.Reporter("features")  # posts done, for the driver's progress bar

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, pixels = to_device(batch["input_ids"], self.device), to_device(batch["pixel_values"], self.device)
        with autocast(self.device):
            out = self.backbone(ids, pixels)
        half = lambda t: t.float().cpu().numpy().astype(np.float16)  # noqa: E731  halves the cache size
        self.progress.advance(len(batch["post_id"]))
        return {
            "post_id": batch["post_id"], "label": batch["label"], "split": batch["split"],
            "text_tokens": half(out.text_tokens), "text_mask": out.text_mask.cpu().numpy(),
            "image_tokens": half(out.image_tokens), "text_embeds": half(out.text_embeds), "image_embeds": half(out.image_embeds),
        }


def _split_from_path(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    batch["split"] = np.array([Path(p).parent.name for p in batch.pop("path")], dtype=object)
    return batch


def _preprocess_with_split(batch: dict[str, np.ndarray], spec) -> dict[str, np.ndarray]:
    from sgmft.data.preprocess import preprocess_batch

    return {**preprocess_batch(batch, spec), "split": batch["split"]}


def cache_features(cfg: Config, dataset_dir: str | Path, out_dir: str | Path, *, concurrency: int = 1,
                   batch_size: int = 64, num_gpus: float = 0.0, overwrite: bool = False) -> dict[str, Any]:
    """Compute backbone features for every split of ``dataset_dir`` into ``out_dir``."""
    import pyarrow.parquet as pq
    import ray

    from sgmft.data.preprocess import PreprocessSpec
    from sgmft.data.schema import available_splits, load_labels, split_files

    out_dir = Path(out_dir)
    if out_dir.exists():
        if not overwrite:
            raise FileExistsError(f"feature cache {out_dir} exists; pass overwrite to rebuild it")
        shutil.rmtree(out_dir)
    labels = load_labels(dataset_dir)
    spec = PreprocessSpec.from_config(cfg)
    splits = available_splits(dataset_dir)
    # one pipeline (one actor pool start-up) over every split; the split travels as a column
    files = [f for split in splits for f in split_files(dataset_dir, split)]
    posts = read_parquet_files(files, include_paths=True).map_batches(_split_from_path, batch_format="numpy")
    rows = posts.map_batches(_preprocess_with_split, fn_kwargs={"spec": spec}, batch_size=batch_size, batch_format="numpy")
    features = rows.map_batches(FeatureExtractor, fn_constructor_kwargs={"backbone": asdict(cfg.model.backbone), "seed": cfg.train.seed},
                                batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=concurrency),
                                num_gpus=num_gpus)
    progress.expect("features", lambda: sum(pq.ParquetFile(f).metadata.num_rows for f in files), "backbone features")
    features.write_parquet(str(out_dir), partition_cols=["split"])
    counts = {split: sum(pq.ParquetFile(f).metadata.num_rows for f in feature_split_dir(out_dir, split).glob("*.parquet"))
              for split in splits}
    (out_dir / "labels.json").write_text(json.dumps(labels, ensure_ascii=False))
    manifest = {"backbone": asdict(cfg.model.backbone), "seed": cfg.train.seed, "image_size": spec.image_size,
                "context_length": spec.context_length, "rows": counts, "source": str(Path(dataset_dir).resolve()),
                "widths": _widths_from_shards(out_dir)}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def check_cache(features_dir: str | Path, cfg: Config) -> dict[str, Any]:
    """The cache's manifest, after checking it matches the configured backbone and preprocessing."""
    path = Path(features_dir) / MANIFEST
    if not path.is_file():
        raise FeatureCacheError(f"{features_dir} is not a feature cache ({MANIFEST} is missing); build it with `sgmft features cache`")
    manifest = json.loads(path.read_text())
    wanted = asdict(cfg.model.backbone)
    for key in ("preset", "implementation", "checkpoint", "download_root"):
        if manifest["backbone"].get(key) != wanted[key]:
            raise FeatureCacheError(f"feature cache {features_dir} was made with model.backbone.{key}="
                                    f"{manifest['backbone'].get(key)!r}, the config has {wanted[key]!r}")
    if manifest.get("seed") != cfg.train.seed and not (wanted["checkpoint"] or wanted["download_root"]):
        raise FeatureCacheError(f"feature cache {features_dir} holds a random-init backbone made with seed "
                                f"{manifest.get('seed')}, the config has train.seed={cfg.train.seed}")
    if cfg.model.backbone.policy != "frozen":
        raise FeatureCacheError("training on cached features needs model.backbone.policy: frozen")
    return manifest


def _encode_labels(batch: dict[str, np.ndarray], labels: list[str]) -> dict[str, np.ndarray]:
    from sgmft.data.preprocess import encode_labels

    batch["label_id"] = encode_labels(batch.pop("label"), labels)
    batch.pop("post_id")
    batch.pop("split", None)
    return batch


def feature_split(features_dir: str | Path, split: str, labels: list[str]):
    """A Ray dataset of cached features with integer labels, ready for iter_torch_batches."""
    return read_parquet_files(shard_files(features_dir, split)).map_batches(_encode_labels, fn_kwargs={"labels": labels}, batch_format="numpy")


def _widths_from_shards(features_dir: str | Path) -> dict[str, int]:
    """The backbone's widths, read from the tensor shapes in a shard's schema (no rows read)."""
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401  registers Ray's tensor extension types, whose shapes are read here

    schema = pq.read_schema(next(feature_split_dir(features_dir, "train").glob("*.parquet")))
    width = lambda column: int(schema.field(column).type.shape[-1])  # noqa: E731
    return {"text_width": width("text_tokens"), "image_width": width("image_tokens"), "embed_dim": width("text_embeds")}


def feature_widths(features_dir: str | Path) -> dict[str, int]:
    """``text_width``, ``image_width`` and ``embed_dim`` of the backbone that made the cache:
    all a head needs to be built without that backbone."""
    manifest = json.loads((Path(features_dir) / MANIFEST).read_text())
    return manifest.get("widths") or _widths_from_shards(features_dir)


def complete_model_dir(model_dir: str | Path) -> bool:
    """Make a head-only model directory (trained on cached features) complete and servable.

    The frozen backbone is the one that made the cache, rebuilt here once, as the cache
    builder built it: the cache's seed before ``build_backbone`` (random-init presets), or
    the released weights (``checkpoint``/``download_root``), which its manifest records and
    :func:`check_cache` holds the config to. Nothing is done (False) when the weights
    already hold a backbone.
    """
    from safetensors.torch import load_file, save_model

    from sgmft.checkpoint import CONFIG, WEIGHTS
    from sgmft.config import config_from_dict
    from sgmft.models.sgmft import build_model

    model_dir = Path(model_dir)
    head = load_file(str(model_dir / WEIGHTS))
    if any(name.startswith("backbone.") for name in head):
        return False
    cfg = config_from_dict(json.loads((model_dir / CONFIG).read_text()))
    if not cfg.train.features_path:
        raise FeatureCacheError(f"{model_dir} holds a head without a backbone and names no feature cache (train.features_path)")
    manifest = check_cache(cfg.train.features_path, cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(manifest["seed"])
        model = build_model(cfg.model, load_pretrained=True)
    missing, unexpected = model.load_state_dict(head, strict=False)
    if unexpected or any(not name.startswith("backbone.") for name in missing):
        raise FeatureCacheError(f"{model_dir / WEIGHTS} is not the head of {cfg.model.backbone.preset}: "
                                f"unexpected {unexpected[:5]}, missing {[n for n in missing if not n.startswith('backbone.')][:5]}")
    del head  # may map the file that is replaced next
    staging = model_dir / f".{WEIGHTS}.tmp"
    save_model(model, str(staging))
    staging.replace(model_dir / WEIGHTS)
    return True
