"""Hyper-parameter search with Ray Tune.

The search space is YAML: dotted config keys mapped to a distribution, e.g.

    tune:
      search_space:
        train.lr: {loguniform: [1.0e-4, 3.0e-3]}
        model.dropout: {uniform: [0.0, 0.3]}
        model.num_sim_layers: {choice: [1, 2]}

ASHA stops weak trials at epoch boundaries. The best trial's best checkpoint is
exported as a model directory that ``sgmft serve`` and ``sgmft evaluate`` accept.

The trials themselves (what a search shares, prepared once; one config trained in a Tune
trial) are :mod:`sgmft.trials`, which the ablation grid runs too. Only the best trial's
best checkpoint is exported, on cached features with its frozen backbone.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sgmft.commands import (add_config_args, add_verbose_arg, cluster_name, config_from_args, data_source, print_where,
                            progress_bars, ray_for_command, show_path)
from sgmft.config import Config, ConfigError, config_to_dict
from sgmft.runs import export_trial, run_dir
from sgmft.trials import (TrialSetup, concurrency, fit_search, in_process, run_config, search_setup, trainable,
                          trial_config)

DISTRIBUTIONS = ("uniform", "loguniform", "choice", "randint", "grid")


def search_space(space: dict[str, Any]) -> dict[str, Any]:
    """Turn the YAML search space into Tune domains, checking each entry."""
    from ray import tune

    domains = {}
    for key, spec in space.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(f"tune.search_space.{key}: expected one of {list(DISTRIBUTIONS)} mapped to its arguments, got {spec!r}")
        if key == "train.num_workers":
            raise ConfigError("tune.search_space.train.num_workers: every trial of a search runs the same number of "
                              "workers (it decides what each trial reserves); set train.num_workers instead")
        (kind, args), = spec.items()
        if kind in ("uniform", "loguniform", "randint") and not (isinstance(args, list) and len(args) == 2):
            raise ConfigError(f"tune.search_space.{key}: {kind} takes [low, high], got {args!r}")
        if kind in ("choice", "grid") and not (isinstance(args, list) and args):
            raise ConfigError(f"tune.search_space.{key}: {kind} takes a non-empty list, got {args!r}")
        domains[key] = {"uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
                        "randint": lambda a: tune.randint(*a), "choice": tune.choice, "grid": tune.grid_search}[kind](args)
    return domains


@dataclass
class TuneOutcome:
    best_config: Config
    best_metrics: dict[str, Any]
    model_dir: Path
    table: list[dict[str, Any]]
    experiment_dir: Path
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent preparing the data once (``prepare_s``), running the trials (``trials_s``)
    and summarizing with the export of the best model (``export_s``)."""


def tune(cfg: Config, resume: bool = True) -> TuneOutcome:
    """Run (or resume) the experiment ``train.run_name`` under ``train.storage_path``."""
    from ray import tune as ray_tune
    from ray.tune.schedulers import ASHAScheduler

    if not cfg.tune.search_space:
        raise ConfigError("tune.search_space is empty: name at least one key to search")
    param_space = search_space(cfg.tune.search_space)
    experiment_dir = run_dir(cfg)
    experiment_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    setup = search_setup(cfg)
    prepared = time.monotonic()
    scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs, grace_period=cfg.tune.grace_period,
                              reduction_factor=cfg.tune.reduction_factor)
    search_alg = None
    if cfg.tune.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=cfg.train.seed)
    tune_config = ray_tune.TuneConfig(metric=cfg.train.metric, mode=cfg.train.metric_mode, scheduler=scheduler,
                                      search_alg=search_alg, num_samples=cfg.tune.num_samples,
                                      max_concurrent_trials=concurrency(cfg), reuse_actors=in_process(cfg))
    trial = trainable(cfg, setup)
    if resume and ray_tune.Tuner.can_restore(str(experiment_dir / "tune")):
        tuner = ray_tune.Tuner.restore(str(experiment_dir / "tune"), trainable=trial, resume_errored=True, param_space=param_space)
    else:
        tuner = ray_tune.Tuner(trial, param_space=param_space, tune_config=tune_config, run_config=run_config(cfg, "tune"))
    results = fit_search(tuner, setup)
    finished = time.monotonic()
    outcome = summarize(results, cfg, setup)
    outcome.timings = {"prepare_s": prepared - started, "trials_s": finished - prepared, "export_s": time.monotonic() - finished}
    return outcome


def summarize(results, cfg: Config, setup: TrialSetup) -> TuneOutcome:
    """Trial table (CSV, Markdown), metric plot, best config and the best model directory."""
    metric, mode = cfg.train.metric, cfg.train.metric_mode
    experiment_dir = Path(setup.search_dir)
    table = []
    for result in results:
        if result.metrics is None:
            continue
        row = {"trial": result.metrics.get("trial_id"), **result.config, "epochs": result.metrics.get("epoch"),
               metric: result.metrics.get(metric), "val_macro_f1": result.metrics.get("val_macro_f1"),
               "time_s": result.metrics.get("time_total_s"), **_epoch_times(result.metrics_dataframe),
               "error": str(result.error)[:200] if result.error else ""}
        table.append(row)
    if not table:
        raise RuntimeError("no trial reported a result")
    best = results.get_best_result(metric=metric, mode=mode, scope="all")
    best_id = best.metrics["trial_id"]
    model_dir, best_metrics, _ = export_trial(best, setup.config(best.config, best_id), experiment_dir / "best_model")
    best_config = trial_config(setup.base, setup.overrides(best.config))
    best_config.train.run_name = best_id
    _write_table(table, experiment_dir, metric)
    _plot(results, experiment_dir / "trials.png", metric)
    (experiment_dir / "best_config.json").write_text(json.dumps(config_to_dict(best_config), indent=2, ensure_ascii=False))
    return TuneOutcome(best_config, best_metrics, model_dir, table, experiment_dir)


def _epoch_times(df) -> dict[str, float | None]:
    """Seconds to a trial's first report (its start-up and first epoch) and per later epoch."""
    if df is None or "time_this_iter_s" not in df or df.empty:
        return {"first_epoch_s": None, "epoch_s": None}
    times = df["time_this_iter_s"].tolist()
    return {"first_epoch_s": float(times[0]), "epoch_s": float(sum(times[1:]) / len(times[1:])) if len(times) > 1 else None}


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


# --- the command line ----------------------------------------------------------------------

def cmd_tune(args: argparse.Namespace) -> None:

    cfg = config_from_args(args)
    directory = run_dir(cfg)
    t = cfg.tune
    print(f"SG-MFT tune: {t.num_samples} trials ({t.searcher} search, ASHA) of up to {cfg.train.epochs} epochs over "
          f"{len(t.search_space)} settings, {data_source(cfg)}, on {cluster_name()}", flush=True)
    print_where("experiment directory", directory, directory / "logs", args.verbose)
    with ray_for_command(args, directory / "logs") as console, progress_bars(console, per_run=False):
        outcome = tune(cfg, resume=not args.fresh)
    print((outcome.experiment_dir / "trials.md").read_text())
    print(f"best: {cfg.train.metric} {outcome.best_metrics[cfg.train.metric]:.4f} at epoch {outcome.best_metrics['epoch']}")
    print(f"best model directory: {show_path(outcome.model_dir)}\nall trials: {show_path(outcome.experiment_dir / 'trials.csv')}, "
          f"plot: {show_path(outcome.experiment_dir / 'trials.png')}")


def add_commands(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("tune", help="hyper-parameter search with Ray Tune (ASHA); resumes a run of the same name")
    add_config_args(parser)
    add_verbose_arg(parser)
    parser.add_argument("--fresh", action="store_true", help="start over instead of resuming train.run_name")
    parser.set_defaults(func=cmd_tune)
