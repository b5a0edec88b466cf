"""Runs: their directories, their data and their products, shared by train, tune and ablate.

A run lives at ``train.storage_path/train.run_name``; the synthetic default dataset is
built once inside it; its data is read as Ray datasets (posts preprocessed by Ray Data, or
a feature cache) in two steps a search splits: :func:`prepare_data` once per search,
:func:`worker_spec` per trial; a finished Ray Train result's best checkpoint is exported
from it as a model directory. A search (tune, ablate) is a run too, and each of its trials
a run at ``<search run>/trials/<trial id>``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sgmft.model_dir import CONFIG, METRICS, TRAIN_FILES, TRAIN_STATE, WEIGHTS, staged_model_dir
from sgmft.config import Config, ConfigError, config_from_dict
from sgmft.data.schema import label_counts, load_labels, shard_files, split_rows
from sgmft.feature_cache import FeatureCacheError, check_cache, feature_widths
from sgmft.worker_spec import WorkerSpec

TRIALS = "trials"
"""The folder of a search's run directory that holds one run directory per trial."""


def run_dir(cfg: Config) -> Path:
    """Where a run keeps its checkpoints, dataset and exported model."""
    return Path(cfg.train.storage_path).resolve() / cfg.train.run_name


RESUMABLE_CHANGES = (
    "model.num_labels", "train.epochs", "train.max_failures", "train.fail_once_at_step", "train.stall_timeout_s",
    "train.keep_checkpoints", "train.num_workers", "train.cpus_per_worker", "train.use_gpu", "train.gpus_per_worker",
    "train.precision", "data.materialize", "data.preprocess_batch_size", "data.preprocess_concurrency",
    "data.task_cpus", "data.prefetch_batches", "tune.", "serve.",
)
"""Config keys (and sections) a run may change when it is resumed: how long, where and on
what it runs, not what it trains (``model.num_labels`` comes from the dataset)."""


class RunConfigChanged(ConfigError):
    """A run directory holds checkpoints of another configuration than the one given for it."""


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume(cfg: Config) -> None:
    """Refuse ``cfg`` for a run directory whose last checkpoint was trained with another
    configuration: Ray Train resumes a run by its name, and would go on (or, with fewer
    epochs than it has, stop at once) with the old run's weights and the new settings."""
    saved = sorted(run_dir(cfg).glob("epoch-*/" + CONFIG))
    if not saved:
        return
    try:
        before = _flat(asdict(config_from_dict(json.loads(saved[-1].read_text()))))
    except ValueError as exc:  # a ConfigError too: written by a version with other keys
        before = {"(the saved config)": str(exc)}
    now = _flat(asdict(cfg))
    changed = [f"{key} {before.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(before) | set(now))
               if before.get(key) != now.get(key) and not key.startswith(RESUMABLE_CHANGES)]
    if changed:
        raise RunConfigChanged(
            f"run directory {run_dir(cfg)} holds a run trained with another configuration (its checkpoint "
            f"{saved[-1].parent.name}): {'; '.join(changed[:8])}{' ...' if len(changed) > 8 else ''}. To continue that "
            f"run, give it its own configuration; to start a new one, set another train.run_name or remove the directory")


def place_trial(cfg: Config, search_dir: Path, trial_id: str) -> Config:
    """Point ``cfg`` (a trial's config) at its run directory, ``search_dir/trials/<trial_id>``;
    the trial id also names the versions of the models exported from it."""
    cfg.train.storage_path = str(Path(search_dir) / TRIALS)
    cfg.train.run_name = trial_id
    return cfg


def resolve_dataset(cfg: Config) -> Path:
    """The configured dataset, or the synthetic default built once inside the run directory."""
    if cfg.data.path:
        path = Path(cfg.data.path)
        if not path.is_dir():
            raise FileNotFoundError(f"data.path {path} does not exist")
        return path
    from sgmft.data.synth import synthesize_from_config

    s = cfg.data.synth
    # every SynthConfig field in the name: another setting is another dataset
    path = run_dir(cfg) / (f"synthetic-n{s.n}-seed{s.seed}-t{s.text_noise}-i{s.image_noise}-s{s.image_swap}"
                           f"-px{s.image_size}-two{s.two_object_share}-mis{s.misleading_share}")
    if not (path / "labels.json").is_file():
        synthesize_from_config(path, s)
    return path


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
    from sgmft.ray_data import feature_split, split_dataset

    head_widths = None
    if cfg.train.features_path:
        dataset_dir = Path(cfg.train.features_path)
        check_cache(dataset_dir, cfg)
        labels = load_labels(dataset_dir)
        head_widths = feature_widths(dataset_dir)
        datasets = {
            split: maybe_materialize(feature_split(dataset_dir, split, labels, cfg.data.task_cpus),
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
                              concurrency=preprocess_concurrency(cfg), num_cpus=cfg.data.task_cpus),
                split_rows(dataset_dir, split) * (3 * spec.image_size ** 2 + 8 * spec.context_length + 8),
                cfg.data.materialize)
            for split in ("train", "val")
        }
    return PreparedData(datasets=datasets, dataset_dir=dataset_dir, labels=labels, train_rows=split_rows(dataset_dir, "train"),
                        key=data_key(cfg), head_widths=head_widths)


def worker_spec(cfg: Config, data: PreparedData) -> WorkerSpec:
    """What every training worker of ``cfg`` on prepared ``data`` is handed (the dataset brings its label set)."""
    labels = data.labels
    if cfg.model.num_labels != len(labels):
        cfg.model.num_labels = len(labels)
    class_weights = None
    if cfg.train.class_weights == "balanced":
        counts = np.array(label_counts(data.dataset_dir, labels), dtype=np.float64)
        class_weights = (counts.sum() / (len(labels) * np.maximum(counts, 1))).tolist()
    return WorkerSpec(config=cfg, labels=labels, class_weights=class_weights, train_rows=data.train_rows,
                      run_dir=str(run_dir(cfg)), dataset_dir=str(data.dataset_dir), head_widths=data.head_widths)


def prepare(cfg: Config) -> tuple[dict, WorkerSpec]:
    """Ray datasets (train, val) and the workers' spec for ``cfg``."""
    data = prepare_data(cfg)
    return data.datasets, worker_spec(cfg, data)


def _kept_checkpoints(result: Any) -> list[tuple[Any, dict]]:
    """(checkpoint, metrics) of every checkpoint a finished run kept."""
    return [(ckpt, m) for ckpt, m in (result.best_checkpoints or []) if ckpt is not None]


def best_checkpoint(result: Any, cfg: Config) -> tuple[Any, dict]:
    """The best checkpoint of a finished run (``cfg.train.metric``; the later epoch on ties) and its metrics."""
    candidates = _kept_checkpoints(result)
    if not candidates:
        raise RuntimeError(f"training produced no checkpoint (error: {result.error})")
    sign = 1 if cfg.train.metric_mode == "max" else -1
    return max(candidates, key=lambda cm: (sign * cm[1][cfg.train.metric], cm[1]["epoch"]))


def export_best(result: Any, cfg: Config, destination: Path) -> tuple[Path, dict, list]:
    """Copy the best checkpoint's model files (not its optimizer state) to a model directory.

    A head trained on cached features is completed there with its frozen backbone
    (:func:`complete_model_dir`): a model directory is always servable.
    """
    best_ckpt, best_metrics = best_checkpoint(result, cfg)
    # Ray keeps the latest checkpoint besides the best-k; its state holds the whole epoch history
    latest = result.checkpoint or max(_kept_checkpoints(result), key=lambda cm: cm[1]["epoch"])[0]
    with latest.as_directory() as directory:
        history = json.loads(torch.load(Path(directory) / TRAIN_STATE, weights_only=True)["history"])
    with staged_model_dir(destination) as staging:
        with best_ckpt.as_directory() as directory:
            for name in TRAIN_FILES:
                shutil.copy2(Path(directory) / name, staging / name)
        if cfg.train.features_path:
            complete_model_dir(staging)
        metrics = json.loads((staging / METRICS).read_text())
        metrics.update({"version": f"{cfg.train.run_name}-epoch{best_metrics['epoch']}", "history": history})
        (staging / METRICS).write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    return destination, best_metrics, history


def complete_model_dir(model_dir: str | Path) -> bool:
    """Make a head-only model directory (trained on cached features) complete and servable.

    The frozen backbone is the one that made the cache, rebuilt here once, as the cache
    builder built it: the cache's seed before ``build_backbone`` (random-init presets), or
    the released weights (``checkpoint``/``download_root``), which its manifest records and
    :func:`check_cache` holds the config to. Nothing is done (False) when the weights
    already hold a backbone.
    """
    from safetensors.torch import load_file, save_model

    from sgmft.models.model import build_model

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


def trial_result(result: Any, trial_cfg: Config) -> Any:
    """The result that holds a Tune trial's checkpoints: the trial's own (a single-worker
    trial reports them to Tune) or, for a trial that ran a TorchTrainer, that run's, read
    from the trial's run directory (``trial_cfg`` placed with :func:`place_trial`)."""
    if result.best_checkpoints:
        return result
    import ray.train

    return ray.train.Result.from_path(str(run_dir(trial_cfg)))


def export_trial(result: Any, trial_cfg: Config, destination: Path) -> tuple[Path, dict, list]:
    """Export a Tune trial's best checkpoint as a model directory (see :func:`export_best`)."""
    return export_best(trial_result(result, trial_cfg), trial_cfg, destination)
