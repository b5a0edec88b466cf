"""What a feature cache (``sgmft features cache``, :mod:`sgmft.features`) promises its readers.

Its manifest records the backbone config (and, for a random-init backbone, the seed) that
made it: :func:`check_cache` holds a training config to them, so a cache is never used
with another backbone by mistake, and :func:`feature_widths` gives the widths a head is
built with when no backbone is. Reading a cached split as a Ray dataset is
:func:`sgmft.ray_data.feature_split`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sgmft.config import Config
from sgmft.data.schema import FEATURE_MANIFEST, feature_split_dir

MANIFEST = FEATURE_MANIFEST


class FeatureCacheError(ValueError):
    """The feature cache is missing or was made with another backbone."""


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


def widths_from_shards(features_dir: str | Path) -> dict[str, int]:
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
    return manifest.get("widths") or widths_from_shards(features_dir)
