"""Distributed training of SG-MFT on the connected Ray cluster, from the driver's side.

``train`` reads the configured data and makes the worker loop's config
(:func:`sgmft.runs.prepare`), fits the ``TorchTrainer`` that runs
:func:`sgmft.train_loop.train_loop_per_worker` on every worker
(:func:`sgmft.train_loop.build_trainer`), exports the best checkpoint as a model directory
(:func:`sgmft.runs.export_best`) and evaluates the test split (:func:`sgmft.evaluate.evaluate`).
Tune and ablate train their trials from the same pieces (:mod:`sgmft.trials`).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sgmft.model_dir import METRICS
from sgmft.commands import (add_config_args, add_verbose_arg, cluster_name, config_from_args, data_source, print_where,
                            progress_bars, ray_for_command, show_path)
from sgmft.config import Config
from sgmft.runs import check_resume, export_best, prepare
from sgmft.train_loop import build_trainer, raise_if_diverged

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo.yaml"
"""What ``sgmft demo`` runs: the embedded default, written out."""


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
    check_resume(cfg)
    datasets, spec = prepare(cfg)
    Path(spec.run_dir).mkdir(parents=True, exist_ok=True)
    from sgmft.run_watch import fit_watched

    result = fit_watched(build_trainer(spec, datasets), spec.run_dir, cfg.train.stall_timeout_s)
    raise_if_diverged(result)
    if result.error:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    trained = time.monotonic()
    model_dir, best, history = export_best(result, cfg, Path(spec.run_dir) / "model")
    outcome = TrainOutcome(model_dir=model_dir, best=best, history=history, run_path=str(result.path),
                           dataset_dir=Path(spec.dataset_dir), timings={"train_s": trained - started})
    if evaluate_test and not cfg.train.features_path:
        from sgmft.evaluate import evaluate

        outcome.test = evaluate(model_dir, Path(spec.dataset_dir), split="test")
        metrics = json.loads((model_dir / METRICS).read_text())
        metrics["test"] = {k: outcome.test[k] for k in ("accuracy", "macro_f1", "num_examples")}
        (model_dir / METRICS).write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
        outcome.timings["evaluate_s"] = time.monotonic() - trained
    return outcome


# --- the command line ----------------------------------------------------------------------

def format_history(history: list[dict]) -> str:
    lines = [f"{'epoch':>5} {'train loss':>10} {'val acc':>8} {'val F1':>8} {'samples/s':>10} {'data wait':>9}"]
    for h in history:
        lines.append(f"{h['epoch']:>5} {h['train_loss']:>10.4f} {h['val_accuracy']:>8.3f} {h['val_macro_f1']:>8.3f} "
                     f"{h['samples_per_s']:>10.1f} {h['data_wait_share']:>9.1%}")
    return "\n".join(lines)


def _print_outcome(outcome, num_labels: int) -> None:
    print("\n" + format_history(outcome.history))
    print(f"best epoch {outcome.best['epoch']}: val accuracy {outcome.best['val_accuracy']:.3f}, "
          f"macro-F1 {outcome.best['val_macro_f1']:.3f}")
    if outcome.test:
        print(f"test: accuracy {outcome.test['accuracy']:.3f}, macro-F1 {outcome.test['macro_f1']:.3f} "
              f"on {outcome.test['num_examples']} posts (chance {1 / num_labels:.3f})")
    print(f"model directory: {show_path(outcome.model_dir)}", flush=True)


def _train(args: argparse.Namespace, cfg, title: str):
    """Banner, the training run with its progress, the summary; returns the outcome."""
    from sgmft.runs import run_dir

    directory = run_dir(cfg)
    log_dir = directory / "logs"
    print(title, flush=True)
    print_where("run directory", directory, log_dir, args.verbose)
    with ray_for_command(args, log_dir) as console, progress_bars(console):
        outcome = train(cfg)
    _print_outcome(outcome, cfg.model.num_labels)
    return outcome


def cmd_train(args: argparse.Namespace) -> None:
    cfg = config_from_args(args)
    t, b = cfg.train, cfg.model.backbone
    _train(args, cfg, f"SG-MFT train: {data_source(cfg)}, {b.preset} Chinese-CLIP ({b.policy} backbone), {t.num_workers} Ray Train "
                      f"workers{' on GPUs' if t.use_gpu else ''} on {cluster_name()}, {t.epochs} epochs")


def cmd_demo(args: argparse.Namespace) -> None:
    """Synthetic data -> 2-worker training of the tiny model on local Ray -> test evaluation."""
    if not args.config:  # the embedded default, written out in the package's jobs/configs/demo.yaml
        args.config = str(DEMO_CONFIG)
    cfg = config_from_args(args)
    outcome = _train(args, cfg, f"SG-MFT demo: {cfg.data.synth.n} synthetic Weibo-like posts, {cfg.model.backbone.preset} "
                                f"Chinese-CLIP, {cfg.train.num_workers} Ray Train workers, {cfg.train.epochs} epochs")
    print(f"next: sgmft serve --model {show_path(outcome.model_dir)}   |   sgmft evaluate --model {show_path(outcome.model_dir)} "
          f"--data {show_path(outcome.dataset_dir)}", flush=True)


def add_commands(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="synthetic data -> distributed training -> evaluation, on local Ray")
    add_config_args(demo)
    add_verbose_arg(demo)
    demo.set_defaults(func=cmd_demo)

    parser = commands.add_parser("train", help="train SG-MFT with Ray Train (joins RAY_ADDRESS or starts local Ray)")
    add_config_args(parser)
    add_verbose_arg(parser)
    parser.set_defaults(func=cmd_train)
