"""Distributed training of SG-MFT on the connected Ray cluster, from the driver's side.

``prepare`` turns a config into Ray datasets (posts preprocessed by Ray Data, or a
feature cache) and the loop config, in two steps a search splits: ``prepare_data`` once
per search, ``loop_config`` per trial; ``build_trainer`` makes the ``TorchTrainer`` that
runs :func:`sgmft.train_loop.train_loop_per_worker` on every worker; ``train`` fits it,
exports the best checkpoint as a model directory and evaluates the test split.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sgmft.checkpoint import METRICS
from sgmft.config import Config, config_to_dict
from sgmft.data.schema import label_counts, shard_files, split_rows
from sgmft.runs import export_best, resolve_dataset, run_dir
from sgmft.train_loop import train_loop_per_worker


@dataclass
class TrainOutcome:
    model_dir: Path
    best: dict[str, Any]
    history: list[dict[str, Any]]
    run_path: str
    dataset_dir: Path | None = None
    test: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)


def build_trainer(cfg: Config, datasets: dict, loop: dict, cpus_per_worker: float | None = None, run_config=None):
    """A TorchTrainer for ``cfg``; Tune trials pass their own run_config and CPU share."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = cfg.train
    resources = worker_resources(cfg, cpus_per_worker)
    run_config = run_config or RunConfig(
        name=t.run_name,
        storage_path=str(Path(t.storage_path).resolve()),
        failure_config=FailureConfig(max_failures=t.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints, checkpoint_score_attribute=t.metric,
                                           checkpoint_score_order=t.metric_mode),
    )
    # as many intra-op threads as CPUs reserved: more would fight the other workers and trials
    loop = {**loop, "torch_threads": max(1, int(resources["CPU"]))}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=run_config,
        datasets=datasets,
        # one worker reads the whole datasets: no streaming split, so no split-coordinator actor per dataset
        dataset_config=DataConfig(datasets_to_split=[]) if t.num_workers == 1 else None,
    )


def worker_resources(cfg: Config, cpus_per_worker: float | None = None) -> dict[str, float]:
    """What each training worker reserves: its CPUs and, with ``train.use_gpu``, its GPU share."""
    resources = {"CPU": cpus_per_worker if cpus_per_worker is not None else cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = cfg.train.gpus_per_worker
    return resources


def preprocess_concurrency(cfg: Config, cluster_cpus: float | None = None) -> int:
    """Parallel preprocessing tasks: as configured, or every CPU the train workers leave free."""
    if cfg.data.preprocess_concurrency is not None:
        return cfg.data.preprocess_concurrency
    if cluster_cpus is None:
        import ray

        cluster_cpus = ray.cluster_resources().get("CPU", 1.0)
    free = cluster_cpus - cfg.train.num_workers * cfg.train.cpus_per_worker
    return max(1, int(free))


def maybe_materialize(ds, estimated_bytes: int, mode: str):
    """Decode once and keep the result when it fits comfortably in the object store.

    Streaming re-runs the whole read-decode pipeline every epoch; for a split that fits,
    that repeats work and adds the pipeline's start-up to every epoch's first batch.
    """
    import ray

    budget = ray.cluster_resources().get("object_store_memory", 0) / 5
    if mode == "always" or (mode == "auto" and estimated_bytes < budget):
        return ds.materialize()
    return ds


@dataclass
class PreparedData:
    """Ray datasets (train, val) read, and materialized when they fit, once, with the facts
    about them that a run's loop needs. A search prepares once and hands this to every
    trial whose :func:`data_key` matches ``key``."""

    datasets: dict[str, Any]
    dataset_dir: Path
    labels: list[str]
    train_rows: int
    key: str
    head_widths: dict[str, int] | None = None
    """Cached features: the backbone's widths, so workers build the head alone."""


def data_key(cfg: Config) -> str:
    """What :func:`prepare_data` depends on: configs with the same key can share its datasets."""
    d, backbone = cfg.data, cfg.model.backbone
    key: dict[str, Any] = {
        "path": d.path, "synth": None if d.path else asdict(d.synth), "context_length": d.context_length,
        "max_image_pixels": d.max_image_pixels, "preprocess_batch_size": d.preprocess_batch_size,
        "preprocess_concurrency": d.preprocess_concurrency, "materialize": d.materialize,
        "features_path": cfg.train.features_path, "preset": backbone.preset,
    }
    if cfg.train.features_path:  # what check_cache holds the config to
        key["backbone"] = asdict(backbone)
        key["seed"] = None if (backbone.checkpoint or backbone.download_root) else cfg.train.seed
    return json.dumps(key, sort_keys=True)


def prepare_data(cfg: Config) -> PreparedData:
    """Read the configured dataset (posts preprocessed by Ray Data, or a feature cache)."""
    from sgmft.data.preprocess import PreprocessSpec
    from sgmft.data.schema import load_labels
    from sgmft.ray_data import split_dataset

    head_widths = None
    if cfg.train.features_path:
        from sgmft.features import check_cache, feature_split, feature_widths

        dataset_dir = Path(cfg.train.features_path)
        check_cache(dataset_dir, cfg)
        labels = load_labels(dataset_dir)
        head_widths = feature_widths(dataset_dir)
        datasets = {
            split: maybe_materialize(feature_split(dataset_dir, split, labels),
                                     sum(Path(f).stat().st_size for f in shard_files(dataset_dir, split)) * 2, cfg.data.materialize)
            for split in ("train", "val")
        }
    else:
        dataset_dir = resolve_dataset(cfg)
        labels = load_labels(dataset_dir)
        spec = PreprocessSpec.from_config(cfg)
        datasets = {
            split: maybe_materialize(
                split_dataset(dataset_dir, split, spec, labels, batch_size=cfg.data.preprocess_batch_size,
                              concurrency=preprocess_concurrency(cfg)),
                split_rows(dataset_dir, split) * (3 * spec.image_size ** 2 + 8 * spec.context_length + 8),
                cfg.data.materialize)
            for split in ("train", "val")
        }
    return PreparedData(datasets=datasets, dataset_dir=dataset_dir, labels=labels, train_rows=split_rows(dataset_dir, "train"),
                        key=data_key(cfg), head_widths=head_widths)


def loop_config(cfg: Config, data: PreparedData) -> dict:
    """The worker loop's config for ``cfg`` on prepared ``data`` (the dataset brings its label set)."""
    labels = data.labels
    if cfg.model.num_labels != len(labels):
        cfg.model.num_labels = len(labels)
    class_weights = None
    if cfg.train.class_weights == "balanced":
        counts = np.array(label_counts(data.dataset_dir, labels), dtype=np.float64)
        class_weights = (counts.sum() / (len(labels) * np.maximum(counts, 1))).tolist()
    return {
        "config": config_to_dict(cfg), "labels": labels, "class_weights": class_weights, "train_rows": data.train_rows,
        "run_dir": str(run_dir(cfg)), "dataset_dir": str(data.dataset_dir), "head_widths": data.head_widths,
    }


def prepare(cfg: Config) -> tuple[dict, dict]:
    """Ray datasets (train, val) and the loop config for ``cfg``."""
    data = prepare_data(cfg)
    return data.datasets, loop_config(cfg, data)


def train(cfg: Config, evaluate_test: bool = True) -> TrainOutcome:
    """Train ``cfg`` on the connected Ray cluster, export the best model, evaluate the test split."""
    started = time.monotonic()
    datasets, loop = prepare(cfg)
    Path(loop["run_dir"]).mkdir(parents=True, exist_ok=True)
    result = build_trainer(cfg, datasets, loop).fit()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    trained = time.monotonic()
    model_dir, best, history = export_best(result, cfg, Path(loop["run_dir"]) / "model")
    outcome = TrainOutcome(model_dir=model_dir, best=best, history=history, run_path=str(result.path),
                           dataset_dir=Path(loop["dataset_dir"]), timings={"train_s": trained - started})
    if evaluate_test and not cfg.train.features_path:
        from sgmft.evaluate import evaluate

        outcome.test = evaluate(model_dir, Path(loop["dataset_dir"]), split="test")
        metrics = json.loads((model_dir / METRICS).read_text())
        metrics["test"] = {k: outcome.test[k] for k in ("accuracy", "macro_f1", "num_examples")}
        (model_dir / METRICS).write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
        outcome.timings["evaluate_s"] = time.monotonic() - trained
    return outcome
