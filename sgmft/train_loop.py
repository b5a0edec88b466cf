"""The Ray Train worker loop: what every training worker runs, and the ``TorchTrainer`` that
runs it (:func:`build_trainer`, on the driver).

Every epoch each worker trains the same number of steps (equal shards, whole batches
only, so DDP never waits on a rank that ran out of data) with :func:`train_step`, watched for
a loss that stops being finite; validation is summed across ranks, and rank 0 reports a
checkpoint that is also a model directory plus ``train_state.pt`` (optimizer, scheduler,
epoch, RNG, history). A restarted worker group, or a re-run with the same run name, resumes
from the latest checkpoint. The task is SG-MFT's classification by default; contrastive
pretraining (:mod:`sgmft.pretrain`) passes its own model, loss and validation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from sgmft.model_dir import TRAIN_STATE, write_model_files
from sgmft.config import Config
from sgmft.classification import classification_report
from sgmft.models.outputs import BackboneOutput
from sgmft.progress import Reporter
from sgmft.worker_spec import WorkerSpec

FEATURE_COLUMNS = ("text_tokens", "text_mask", "image_tokens", "text_embeds", "image_embeds")
DIVERGENCE_CHECK_EVERY = 16
"""Steps between the ranks' checks of the loss (each waits for a GPU's queue to drain and is a
collective); the step that went bad is recorded on the device, so it is named all the same."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the run stops instead of training on garbage."""


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


def _save_checkpoint(run: "WorkerRun", metrics: dict[str, Any], state: dict[str, Any], name: str) -> "Any":
    from ray.train import Checkpoint

    directory = run.session.staging_dir(run.run_dir, name)
    write_model_files(directory, run.model, run.cfg, run.labels, metrics)
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

    def staging_dir(self, run_dir: str, name: str) -> Path:
        """An empty folder to write checkpoint ``name`` in before reporting it, on this node's
        disk (removed once the report returns): Ray Train copies it to the run's storage."""
        return Path(tempfile.mkdtemp(prefix="sgmft-ckpt-"))

    def dataset(self, name: str):
        import ray.train

        return ray.train.get_dataset_shard(name)

    def report(self, metrics: dict[str, Any], checkpoint=None, checkpoint_dir_name: str | None = None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name)

    def stop_diverged(self, message: str) -> None:
        """End the run for good. A worker error would be retried from the last checkpoint
        (``train.max_failures``) and diverge again, so every rank reports the reason and
        returns; the driver raises it (:func:`raise_if_diverged`)."""
        self.report({DIVERGED: message})


DIVERGED = "diverged"
"""The metric a run that diverged reports last: the message of its :class:`TrainingDiverged`."""


def raise_if_diverged(result: Any) -> None:
    """On the driver: raise the :class:`TrainingDiverged` a finished Ray Train run reported."""
    if result.metrics and DIVERGED in result.metrics:
        raise TrainingDiverged(result.metrics[DIVERGED])


class LossWatch:
    """The first step whose loss or gradient norm was not finite, and the last finite loss.

    Kept on the loss's device with tensor ops, so a GPU step never waits for the host; the
    ranks compare notes every :data:`DIVERGENCE_CHECK_EVERY` steps and at the epoch's end.
    """

    def __init__(self, device: torch.device):
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.last_loss = torch.full((), float("nan"), dtype=torch.float32, device=device)
        self.last_step = torch.full((), -1, dtype=torch.int64, device=device)

    def observe(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        finite = torch.isfinite(loss) if grad_norm is None else torch.isfinite(loss) & torch.isfinite(grad_norm)
        healthy = self.bad_step < 0
        self.bad_step = torch.where(healthy & ~finite, step, self.bad_step)
        keep = healthy & finite
        self.last_loss = torch.where(keep, loss.detach().float(), self.last_loss)
        self.last_step = torch.where(keep, step, self.last_step)

    def check(self, epoch: int, lr: float) -> None:
        """Raise :class:`TrainingDiverged` on every rank when any rank saw a non-finite step."""
        (any_bad,) = _all_reduce((self.bad_step >= 0).to(torch.int64), op="max")
        if not any_bad.item():
            return
        bad, last_loss, last_step = int(self.bad_step), float(self.last_loss), int(self.last_step)
        where = f"at step {bad}" if bad >= 0 else "on another worker"
        raise TrainingDiverged(
            f"training diverged in epoch {epoch + 1}: the loss or gradient norm became non-finite {where}; "
            f"last finite loss {last_loss:.4g} at step {last_step} (learning rate {lr:.3g}). "
            "Lower train.lr (and train.backbone_lr), lengthen train.warmup_ratio or keep train.max_grad_norm on.")


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
    loss_fn: LossFn
    steps_per_epoch: int
    run_dir: str
    start_epoch: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    progress: Reporter | None = None
    """Rank 0's line to the driver's console (steps and epoch lines); None on other ranks."""
    session: RayTrainSession = field(default_factory=RayTrainSession)
    setup_s: float = 0.0
    """Seconds :func:`setup_worker` took (model built, state restored, DDP): reported with the
    first epoch this worker process runs, as part of a (re)started worker's time to first step."""

    def say(self, line: str) -> None:
        """A line for the user: printed by the driver when it shows progress, else here."""
        if self.progress is None or not self.progress.message(line):
            print(line, flush=True)

    def lr(self) -> float:
        """The highest learning rate in effect (the head's)."""
        return max(self.scheduler.get_last_lr())


def train_state(run: WorkerRun, epoch: int) -> dict[str, Any]:
    """What a checkpoint holds besides the model: enough to resume exactly after ``epoch``."""
    return {
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(), "epoch": epoch,
        "global_step": run.global_step, "rng": torch.get_rng_state(), "history": json.dumps(run.history),
    }


def restore_state(run: WorkerRun, state: dict[str, Any]) -> None:
    """Position ``run`` after the checkpointed epoch (its weights, optimizer and schedule are
    restored by :func:`setup_worker` before DDP wraps the model)."""
    run.start_epoch, run.global_step = state["epoch"] + 1, state["global_step"]
    run.history = json.loads(state["history"])
    torch.set_rng_state(state["rng"])


def _restored_state(model: torch.nn.Module, session: RayTrainSession) -> dict[str, Any] | None:
    """Weights into ``model`` and the training state of the run's latest checkpoint, if any."""
    from safetensors.torch import load_model

    checkpoint = session.checkpoint()
    if not checkpoint:
        return None
    with checkpoint.as_directory() as directory:
        load_model(model, str(Path(directory) / "model.safetensors"))
        return torch.load(Path(directory) / TRAIN_STATE, map_location="cpu", weights_only=True)


def sgmft_task(spec: WorkerSpec) -> tuple[torch.nn.Module, LossFn]:
    """SG-MFT and its classification loss. On cached features (``spec.head_widths``) the model
    is the head alone: no backbone is built, and checkpoints hold the head (completed with
    its backbone on export)."""
    from sgmft.models.model import SGMFTHeadModel, build_model

    cfg = spec.config
    model = SGMFTHeadModel(cfg.model, **spec.head_widths) if spec.head_widths else build_model(cfg.model, load_pretrained=True)
    weights = torch.tensor(spec.class_weights, dtype=torch.float32) if spec.class_weights else None
    return model, ClassificationLoss(torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.train.label_smoothing))


def setup_worker(spec: WorkerSpec, session: RayTrainSession | None = None,
                 task: Callable[[WorkerSpec], tuple[torch.nn.Module, LossFn]] = sgmft_task) -> WorkerRun:
    """The ``task``'s model on its device with its loss, optimizer and schedule (restored when
    resuming), wrapped for DDP."""
    from sgmft.optim import build_optimization

    started = time.monotonic()
    session = session or RayTrainSession()
    cfg = spec.config
    rank, world = session.rank_world()
    torch.set_num_threads(spec.torch_threads)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    device = session.device()
    steps_per_epoch = spec.train_rows // world // cfg.data.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{spec.train_rows} training rows give no full batch of {cfg.data.batch_size} per worker on {world} workers")
    total_updates = math.ceil(steps_per_epoch / cfg.train.grad_accum_steps) * cfg.train.epochs

    model, loss_fn = task(spec)
    state = _restored_state(model, session)
    optimizer, scheduler = build_optimization(model, cfg.train, device, total_updates, state)
    if isinstance(getattr(loss_fn, "criterion", None), torch.nn.Module):
        loss_fn.criterion.to(device)  # class weights sit with the logits
    run = WorkerRun(cfg=cfg, labels=spec.labels, rank=rank, world=world, device=device,
                    model=session.prepare_model(model), optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn,
                    steps_per_epoch=steps_per_epoch, run_dir=spec.run_dir,
                    progress=Reporter(spec.run_dir) if rank == 0 else None,
                    session=session)
    if state is not None:
        restore_state(run, state)
        if rank == 0:
            run.say(f"resumed from epoch {state['epoch'] + 1} (step {run.global_step})")
    run.setup_s = time.monotonic() - started
    return run


def _accumulation_divisor(step: int, steps_per_epoch: int, accum: int) -> int:
    """Micro-batches in ``step``'s accumulation group; the epoch's last group may be short."""
    group_start = step - step % accum
    return min(accum, steps_per_epoch - group_start)


class ClassificationLoss:
    """SG-MFT's loss: ``criterion`` (cross-entropy) of the model's logits against ``label_id``."""

    def __init__(self, criterion: torch.nn.Module):
        self.criterion = criterion

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.criterion(model(**_model_inputs(batch)).logits.float(), batch["label_id"])


LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]
"""A batch's loss under a model: :class:`ClassificationLoss`, or contrastive pretraining's."""


def train_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], loss_fn: LossFn,
               optimizer: torch.optim.Optimizer, scheduler: Any, *, autocast: Any, max_grad_norm: float,
               loss_scale: float = 1.0, update: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One training step: forward and ``loss_fn``, backward and, when ``update``, gradient
    clipping, the optimizer and the schedule. Returns the (detached) loss and, after an
    update, the gradient norm before clipping; neither is read back to the host here.

    ``loss_scale`` divides the loss of a micro-batch under gradient accumulation, whose
    non-final steps pass ``update=False`` (and run under DDP's ``no_sync``).
    """
    with autocast:
        loss = loss_fn(model, batch)
    (loss / loss_scale).backward()
    grad_norm = None
    if update:
        # inf disables clipping but still measures the norm the epoch line reports
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm


@dataclass
class EpochStats:
    """One worker's sums over an epoch, all-reduced into the epoch's metrics."""

    loss_sum: float = 0.0
    seen: int = 0
    wait_s: float = 0.0
    seconds: float = 0.0
    grad_norm_sum: float = 0.0
    updates: int = 0
    first_step_s: float = 0.0
    """The epoch's first step, data wait included: where a new worker's CUDA context, kernel
    loading and first allocations land."""

    def tensor(self, device: torch.device) -> torch.Tensor:
        return torch.tensor([self.loss_sum, self.seen, self.wait_s, self.seconds, self.grad_norm_sum, self.updates,
                             self.first_step_s], dtype=torch.float64, device=device)


def train_epoch(run: WorkerRun, shard, epoch: int, marker: Path) -> EpochStats:
    """One epoch of equal-length steps; stops with :class:`TrainingDiverged` on a non-finite step."""
    cfg, model = run.cfg, run.model
    torch.manual_seed(cfg.train.seed * 1000 + epoch * 10 + run.rank)  # dropout RNG: the same on resume
    model.train()
    stats, started = EpochStats(), time.monotonic()
    loss_sum, grad_sum = torch.zeros((), device=run.device), torch.zeros((), device=run.device)
    watch = LossWatch(run.device)
    batches = iter(_batches(shard, cfg, epoch, run.device, shuffle=True))
    accum = cfg.train.grad_accum_steps
    # posts across all ranks (every rank runs the same steps of the same batch size)
    per_step, desc = cfg.data.batch_size * run.world, f"epoch {epoch + 1}/{cfg.train.epochs}"
    if run.progress:
        run.progress.update(0, run.steps_per_epoch * per_step, desc, force=True)
    for step in range(run.steps_per_epoch):
        fetch = time.monotonic()
        batch = next(batches)
        stats.wait_s += time.monotonic() - fetch
        _maybe_fail(cfg, run.rank, run.global_step, marker)
        update = (step + 1) % accum == 0 or step + 1 == run.steps_per_epoch
        context = model.no_sync() if (not update and hasattr(model, "no_sync")) else contextlib.nullcontext()
        with context:
            loss, grad_norm = train_step(model, batch, run.loss_fn, run.optimizer, run.scheduler,
                                         autocast=_autocast(cfg, run.device), max_grad_norm=cfg.train.max_grad_norm,
                                         loss_scale=_accumulation_divisor(step, run.steps_per_epoch, accum), update=update)
        watch.observe(run.global_step, loss, grad_norm)
        rows = len(next(iter(batch.values())))
        loss_sum += loss * rows
        if grad_norm is not None:
            grad_sum += grad_norm.float()
            stats.updates += 1
        stats.seen += rows
        run.global_step += 1
        if step == 0:
            stats.first_step_s = time.monotonic() - started
        if (step + 1) % DIVERGENCE_CHECK_EVERY == 0:
            watch.check(epoch, run.lr())
        if run.progress:
            run.progress.update((step + 1) * per_step, run.steps_per_epoch * per_step, desc)
    watch.check(epoch, run.lr())
    for _ in batches:  # drain what equal splitting left over so the iterator closes cleanly
        pass
    # one host sync per epoch, not per step: .item() in the loop would stall the GPU queue
    stats.loss_sum, stats.grad_norm_sum = float(loss_sum), float(grad_sum)
    stats.seconds = time.monotonic() - started
    return stats


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


def _all_reduce(*tensors: torch.Tensor, op: str = "sum") -> list[torch.Tensor]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return [t.cpu() for t in tensors]


def collapsed_to(matrix: Any, labels: list[str]) -> str | None:
    """The one label every validation prediction went to, when a model predicts nothing else."""
    predicted = [i for i, count in enumerate(matrix.sum(axis=0).tolist()) if count > 0]
    return labels[predicted[0]] if len(labels) > 1 and len(predicted) == 1 and matrix.sum() > 1 else None


def training_metrics(run: WorkerRun, epoch: int, stats: EpochStats) -> dict[str, Any]:
    """An epoch's training figures, summed over every rank."""
    (totals,) = _all_reduce(stats.tensor(run.device))
    loss_sum, seen, wait_s, seconds, grad_sum, updates, first_step_s = totals.tolist()
    seconds, first_step_s = seconds / run.world, first_step_s / run.world  # per worker: they run side by side
    first_batch = run.cfg.data.batch_size * run.world
    return {
        "epoch": epoch + 1,
        "train_loss": loss_sum / max(seen, 1),
        "samples_per_s": seen / seconds,
        "steady_samples_per_s": (seen - first_batch) / (seconds - first_step_s) if seen > first_batch else seen / seconds,
        "first_step_s": first_step_s,
        "setup_s": run.setup_s if epoch == run.start_epoch else 0.0,
        "data_wait_share": wait_s / max(seconds * run.world, 1e-9),
        "grad_norm": grad_sum / max(updates, 1),
        "lr": run.lr(),
        "global_step": run.global_step,
    }


def classification_metrics(run: WorkerRun, epoch: int, val_shard) -> tuple[dict[str, Any], dict[str, Any]]:
    """SG-MFT's validation: accuracy, macro-F1, per-class F1 and a one-class collapse, and the report."""
    (matrix,) = _all_reduce(validation_matrix(run, val_shard, epoch))
    report = classification_report(matrix.numpy(), run.labels)
    metrics = {"val_accuracy": report["accuracy"], "val_macro_f1": report["macro_f1"],
               "collapsed": collapsed_to(matrix.numpy(), run.labels),
               **{f"val_f1/{label}": v["f1"] for label, v in report["per_class"].items()}}
    return metrics, {"val_report": report}


def epoch_line(metrics: dict[str, Any], epochs: int, eta_s: float) -> str:
    """The console's line for an epoch (its validation figures: those named ``val_*`` without a
    ``/``), with a warning when the model predicts one class."""
    shown = "  ".join(f"{key.removeprefix('val_').replace('_', ' ')} {value:.3f}" for key, value in metrics.items()
                      if key.startswith("val_") and "/" not in key)
    line = (f"epoch {metrics['epoch']}/{epochs}  loss {metrics['train_loss']:.4f}  val {shown}  "
            f"grad norm {metrics['grad_norm']:.3g}  lr {metrics['lr']:.2e}  "
            f"{metrics['samples_per_s']:.1f} samples/s  data wait {metrics['data_wait_share']:.0%}  ETA {eta_s:.0f}s")
    if metrics.get("collapsed") is not None:
        line += f"\n  warning: every validation post was predicted as {metrics['collapsed']!r} (the model has collapsed to one class)"
    return line


def report_epoch(run: WorkerRun, epoch: int, metrics: dict[str, Any], extra: dict[str, Any], started: float) -> None:
    """Rank 0 says the epoch line and reports a checkpoint (its metrics.json with ``extra``, such
    as the validation report); the others report metrics only."""
    cfg = run.cfg
    run.history.append({k: v for k, v in metrics.items() if "/" not in k})
    if run.rank != 0:
        run.session.report(metrics, checkpoint=None)
        return
    elapsed = time.monotonic() - started
    run.say(epoch_line(metrics, cfg.train.epochs, elapsed / (epoch + 1 - run.start_epoch) * (cfg.train.epochs - epoch - 1)))
    name = f"epoch-{epoch + 1:04d}"
    directory, ckpt = _save_checkpoint(run, {**metrics, **extra}, train_state(run, epoch), name)
    run.session.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)
    shutil.rmtree(directory, ignore_errors=True)


Validation = Callable[[WorkerRun, int, Any], tuple[dict[str, Any], dict[str, Any]]]
"""A task's validation of an epoch: (its ``val_*`` metrics, what else its checkpoint's metrics.json keeps)."""


def run_worker(spec: WorkerSpec, session: RayTrainSession | None = None,
               task: Callable[[WorkerSpec], tuple[torch.nn.Module, LossFn]] = sgmft_task,
               validation: Validation = classification_metrics) -> None:
    """What every Ray Train worker (or, with a :class:`sgmft.trials.TrialSession`, a Tune trial)
    runs: SG-MFT by default, or another ``task`` with its ``validation`` (pretraining)."""
    run = setup_worker(spec, session, task)
    train_shard, val_shard = run.session.dataset("train"), run.session.dataset("val")
    marker = Path(spec.run_dir) / ".fail_once_done"
    started = time.monotonic()
    for epoch in range(run.start_epoch, run.cfg.train.epochs):
        try:
            stats = train_epoch(run, train_shard, epoch, marker)
        except TrainingDiverged as exc:
            run.say(str(exc))
            run.session.stop_diverged(str(exc))
            return
        metrics = training_metrics(run, epoch, stats)
        val_metrics, extra = validation(run, epoch, val_shard)
        report_epoch(run, epoch, {**metrics, **val_metrics}, extra, started)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's entry point: ``train_loop_config`` carries the :class:`WorkerSpec` as ``spec``,
    and for another task than SG-MFT its ``task`` and ``validation`` (see :func:`run_worker`)."""
    run_worker(**loop_config)


def build_trainer(spec: WorkerSpec, datasets: dict, cpus_per_worker: float | None = None, run_config=None,
                  **task: Any):
    """A TorchTrainer that runs :func:`run_worker` on ``spec`` (and ``task``: its ``task`` and
    ``validation``, for pretraining); Tune trials pass their own run_config and CPU share."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = spec.config.train
    resources = worker_resources(spec.config, cpus_per_worker)
    run_config = run_config or RunConfig(
        name=t.run_name,
        storage_path=str(Path(t.storage_path).resolve()),
        failure_config=FailureConfig(max_failures=t.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints, checkpoint_score_attribute=t.metric,
                                           checkpoint_score_order=t.metric_mode),
    )
    # as many intra-op threads as CPUs reserved: more would fight the other workers and trials
    spec = dataclasses.replace(spec, torch_threads=max(1, int(resources["CPU"])))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec, **task},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=run_config,
        datasets=datasets,
        dataset_config=_dataset_config(t.num_workers),
    )


def _dataset_config(num_workers: int):
    """How Ray Train hands the datasets to the workers: in order, so that a seed gives the same
    batches on every run and a resumed epoch replays them (Ray Train's default ingest options
    let blocks arrive in whatever order they come, which changed the first epoch's loss between
    two runs of the same seed); one worker reads the whole datasets (no streaming split, so no
    split-coordinator actor per dataset)."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(datasets_to_split=[] if num_workers == 1 else "all", execution_options=options)


def worker_resources(cfg: Config, cpus_per_worker: float | None = None) -> dict[str, float]:
    """What each training worker reserves: its CPUs and, with ``train.use_gpu``, its GPU share."""
    resources = {"CPU": cpus_per_worker if cpus_per_worker is not None else cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = cfg.train.gpus_per_worker
    return resources
