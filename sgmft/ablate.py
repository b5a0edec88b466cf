"""The paper's ablation table on any dataset: each variant x seed is a Ray Tune grid trial."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sgmft.config import Config

# Each variant is a set of config overrides on top of the full model (the switches of docs/DESIGN.md).
VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "no_coarse": {"model.coarse_guidance": False},
    "no_fine": {"model.fine_guidance": False},
    "no_sim": {"model.use_sim": False},
    "concat_fusion": {"model.fusion": "concat"},
    "text_only": {"model.modalities": "text"},
    "image_only": {"model.modalities": "image"},
    "linear_probe": {"model.linear_probe": True},
}


@dataclass
class AblationOutcome:
    rows: list[dict[str, Any]]
    markdown: str
    directory: Path


def ablate(cfg: Config, variants: list[str] | None = None, seeds: list[int] | None = None) -> AblationOutcome:
    """Train every variant with every seed on the same data, evaluate each on the test split.

    Each (variant, seed) is a :func:`sgmft.tune.run_trial` trial whose ``variant``
    parameter names one of :data:`VARIANTS`; the data is prepared once for all of them.
    Each trial's best checkpoint is evaluated where it lies (a checkpoint is a model
    directory): nothing is exported.
    """
    from ray import tune as ray_tune

    from sgmft.evaluate import evaluate_local
    from sgmft.runs import best_checkpoint, export_best, resolve_dataset, trial_result
    from sgmft.tune import concurrency, in_process, run_config, search_setup, trainable

    variants = variants or list(VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown ablation variants {unknown}; known: {list(VARIANTS)}")
    seeds = seeds or [0, 1, 2]
    dataset_dir = resolve_dataset(cfg)  # the posts every trial is tested on
    cfg.data.path = str(dataset_dir)
    setup = search_setup(cfg, groups={"variant": VARIANTS})  # every variant sees the same data, prepared once
    directory = Path(setup.search_dir)
    tuner = ray_tune.Tuner(
        trainable(cfg, setup), param_space={"variant": ray_tune.grid_search(variants), "train.seed": ray_tune.grid_search(seeds)},
        tune_config=ray_tune.TuneConfig(metric=cfg.train.metric, mode=cfg.train.metric_mode, max_concurrent_trials=concurrency(cfg),
                                        reuse_actors=in_process(cfg)),
        run_config=run_config(cfg, "ablate"),
    )
    results = tuner.fit()
    rows = []
    for result in results:
        if result.error or result.metrics is None:
            raise RuntimeError(f"ablation trial {result.config.get('variant')} seed {result.config.get('train.seed')} failed: {result.error}")
        variant, seed = result.config["variant"], result.config["train.seed"]
        trial_cfg = setup.config(result.config, result.metrics["trial_id"])
        trained = trial_result(result, trial_cfg)
        checkpoint, best = best_checkpoint(trained, trial_cfg)
        if trial_cfg.train.features_path:  # a head on cached features: completed with its backbone to read posts
            with tempfile.TemporaryDirectory(dir=directory) as tmp:
                test = evaluate_local(export_best(trained, trial_cfg, Path(tmp) / "model")[0], dataset_dir, "test")
        else:
            with checkpoint.as_directory() as model_dir:
                test = evaluate_local(model_dir, dataset_dir, "test")
        rows.append({"variant": variant, "seed": seed, "val_accuracy": best["val_accuracy"],
                     "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"]})
    markdown = ablation_table(rows, variants)
    (directory / "ablation.md").write_text(markdown)
    (directory / "ablation.json").write_text(json.dumps(rows, indent=2))
    return AblationOutcome(rows, markdown, directory)


def ablation_table(rows: list[dict[str, Any]], order: list[str]) -> str:
    """Markdown: mean +- std over seeds of test accuracy and macro-F1, per variant."""
    lines = ["| variant | seeds | test accuracy | test macro-F1 |", "|---|---|---|---|"]
    for variant in order:
        mine = [r for r in rows if r["variant"] == variant]
        if not mine:
            continue
        acc = np.array([r["test_accuracy"] for r in mine]) * 100
        f1 = np.array([r["test_macro_f1"] for r in mine]) * 100
        lines.append(f"| {variant} | {len(mine)} | {acc.mean():.2f} ± {acc.std(ddof=0):.2f} | {f1.mean():.2f} ± {f1.std(ddof=0):.2f} |")
    return "\n".join(lines) + "\n"
