"""Run directories and their products, shared by train, tune and ablate.

A run lives at ``train.storage_path/train.run_name``; the synthetic default dataset is
built once inside it; a finished Ray Train result's best checkpoint is exported from it
as a model directory.
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


def run_dir(cfg: Config) -> Path:
    """Where a run keeps its checkpoints, dataset and exported model."""
    return Path(cfg.train.storage_path).resolve() / cfg.train.run_name


def resolve_dataset(cfg: Config) -> Path:
    """The configured dataset, or the synthetic default built once inside the run directory."""
    if cfg.data.path:
        path = Path(cfg.data.path)
        if not path.is_dir():
            raise FileNotFoundError(f"data.path {path} does not exist")
        return path
    from sgmft.data.synth import synthesize

    s = cfg.data.synth
    path = run_dir(cfg) / f"synthetic-n{s.n}-seed{s.seed}-t{s.text_noise}-i{s.image_noise}-s{s.image_swap}-px{s.image_size}"
    if not (path / "labels.json").is_file():
        synthesize(path, n=s.n, seed=s.seed, text_noise=s.text_noise, image_noise=s.image_noise,
                   image_swap=s.image_swap, image_size=s.image_size)
    return path


def export_best(result: Any, cfg: Config, destination: Path) -> tuple[Path, dict, list]:
    """Copy the best checkpoint's model files (not its optimizer state) to a model directory."""
    candidates = [(ckpt, m) for ckpt, m in (result.best_checkpoints or []) if ckpt is not None]
    if not candidates:
        raise RuntimeError(f"training produced no checkpoint (error: {result.error})")
    sign = 1 if cfg.train.metric_mode == "max" else -1
    best_ckpt, best_metrics = max(candidates, key=lambda cm: (sign * cm[1][cfg.train.metric], cm[1]["epoch"]))
    # Ray keeps the latest checkpoint besides the best-k; its state holds the whole epoch history
    latest = result.checkpoint or max(candidates, key=lambda cm: cm[1]["epoch"])[0]
    with latest.as_directory() as directory:
        history = json.loads(torch.load(Path(directory) / TRAIN_STATE, weights_only=True)["history"])
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    with best_ckpt.as_directory() as directory:
        for name in TRAIN_FILES:
            shutil.copy2(Path(directory) / name, staging / name)
    metrics = json.loads((staging / METRICS).read_text())
    metrics.update({"version": f"{cfg.train.run_name}-epoch{best_metrics['epoch']}", "history": history})
    (staging / METRICS).write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    if destination.exists():
        shutil.rmtree(destination)
    staging.rename(destination)
    return destination, best_metrics, history
