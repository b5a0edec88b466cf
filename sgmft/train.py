"""Distributed training of SG-MFT on the connected Ray cluster, from the driver's side.

``train`` reads the configured data and makes the worker loop's config
(:func:`sgmft.runs.prepare`), fits the ``TorchTrainer`` that runs
:func:`sgmft.train_loop.train_loop_per_worker` on every worker
(:func:`sgmft.train_loop.build_trainer`), exports the best checkpoint as a model directory
(:func:`sgmft.runs.export_best`) and evaluates the test split (:func:`sgmft.evaluate.evaluate`).
Tune and ablate train their trials from the same pieces (:mod:`sgmft.trials`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sgmft.checkpoint import METRICS
from sgmft.config import Config
from sgmft.runs import export_best, prepare
from sgmft.train_loop import build_trainer


@dataclass
class TrainOutcome:
    model_dir: Path
    best: dict[str, Any]
    history: list[dict[str, Any]]
    run_path: str
    dataset_dir: Path | None = None
    test: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)


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
