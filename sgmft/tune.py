"""Hyper-parameter search with Ray Tune.

The search space is YAML: dotted config keys mapped to a distribution, e.g.

    tune:
      search_space:
        train.lr: {loguniform: [1.0e-4, 3.0e-3]}
        model.dropout: {uniform: [0.0, 0.3]}
        model.num_sim_layers: {choice: [1, 2]}

ASHA stops weak trials at epoch boundaries. The best trial's best checkpoint is
exported as a model directory that ``sgmft serve`` and ``sgmft evaluate`` accept.

A search pays once for what its trials share (:func:`search_setup`): the dataset is
built, read and materialized by the driver before ``tuner.fit()`` and handed to every
trial with ``tune.with_parameters``. A single-worker trial (``train.num_workers: 1``)
runs the worker loop in its own Tune actor (:class:`TrialSession`): no TorchTrainer
controller, worker group, process group or dataset split to start, and Tune reuses the
actor for the next trial; a larger trial runs its own TorchTrainer. On cached features a
trial builds the head alone; only the best trial's best checkpoint is exported, with its
frozen backbone.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sgmft.config import Config, ConfigError, apply_overrides, config_from_dict, config_to_dict
from sgmft.train_loop import RayTrainSession

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


def trial_config(base: dict[str, Any], sampled: dict[str, Any]) -> Config:
    """The base config with one trial's sampled values applied (checked like any override)."""
    return config_from_dict(apply_overrides(base, [f"{k}={json.dumps(v)}" for k, v in sampled.items()]))


@dataclass
class TrialSetup:
    """What every trial of one search shares, handed to :func:`run_trial` once per search
    (``tune.with_parameters`` puts it in the object store once, not once per trial)."""

    base: dict[str, Any]
    """The search's config, as plain data; each trial applies its point of the space to it."""
    search_dir: str
    """The search's run directory; trial ``id`` runs in ``search_dir/trials/<id>``."""
    data: Any = None
    """:class:`sgmft.train.PreparedData`: datasets read and materialized once by the driver,
    used by every trial whose config reads the same data (else the trial prepares its own)."""
    groups: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """Named sets of overrides a trial picks by name, e.g. ``{"variant": {"no_fine":
    {"model.fine_guidance": False}, ...}}`` for the ablation grid."""

    def overrides(self, params: dict[str, Any]) -> dict[str, Any]:
        """A trial's dotted overrides: the sets its group keys name, then its dotted keys."""
        unknown = [k for k in params if "." not in k and k not in self.groups]
        if unknown:
            raise ConfigError(f"trial parameters {unknown} are neither dotted config keys nor groups {list(self.groups)}")
        sampled: dict[str, Any] = {}
        for key, name in params.items():
            if key in self.groups:
                sampled.update(self.groups[key][name])
        sampled.update({k: v for k, v in params.items() if k not in self.groups})
        return sampled

    def config(self, params: dict[str, Any], trial_id: str) -> Config:
        """Trial ``trial_id``'s config, placed in its run directory."""
        from sgmft.runs import place_trial

        return place_trial(trial_config(self.base, self.overrides(params)), Path(self.search_dir), trial_id)


class TrialSession(RayTrainSession):
    """The worker loop's runner inside a single-worker Tune trial: rank 0 of 1 on the
    trial's own device, the search's datasets read whole, Tune's reports and checkpoints."""

    def __init__(self, datasets: dict[str, Any], device):
        self.datasets = datasets
        self._device = device

    def rank_world(self) -> tuple[int, int]:
        return 0, 1

    def device(self):
        return self._device

    def prepare_model(self, model):
        return model.to(self._device)

    def checkpoint(self):
        import ray.tune

        return ray.tune.get_checkpoint()

    def dataset(self, name: str):
        return self.datasets[name]

    def report(self, metrics: dict[str, Any], checkpoint=None, checkpoint_dir_name: str | None = None) -> None:
        import ray.tune

        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(checkpoint.path) if checkpoint else None)


def in_process(cfg: Config) -> bool:
    """Whether a trial of ``cfg`` runs the worker loop in its own Tune actor (one worker)."""
    return cfg.train.num_workers == 1


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """One Tune trial: train ``setup.base`` at the point ``params``, reporting each epoch to Tune.

    ``params`` is what Tune samples: dotted config keys to values (``{"train.lr": 3e-4}``),
    and, for a key of ``setup.groups``, the name of one of its override sets
    (``{"variant": "no_fine"}``). The trial runs in ``<search_dir>/trials/<trial id>`` on
    ``setup.data`` when its config reads the same data (:func:`sgmft.train.data_key`). With
    one worker the loop runs here, its checkpoints reported to Tune; with more, a
    TorchTrainer runs it and keeps them in the trial's run directory
    (:func:`sgmft.runs.trial_result` finds them either way). Use it through
    :func:`trainable`, which adds the setup and each trial's resources.
    """
    import ray.tune
    import torch

    from sgmft.train import build_trainer, data_key, loop_config, prepare_data
    from sgmft.train_loop import train_loop_per_worker

    cfg = setup.config(params, ray.tune.get_context().get_trial_id())
    data = setup.data if setup.data is not None and setup.data.key == data_key(cfg) else prepare_data(cfg)
    loop = loop_config(cfg, data)
    Path(loop["run_dir"]).mkdir(parents=True, exist_ok=True)
    if in_process(cfg):
        loop["torch_threads"] = max(1, int(cfg.tune.cpus_per_worker))
        train_loop_per_worker(loop, TrialSession(data.datasets, torch.device("cuda" if cfg.train.use_gpu else "cpu")))
        return
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.tune.integration.ray_train import TuneReportCallback

    run_config = RunConfig(
        name=cfg.train.run_name, storage_path=cfg.train.storage_path, callbacks=[TuneReportCallback()],
        failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=cfg.train.metric,
                                           checkpoint_score_order=cfg.train.metric_mode),
    )
    build_trainer(cfg, data.datasets, loop, cpus_per_worker=cfg.tune.cpus_per_worker, run_config=run_config).fit()


def trainable(cfg: Config, setup: TrialSetup):
    """:func:`run_trial` with the search's setup and what each trial reserves: the worker's
    CPUs and GPU share when the loop runs in the trial, a sliver when a TorchTrainer does."""
    from ray import tune as ray_tune

    from sgmft.train import worker_resources

    resources = worker_resources(cfg, cfg.tune.cpus_per_worker) if in_process(cfg) else {"CPU": TRIAL_DRIVER_CPU}
    return ray_tune.with_resources(ray_tune.with_parameters(run_trial, setup=setup), resources)


def search_setup(cfg: Config, groups: dict[str, dict[str, dict[str, Any]]] | None = None) -> TrialSetup:
    """Everything trials share, done once before the first: the dataset (the synthetic
    default is built once, in the search's run directory), read and materialized."""
    from sgmft.runs import resolve_dataset, run_dir
    from sgmft.train import prepare_data

    if not cfg.train.features_path:
        cfg.data.path = str(resolve_dataset(cfg))
    data = prepare_data(cfg)
    cfg.model.num_labels = len(data.labels)
    setup = TrialSetup(base=config_to_dict(cfg), search_dir=str(run_dir(cfg)), data=data, groups=groups or {})
    trial_config(setup.base, {})  # the base config itself must be valid before any trial starts
    return setup


def run_config(cfg: Config, name: str):
    """The Tuner's RunConfig: trial retries and best-checkpoint retention for in-trial loops."""
    from ray import tune as ray_tune

    from sgmft.runs import run_dir

    return ray_tune.RunConfig(
        name=name, storage_path=str(run_dir(cfg)), verbose=0,
        failure_config=ray_tune.FailureConfig(max_failures=cfg.train.max_failures if in_process(cfg) else 0),
        checkpoint_config=ray_tune.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=cfg.train.metric,
                                                    checkpoint_score_order=cfg.train.metric_mode))


def concurrency(cfg: Config) -> int:
    """Trials that fit at once: half the cluster's CPUs (the rest for Ray Data) and, with
    ``train.use_gpu``, its GPUs, each worker taking ``train.gpus_per_worker`` of one."""
    import ray

    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    resources = ray.cluster_resources()
    t = cfg.train
    fit = max(1, int(resources.get("CPU", 1) * 0.5 // (t.num_workers * cfg.tune.cpus_per_worker)))
    if t.use_gpu:
        fit = min(fit, max(1, int(resources.get("GPU", 0) / (t.num_workers * t.gpus_per_worker) + 1e-9)))
    return fit


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

    from sgmft.runs import run_dir

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
    results = tuner.fit()
    finished = time.monotonic()
    outcome = summarize(results, cfg, setup)
    outcome.timings = {"prepare_s": prepared - started, "trials_s": finished - prepared, "export_s": time.monotonic() - finished}
    return outcome


def summarize(results, cfg: Config, setup: TrialSetup) -> TuneOutcome:
    """Trial table (CSV, Markdown), metric plot, best config and the best model directory."""
    from sgmft.runs import export_trial

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
