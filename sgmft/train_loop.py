"""The Ray Train worker loop of SG-MFT: what every training worker runs, and the
``TorchTrainer`` that runs it (:func:`build_trainer`, on the driver).

Every epoch each worker trains the same number of steps (equal shards, whole batches
only, so DDP never waits on a rank that ran out of data), validation counts are summed
across ranks, and rank 0 reports a checkpoint that is also a model directory plus
``train_state.pt`` (optimizer, scheduler, epoch, RNG, history). A restarted worker group,
or a re-run with the same run name, resumes from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sgmft.checkpoint import TRAIN_STATE, write_model_files
from sgmft.config import Config, config_from_dict
from sgmft.metrics import classification_report
from sgmft.models.outputs import BackboneOutput
from sgmft.progress import Reporter

FEATURE_COLUMNS = ("text_tokens", "text_mask", "image_tokens", "text_embeds", "image_embeds")
HISTORY_KEYS = ("epoch", "train_loss", "val_accuracy", "val_macro_f1", "samples_per_s", "data_wait_share")


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    if "input_ids" in batch:
        return {"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"]}
    return {"features": BackboneOutput(**{k: batch[k] for k in FEATURE_COLUMNS if k in batch})}


def _batches(shard, cfg: Config, epoch: int, device: torch.device, shuffle: bool):
    """A shard's batches on ``device``.

    On a GPU, Ray pins each collated host batch and copies it with ``non_blocking=True``, so
    the copy overlaps queued GPU work; pixels cross as uint8 and are normalised on the device.
    """
    kwargs = dict(batch_size=cfg.data.batch_size, device=device, drop_last=shuffle,
                  prefetch_batches=cfg.data.prefetch_batches, pin_memory=device.type == "cuda")
    if shuffle:
        kwargs.update(local_shuffle_buffer_size=cfg.data.batch_size * 4, local_shuffle_seed=cfg.train.seed + epoch)
    return shard.iter_torch_batches(**kwargs)


def _autocast(cfg: Config, device: torch.device):
    use_bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)


def _maybe_fail(cfg: Config, rank: int, step: int, marker: Path) -> None:
    """Testing hook: kill this worker process once, as a real crash would."""
    if cfg.train.fail_once_at_step is not None and rank == 0 and step == cfg.train.fail_once_at_step and not marker.exists():
        marker.write_text(f"crashed at step {step}\n")
        print(f"[sgmft] fail_once_at_step: worker 0 exits at step {step}", flush=True)
        os._exit(1)


def _save_checkpoint(model, cfg, labels, metrics, state) -> "Any":
    from ray.train import Checkpoint

    directory = Path(tempfile.mkdtemp(prefix="sgmft-ckpt-"))
    write_model_files(directory, model, cfg, labels, metrics)
    torch.save(state, directory / TRAIN_STATE)
    return directory, Checkpoint.from_directory(str(directory))


class RayTrainSession:
    """What the loop asks of whoever runs it; by default Ray Train (a TorchTrainer worker).

    A single-worker Tune trial runs the same loop in its own process with
    :class:`sgmft.trials.TrialSession` instead: no worker group and no process group to start.
    """

    def rank_world(self) -> tuple[int, int]:
        import ray.train

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size()

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def dataset(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)

    def report(self, metrics: dict[str, Any], checkpoint=None, checkpoint_dir_name: str | None = None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name)


@dataclass
class WorkerRun:
    """What one Ray Train worker holds across epochs."""

    cfg: Config
    labels: list[str]
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: torch.nn.Module
    steps_per_epoch: int
    start_epoch: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    progress: Reporter | None = None
    """Rank 0's line to the driver's console (steps and epoch lines); None on other ranks."""
    session: RayTrainSession = field(default_factory=RayTrainSession)

    def say(self, line: str) -> None:
        """A line for the user: printed by the driver when it shows progress, else here."""
        if self.progress is None or not self.progress.message(line):
            print(line, flush=True)


def _restored_state(model: torch.nn.Module, session: RayTrainSession) -> dict[str, Any] | None:
    """Weights into ``model`` and the training state of the run's latest checkpoint, if any."""
    from safetensors.torch import load_model

    checkpoint = session.checkpoint()
    if not checkpoint:
        return None
    with checkpoint.as_directory() as directory:
        load_model(model, str(Path(directory) / "model.safetensors"))
        return torch.load(Path(directory) / TRAIN_STATE, map_location="cpu", weights_only=True)


def setup_worker(loop: dict[str, Any], session: RayTrainSession | None = None) -> WorkerRun:
    """Model on its device, optimizer and schedule (restored when resuming), DDP, loss.

    On cached features (``loop["head_widths"]``) the model is the head alone: no backbone
    is built, and checkpoints hold the head (completed with its backbone on export).
    """
    from sgmft.models.sgmft import SGMFTHeadModel, build_model
    from sgmft.optim import build_optimization

    session = session or RayTrainSession()
    cfg: Config = config_from_dict(loop["config"])
    rank, world = session.rank_world()
    torch.set_num_threads(loop["torch_threads"])
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    device = session.device()
    steps_per_epoch = loop["train_rows"] // world // cfg.data.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{loop['train_rows']} training rows give no full batch of {cfg.data.batch_size} per worker on {world} workers")
    total_updates = math.ceil(steps_per_epoch / cfg.train.grad_accum_steps) * cfg.train.epochs

    if loop.get("head_widths"):
        model = SGMFTHeadModel(cfg.model, **loop["head_widths"])
    else:
        model = build_model(cfg.model, load_pretrained=True)
    state = _restored_state(model, session)
    optimizer, scheduler = build_optimization(model, cfg.train, device, total_updates, state)
    weights = torch.tensor(loop["class_weights"], dtype=torch.float32, device=device) if loop["class_weights"] else None
    run = WorkerRun(cfg=cfg, labels=loop["labels"], rank=rank, world=world, device=device,
                    model=session.prepare_model(model), optimizer=optimizer, scheduler=scheduler,
                    loss_fn=torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.train.label_smoothing),
                    steps_per_epoch=steps_per_epoch, progress=Reporter(loop["run_dir"]) if rank == 0 else None,
                    session=session)
    if state is not None:
        run.start_epoch, run.global_step = state["epoch"] + 1, state["global_step"]
        run.history = json.loads(state["history"])
        torch.set_rng_state(state["rng"])
        if rank == 0:
            run.say(f"resumed from epoch {state['epoch'] + 1} (step {run.global_step})")
    return run


def _accumulation_divisor(step: int, steps_per_epoch: int, accum: int) -> int:
    """Micro-batches in ``step``'s accumulation group; the epoch's last group may be short."""
    group_start = step - step % accum
    return min(accum, steps_per_epoch - group_start)


def train_epoch(run: WorkerRun, shard, epoch: int, marker: Path) -> tuple[float, int, float, float]:
    """One epoch of equal-length steps: (loss sum, samples, seconds waiting for data, seconds)."""
    cfg, model = run.cfg, run.model
    torch.manual_seed(cfg.train.seed * 1000 + epoch * 10 + run.rank)  # dropout RNG: the same on resume
    model.train()
    started, wait_time, loss_sum, seen = time.monotonic(), 0.0, 0.0, 0
    batches = iter(_batches(shard, cfg, epoch, run.device, shuffle=True))
    accum = cfg.train.grad_accum_steps
    # posts across all ranks (every rank runs the same steps of the same batch size)
    per_step, desc = cfg.data.batch_size * run.world, f"epoch {epoch + 1}/{cfg.train.epochs}"
    if run.progress:
        run.progress.update(0, run.steps_per_epoch * per_step, desc, force=True)
    for step in range(run.steps_per_epoch):
        fetch = time.monotonic()
        batch = next(batches)
        wait_time += time.monotonic() - fetch
        _maybe_fail(cfg, run.rank, run.global_step, marker)
        sync = (step + 1) % accum == 0 or step + 1 == run.steps_per_epoch
        context = model.no_sync() if (not sync and hasattr(model, "no_sync")) else contextlib.nullcontext()
        with context, _autocast(cfg, run.device):
            logits = model(**_model_inputs(batch)).logits
            loss = run.loss_fn(logits.float(), batch["label_id"])
        (loss / _accumulation_divisor(step, run.steps_per_epoch, accum)).backward()
        if sync:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach() * len(batch["label_id"])
        seen += len(batch["label_id"])
        run.global_step += 1
        if run.progress:
            run.progress.update((step + 1) * per_step, run.steps_per_epoch * per_step, desc)
    for _ in batches:  # drain what equal splitting left over so the iterator closes cleanly
        pass
    # one host sync per epoch, not per step: .item() in the loop would stall the GPU queue
    return float(loss_sum), seen, wait_time, time.monotonic() - started


def validation_matrix(run: WorkerRun, shard, epoch: int) -> torch.Tensor:
    """This worker's confusion matrix on its validation shard."""
    run.model.eval()
    n = len(run.labels)
    matrix = torch.zeros(n * n, dtype=torch.int64, device=run.device)
    with torch.inference_mode(), _autocast(run.cfg, run.device):
        for batch in _batches(shard, run.cfg, epoch, run.device, shuffle=False):
            predicted = run.model(**_model_inputs(batch)).logits.argmax(-1)
            matrix += torch.bincount(batch["label_id"] * n + predicted, minlength=n * n)
    return matrix.view(n, n)


def _all_reduce(*tensors: torch.Tensor) -> list[torch.Tensor]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        for tensor in tensors:
            dist.all_reduce(tensor)
    return [t.cpu() for t in tensors]


def epoch_metrics(run: WorkerRun, epoch: int, train_stats: tuple[float, int, float, float],
                  matrix: torch.Tensor) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics summed over every rank, and the validation report."""
    totals = torch.tensor(train_stats, dtype=torch.float64, device=run.device)
    matrix, totals = _all_reduce(matrix, totals)
    report = classification_report(matrix.numpy(), run.labels)
    loss_sum, seen, wait_time, train_time = totals.tolist()
    metrics = {
        "epoch": epoch + 1,
        "train_loss": loss_sum / max(seen, 1),
        "val_accuracy": report["accuracy"],
        "val_macro_f1": report["macro_f1"],
        "samples_per_s": seen / (train_time / run.world),
        "data_wait_share": wait_time / max(train_time, 1e-9),
        "global_step": run.global_step,
        **{f"val_f1/{label}": v["f1"] for label, v in report["per_class"].items()},
    }
    return metrics, report


def report_epoch(run: WorkerRun, epoch: int, metrics: dict[str, Any], report: dict[str, Any], started: float) -> None:
    """Rank 0 says the epoch line and reports a checkpoint; the others report metrics only."""
    cfg = run.cfg
    run.history.append({k: metrics[k] for k in HISTORY_KEYS})
    if run.rank != 0:
        run.session.report(metrics, checkpoint=None)
        return
    elapsed = time.monotonic() - started
    remaining = elapsed / (epoch + 1 - run.start_epoch) * (cfg.train.epochs - epoch - 1)
    run.say(f"epoch {epoch + 1}/{cfg.train.epochs}  loss {metrics['train_loss']:.4f}  "
            f"val acc {report['accuracy']:.3f}  macro-F1 {report['macro_f1']:.3f}  "
            f"{metrics['samples_per_s']:.1f} samples/s  data wait {metrics['data_wait_share']:.0%}  ETA {remaining:.0f}s")
    state = {
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(), "epoch": epoch,
        "global_step": run.global_step, "rng": torch.get_rng_state(), "history": json.dumps(run.history),
    }
    directory, ckpt = _save_checkpoint(run.model, cfg, run.labels, {**metrics, "val_report": report}, state)
    run.session.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch-{epoch + 1:04d}")
    shutil.rmtree(directory, ignore_errors=True)


def train_loop_per_worker(loop: dict[str, Any], session: RayTrainSession | None = None) -> None:
    """Runs on every Ray Train worker (or, with a :class:`sgmft.trials.TrialSession`, in a Tune trial)."""
    run = setup_worker(loop, session)
    train_shard, val_shard = run.session.dataset("train"), run.session.dataset("val")
    marker = Path(loop["run_dir"]) / ".fail_once_done"
    started = time.monotonic()
    for epoch in range(run.start_epoch, run.cfg.train.epochs):
        stats = train_epoch(run, train_shard, epoch, marker)
        metrics, report = epoch_metrics(run, epoch, stats, validation_matrix(run, val_shard, epoch))
        report_epoch(run, epoch, metrics, report, started)


def build_trainer(cfg: Config, datasets: dict, loop: dict, cpus_per_worker: float | None = None, run_config=None):
    """A TorchTrainer for ``cfg``; Tune trials pass their own run_config and CPU share."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = cfg.train
    resources = worker_resources(cfg, cpus_per_worker)
    run_config = run_config or RunConfig(
        name=t.run_name,
        storage_path=str(Path(t.storage_path).resolve()),
        failure_config=FailureConfig(max_failures=t.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints, checkpoint_score_attribute=t.metric,
                                           checkpoint_score_order=t.metric_mode),
    )
    # as many intra-op threads as CPUs reserved: more would fight the other workers and trials
    loop = {**loop, "torch_threads": max(1, int(resources["CPU"]))}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=run_config,
        datasets=datasets,
        # one worker reads the whole datasets: no streaming split, so no split-coordinator actor per dataset
        dataset_config=DataConfig(datasets_to_split=[]) if t.num_workers == 1 else None,
    )


def worker_resources(cfg: Config, cpus_per_worker: float | None = None) -> dict[str, float]:
    """What each training worker reserves: its CPUs and, with ``train.use_gpu``, its GPU share."""
    resources = {"CPU": cpus_per_worker if cpus_per_worker is not None else cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = cfg.train.gpus_per_worker
    return resources
