"""The paper's ablation table on any dataset: each variant x seed is a Ray Tune grid trial."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sgmft.config import Config, config_to_dict

# Each variant is a set of config overrides on top of the full model (DESIGN.md's switches).
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
    """Train every variant with every seed on the same data, evaluate each on the test split."""
    from ray import tune as ray_tune

    from sgmft.evaluate import evaluate_local
    from sgmft.train import export_best, resolve_dataset
    from sgmft.tune import TRIAL_DRIVER_CPU, _trial_fn, concurrency, trial_config

    variants = variants or list(VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown ablation variants {unknown}; known: {list(VARIANTS)}")
    seeds = seeds or [0, 1, 2]
    directory = Path(cfg.train.storage_path).resolve() / cfg.train.run_name
    trials_dir = directory / "trials"
    trials_dir.mkdir(parents=True, exist_ok=True)
    dataset_dir = resolve_dataset(cfg)  # built once, before trials, so every variant sees the same data
    cfg.data.path = str(dataset_dir)
    base = config_to_dict(cfg)
    param_space = {"__variant__": ray_tune.grid_search(variants), "train.seed": ray_tune.grid_search(seeds),
                   "__base__": base, "__trials_dir__": str(trials_dir), "__variants__": VARIANTS}
    tuner = ray_tune.Tuner(
        ray_tune.with_resources(_trial_fn, {"CPU": TRIAL_DRIVER_CPU}), param_space=param_space,
        tune_config=ray_tune.TuneConfig(metric=cfg.train.metric, mode=cfg.train.metric_mode, max_concurrent_trials=concurrency(cfg)),
        run_config=ray_tune.RunConfig(name="ablate", storage_path=str(directory), verbose=0),
    )
    results = tuner.fit()
    import ray.train

    rows = []
    for result in results:
        if result.error or result.metrics is None:
            raise RuntimeError(f"ablation trial {result.config.get('__variant__')} seed {result.config.get('train.seed')} failed: {result.error}")
        variant, seed = result.config["__variant__"], result.config["train.seed"]
        trial_id = result.metrics["trial_id"]
        trial_cfg = trial_config(base, {**VARIANTS[variant], "train.seed": seed})
        trial_cfg.train.run_name = trial_id
        model_dir, best, _ = export_best(ray.train.Result.from_path(str(trials_dir / trial_id)), trial_cfg, trials_dir / trial_id / "model")
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
