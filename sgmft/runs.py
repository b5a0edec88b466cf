"""Run directories and their products, shared by train, tune and ablate.

A run lives at ``train.storage_path/train.run_name``; the synthetic default dataset is
built once inside it; a finished Ray Train result's best checkpoint is exported from it
as a model directory. A search (tune, ablate) is a run too, and each of its trials a run
at ``<search run>/trials/<trial id>``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from sgmft.checkpoint import METRICS, TRAIN_FILES
from sgmft.config import Config

TRAIN_STATE = "train_state.pt"
"""Optimizer, schedule, epoch, RNG and history, beside the model files of a checkpoint."""


TRIALS = "trials"
"""The folder of a search's run directory that holds one run directory per trial."""


def run_dir(cfg: Config) -> Path:
    """Where a run keeps its checkpoints, dataset and exported model."""
    return Path(cfg.train.storage_path).resolve() / cfg.train.run_name


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
    (:func:`sgmft.features.complete_model_dir`): a model directory is always servable.
    """
    best_ckpt, best_metrics = best_checkpoint(result, cfg)
    # Ray keeps the latest checkpoint besides the best-k; its state holds the whole epoch history
    latest = result.checkpoint or max(_kept_checkpoints(result), key=lambda cm: cm[1]["epoch"])[0]
    with latest.as_directory() as directory:
        history = json.loads(torch.load(Path(directory) / TRAIN_STATE, weights_only=True)["history"])
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        with best_ckpt.as_directory() as directory:
            for name in TRAIN_FILES:
                shutil.copy2(Path(directory) / name, staging / name)
        if cfg.train.features_path:
            from sgmft.features import complete_model_dir

            complete_model_dir(staging)
        metrics = json.loads((staging / METRICS).read_text())
        metrics.update({"version": f"{cfg.train.run_name}-epoch{best_metrics['epoch']}", "history": history})
        (staging / METRICS).write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
        if destination.exists():
            shutil.rmtree(destination)
        staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return destination, best_metrics, history


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
