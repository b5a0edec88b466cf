"""Backbone features computed once with Ray Data and stored as Parquet.

With a frozen backbone every epoch of every trial would re-run the same ViT on the
same images; caching its token-level outputs lets training and tuning run the head
alone. The cache records the backbone config it came from, so it is never used with
another backbone by mistake: what a cache promises its readers, and how they check it,
is :mod:`sgmft.feature_cache`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sgmft import progress
from sgmft.commands import (add_verbose_arg, config_from_args, log_dir_beside, print_where, progress_bars,
                            ray_for_command, show_path)
from sgmft.config import PREDICT_BATCH_SIZE, BackboneConfig, Config
from sgmft.data.schema import feature_split_dir
from sgmft.feature_cache import MANIFEST, widths_from_shards
from sgmft.inference import autocast, default_device, to_device
from sgmft.models.backbone import build_backbone
from sgmft.ray_data import read_parquet_files


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
                   batch_size: int = PREDICT_BATCH_SIZE, num_gpus: float = 0.0, overwrite: bool = False) -> dict[str, Any]:
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
                "widths": widths_from_shards(out_dir)}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


# --- the command line ----------------------------------------------------------------------

def cmd_features_cache(args: argparse.Namespace) -> None:

    cfg = config_from_args(args)
    cfg.model.backbone.policy = "frozen"
    log_dir = log_dir_beside(args.out)
    print(f"SG-MFT features: the frozen {cfg.model.backbone.preset} Chinese-CLIP backbone on {show_path(args.data)}, "
          f"{args.concurrency} replica{'s' if args.concurrency != 1 else ''}", flush=True)
    print_where("feature cache", args.out, log_dir, args.verbose)
    with ray_for_command(args, log_dir) as console, progress_bars(console):
        manifest = cache_features(cfg, args.data, args.out, concurrency=args.concurrency, num_gpus=args.num_gpus,
                                  overwrite=args.overwrite)
    print(json.dumps(manifest, indent=2))


def add_commands(commands: argparse._SubParsersAction) -> None:
    features = commands.add_parser("features", help="backbone feature cache").add_subparsers(dest="features_command", required=True)
    cache = features.add_parser("cache", help="compute frozen-backbone features once with Ray Data")
    cache.add_argument("--model-config", dest="config", help="YAML config whose model.backbone is cached")
    cache.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    cache.add_argument("--data", required=True, help="dataset directory")
    cache.add_argument("--out", required=True, help="feature cache directory")
    cache.add_argument("--concurrency", type=int, default=1)
    cache.add_argument("--num-gpus", type=float, default=0.0)
    cache.add_argument("--overwrite", action="store_true")
    add_verbose_arg(cache)
    cache.set_defaults(func=cmd_features_cache)
