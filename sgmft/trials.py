"""Trials: one config trained inside a Ray Tune trial, for every search (tune, ablate).

A search pays once for what its trials share (:func:`search_setup`): the dataset is
built, read and materialized by the driver before ``tuner.fit()`` and handed to every
trial with ``tune.with_parameters`` (:class:`TrialSetup`). A trial (:func:`run_trial`,
through :func:`trainable`) applies its point of the search to the search's config, runs
in its own run directory and reports every epoch to Tune. A single-worker trial
(``train.num_workers: 1``) runs the worker loop in its own Tune actor
(:class:`TrialSession`): no TorchTrainer controller, worker group, process group or
dataset split to start, and Tune reuses the actor for the next trial; a larger trial runs
its own TorchTrainer. On cached features a trial builds the head alone.

What a search does with its trials (ASHA over a search space, the ablation grid) is the
workflow's own: :mod:`sgmft.tune`, :mod:`sgmft.ablate`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sgmft.config import Config, ConfigError, apply_overrides, config_from_dict, config_to_dict
from sgmft.runs import TRIALS, data_key, place_trial, prepare_data, resolve_dataset, run_dir, worker_spec
from sgmft.train_loop import (RayTrainSession, TrainingDiverged, build_trainer, raise_if_diverged, run_worker,
                              worker_resources)

# A trial's driver only waits on its TorchTrainer; Tune needs a non-empty request, so a sliver.
TRIAL_DRIVER_CPU = 0.01
STAGING = ".staging"
"""The folder of a trial's run directory where it writes a checkpoint before reporting it."""


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
    """:class:`sgmft.runs.PreparedData`: datasets read and materialized once by the driver,
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

    def staging_dir(self, run_dir: str, name: str) -> Path:
        """In the trial's run directory, not the node's temporary folder: a trial's last report
        never returns (Tune ends the trial while the report waits for its next turn), so what
        follows it never runs, and every trial left a temporary checkpoint behind (25 MB for
        ``tiny``). :func:`fit_search` removes these once the search is over."""
        directory = Path(run_dir) / STAGING / name
        shutil.rmtree(directory, ignore_errors=True)  # a retried trial's unfinished write
        directory.mkdir(parents=True)
        return directory

    def dataset(self, name: str):
        return self.datasets[name]

    def report(self, metrics: dict[str, Any], checkpoint=None, checkpoint_dir_name: str | None = None) -> None:
        import ray.tune

        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(checkpoint.path) if checkpoint else None)

    def stop_diverged(self, message: str) -> None:
        """A trial that diverged is an errored trial: Tune records it and the search goes on."""
        raise TrainingDiverged(message)


def in_process(cfg: Config) -> bool:
    """Whether a trial of ``cfg`` runs the worker loop in its own Tune actor (one worker)."""
    return cfg.train.num_workers == 1


def run_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """One Tune trial: train ``setup.base`` at the point ``params``, reporting each epoch to Tune.

    ``params`` is what Tune samples: dotted config keys to values (``{"train.lr": 3e-4}``),
    and, for a key of ``setup.groups``, the name of one of its override sets
    (``{"variant": "no_fine"}``). The trial runs in ``<search_dir>/trials/<trial id>`` on
    ``setup.data`` when its config reads the same data (:func:`sgmft.runs.data_key`). With
    one worker the loop runs here, its checkpoints reported to Tune; with more, a
    TorchTrainer runs it and keeps them in the trial's run directory
    (:func:`sgmft.runs.trial_result` finds them either way). Use it through
    :func:`trainable`, which adds the setup and each trial's resources.
    """
    import ray.tune
    import torch

    cfg = setup.config(params, ray.tune.get_context().get_trial_id())
    data = setup.data if setup.data is not None and setup.data.key == data_key(cfg) else prepare_data(cfg)
    spec = worker_spec(cfg, data)
    Path(spec.run_dir).mkdir(parents=True, exist_ok=True)
    if in_process(cfg):
        spec.torch_threads = max(1, int(cfg.tune.cpus_per_worker))
        run_worker(spec, TrialSession(data.datasets, torch.device("cuda" if cfg.train.use_gpu else "cpu")))
        return
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.tune.integration.ray_train import TuneReportCallback

    from sgmft.run_watch import RunWatch

    run_config = RunConfig(
        name=cfg.train.run_name, storage_path=cfg.train.storage_path, callbacks=[TuneReportCallback(), RunWatch(spec.run_dir)],
        failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=cfg.train.metric,
                                           checkpoint_score_order=cfg.train.metric_mode),
    )
    raise_if_diverged(build_trainer(spec, data.datasets, cpus_per_worker=cfg.tune.cpus_per_worker, run_config=run_config).fit())


def trainable(cfg: Config, setup: TrialSetup):
    """:func:`run_trial` with the search's setup and what each trial reserves: the worker's
    CPUs and GPU share when the loop runs in the trial, a sliver when a TorchTrainer does."""
    from ray import tune as ray_tune

    resources = worker_resources(cfg, cfg.tune.cpus_per_worker) if in_process(cfg) else {"CPU": TRIAL_DRIVER_CPU}
    return ray_tune.with_resources(ray_tune.with_parameters(run_trial, setup=setup), resources)


def search_setup(cfg: Config, groups: dict[str, dict[str, dict[str, Any]]] | None = None) -> TrialSetup:
    """Everything trials share, done once before the first: the dataset (the synthetic
    default is built once, in the search's run directory), read and materialized."""
    if not cfg.train.features_path:
        cfg.data.path = str(resolve_dataset(cfg))
    data = prepare_data(cfg)
    cfg.model.num_labels = len(data.labels)
    setup = TrialSetup(base=config_to_dict(cfg), search_dir=str(run_dir(cfg)), data=data, groups=groups or {})
    trial_config(setup.base, {})  # the base config itself must be valid before any trial starts
    return setup


def fit_search(tuner, setup: TrialSetup):
    """``tuner.fit()``, then the checkpoints its trials' last reports left staged removed
    (:data:`STAGING`): Tune keeps its own copies."""
    try:
        return tuner.fit()
    finally:
        for staged in (Path(setup.search_dir) / TRIALS).glob(f"*/{STAGING}"):
            shutil.rmtree(staged, ignore_errors=True)


def run_config(cfg: Config, name: str):
    """The Tuner's RunConfig: trial retries and best-checkpoint retention for in-trial loops."""
    from ray import tune as ray_tune

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
