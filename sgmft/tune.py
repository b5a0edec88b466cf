"""Hyper-parameter search with Ray Tune: each trial builds its own TorchTrainer.

The search space is YAML: dotted config keys mapped to a distribution, e.g.

    tune:
      search_space:
        train.lr: {loguniform: [1.0e-4, 3.0e-3]}
        model.dropout: {uniform: [0.0, 0.3]}
        model.num_sim_layers: {choice: [1, 2]}

ASHA stops weak trials at epoch boundaries. The best trial's best checkpoint is
exported as a model directory that ``sgmft serve`` and ``sgmft evaluate`` accept.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sgmft.config import Config, ConfigError, apply_overrides, config_from_dict, config_to_dict

DISTRIBUTIONS = ("uniform", "loguniform", "choice", "randint", "grid")
# A trial's driver only waits on its TorchTrainer; Tune needs a non-empty request, so a sliver.
TRIAL_DRIVER_CPU = 0.01


def search_space(space: dict[str, Any]) -> dict[str, Any]:
    """Turn the YAML search space into Tune domains, checking each entry."""
    from ray import tune

    domains = {}
    for key, spec in space.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(f"tune.search_space.{key}: expected one of {list(DISTRIBUTIONS)} mapped to its arguments, got {spec!r}")
        (kind, args), = spec.items()
        if kind in ("uniform", "loguniform", "randint") and not (isinstance(args, list) and len(args) == 2):
            raise ConfigError(f"tune.search_space.{key}: {kind} takes [low, high], got {args!r}")
        if kind in ("choice", "grid") and not (isinstance(args, list) and args):
            raise ConfigError(f"tune.search_space.{key}: {kind} takes a non-empty list, got {args!r}")
        domains[key] = {"uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
                        "randint": lambda a: tune.randint(*a), "choice": tune.choice, "grid": tune.grid_search}[kind](args)
    return domains


def trial_config(base: dict[str, Any], sampled: dict[str, Any]) -> Config:
    """The base config with one trial's sampled values applied (checked like any override)."""
    return config_from_dict(apply_overrides(base, [f"{k}={json.dumps(v)}" for k, v in sampled.items()]))


def _trial_fn(params: dict[str, Any]) -> None:
    """One Tune trial: a full TorchTrainer run whose epoch reports reach Tune."""
    import ray.tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.tune.integration.ray_train import TuneReportCallback

    from sgmft.train import build_trainer, prepare

    sampled = {k: v for k, v in params.items() if not k.startswith("__")}
    if "__variant__" in params:  # an ablation trial: the variant names a set of overrides
        sampled.update(params["__variants__"][params["__variant__"]])
    cfg = trial_config(params["__base__"], sampled)
    cfg.train.run_name = ray.tune.get_context().get_trial_id()
    cfg.train.storage_path = params["__trials_dir__"]
    datasets, loop = prepare(cfg)
    run_config = RunConfig(
        name=cfg.train.run_name, storage_path=params["__trials_dir__"], callbacks=[TuneReportCallback()],
        failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=cfg.train.metric,
                                           checkpoint_score_order=cfg.train.metric_mode),
    )
    build_trainer(cfg, datasets, loop, cpus_per_worker=cfg.tune.cpus_per_worker, run_config=run_config).fit()


def concurrency(cfg: Config) -> int:
    """Trials that fit at once, leaving half the cluster's CPUs to Ray Data preprocessing."""
    import ray

    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    resources = ray.cluster_resources()
    if cfg.train.use_gpu:
        return max(1, int(resources.get("GPU", 0) // cfg.train.num_workers))
    per_trial = cfg.train.num_workers * cfg.tune.cpus_per_worker
    return max(1, int(resources.get("CPU", 1) * 0.5 // per_trial))


@dataclass
class TuneOutcome:
    best_config: Config
    best_metrics: dict[str, Any]
    model_dir: Path
    table: list[dict[str, Any]]
    experiment_dir: Path


def tune(cfg: Config, resume: bool = True) -> TuneOutcome:
    """Run (or resume) the experiment ``train.run_name`` under ``train.storage_path``."""
    from ray import tune as ray_tune
    from ray.tune.schedulers import ASHAScheduler

    if not cfg.tune.search_space:
        raise ConfigError("tune.search_space is empty: name at least one key to search")
    experiment_dir = Path(cfg.train.storage_path).resolve() / cfg.train.run_name
    trials_dir = experiment_dir / "trials"
    trials_dir.mkdir(parents=True, exist_ok=True)
    base = config_to_dict(cfg)
    param_space = {**search_space(cfg.tune.search_space), "__base__": base, "__trials_dir__": str(trials_dir)}
    trial_config(base, {})  # the base config itself must be valid before any trial starts
    scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs, grace_period=cfg.tune.grace_period,
                              reduction_factor=cfg.tune.reduction_factor)
    search_alg = None
    if cfg.tune.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=cfg.train.seed)
    tune_config = ray_tune.TuneConfig(metric=cfg.train.metric, mode=cfg.train.metric_mode, scheduler=scheduler,
                                      search_alg=search_alg, num_samples=cfg.tune.num_samples,
                                      max_concurrent_trials=concurrency(cfg))
    trainable = ray_tune.with_resources(_trial_fn, {"CPU": TRIAL_DRIVER_CPU})
    run_config = ray_tune.RunConfig(name="tune", storage_path=str(experiment_dir), verbose=0)
    if resume and ray_tune.Tuner.can_restore(str(experiment_dir / "tune")):
        tuner = ray_tune.Tuner.restore(str(experiment_dir / "tune"), trainable=trainable, resume_errored=True, param_space=param_space)
    else:
        tuner = ray_tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)
    results = tuner.fit()
    return summarize(results, cfg, experiment_dir, trials_dir)


def summarize(results, cfg: Config, experiment_dir: Path, trials_dir: Path) -> TuneOutcome:
    """Trial table (CSV, Markdown), metric plot, best config and the best model directory."""
    import ray.train

    from sgmft.train import export_best

    metric, mode = cfg.train.metric, cfg.train.metric_mode
    table = []
    for result in results:
        if result.metrics is None:
            continue
        sampled = {k: v for k, v in result.config.items() if not k.startswith("__")}
        row = {"trial": result.metrics.get("trial_id"), **sampled, "epochs": result.metrics.get("epoch"),
               metric: result.metrics.get(metric), "val_macro_f1": result.metrics.get("val_macro_f1"),
               "error": str(result.error)[:200] if result.error else ""}
        table.append(row)
    if not table:
        raise RuntimeError("no trial reported a result")
    best = results.get_best_result(metric=metric, mode=mode, scope="all")
    best_id = best.metrics["trial_id"]
    best_config = trial_config(config_to_dict(cfg), {k: v for k, v in best.config.items() if not k.startswith("__")})
    train_result = ray.train.Result.from_path(str(trials_dir / best_id))
    best_config.train.run_name = best_id  # names the exported model's version after its trial
    model_dir, best_metrics, _ = export_best(train_result, best_config, experiment_dir / "best_model")
    _write_table(table, experiment_dir, metric)
    _plot(results, experiment_dir / "trials.png", metric)
    (experiment_dir / "best_config.json").write_text(json.dumps(config_to_dict(best_config), indent=2, ensure_ascii=False))
    return TuneOutcome(best_config, best_metrics, model_dir, table, experiment_dir)


def _write_table(table: list[dict[str, Any]], directory: Path, metric: str) -> None:
    import csv

    columns = list(dict.fromkeys(k for row in table for k in row))
    with open(directory / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else ("" if v is None else str(v))  # noqa: E731
    rows = sorted(table, key=lambda r: -(r.get(metric) or -1e9))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    (directory / "trials.md").write_text("\n".join(lines) + "\n")


def _plot(results, path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for result in results:
        df = result.metrics_dataframe
        if df is not None and metric in df and "epoch" in df:
            ax.plot(df["epoch"], df[metric], marker="o", label=str(result.metrics.get("trial_id", ""))[-8:])
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title("trials (ASHA stops the weak ones early)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
