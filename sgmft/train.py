"""Distributed training of SG-MFT: Ray Train (TorchTrainer, DDP) fed by Ray Data shards.

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

import numpy as np
import torch

from sgmft.checkpoint import METRICS, TRAIN_FILES, write_model_files
from sgmft.config import Config, config_from_dict, config_to_dict
from sgmft.metrics import classification_report, confusion_matrix
from sgmft.models.backbone import BackboneOutput

TRAIN_STATE = "train_state.pt"
FEATURE_COLUMNS = ("text_tokens", "text_mask", "image_tokens", "text_embeds", "image_embeds")


@dataclass
class TrainOutcome:
    model_dir: Path
    best: dict[str, Any]
    history: list[dict[str, Any]]
    run_path: str
    dataset_dir: Path | None = None
    test: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)


def run_dir(cfg: Config) -> Path:
    return Path(cfg.train.storage_path).resolve() / cfg.train.run_name


def resolve_dataset(cfg: Config) -> Path:
    """The configured dataset, or the synthetic default built once inside the run directory."""
    if cfg.data.path:
        path = Path(cfg.data.path)
        if not path.is_dir():
            raise FileNotFoundError(f"data.path {path} does not exist")
        return path
    from sgmft.data.synth import synthesize

    s = cfg.data.synth
    path = run_dir(cfg) / f"synthetic-n{s.n}-seed{s.seed}-t{s.text_noise}-i{s.image_noise}-s{s.image_swap}-px{s.image_size}"
    if not (path / "labels.json").is_file():
        synthesize(path, n=s.n, seed=s.seed, text_noise=s.text_noise, image_noise=s.image_noise,
                   image_swap=s.image_swap, image_size=s.image_size)
    return path


def _parquet_files(directory: Path, split: str) -> list[Path]:
    """A split's Parquet files, in a dataset directory or a feature cache (partitioned by split)."""
    files = sorted((Path(directory) / split).glob("*.parquet")) or sorted((Path(directory) / f"split={split}").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{directory} has no Parquet files for split {split!r}")
    return files


def split_rows(directory: Path, split: str) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in _parquet_files(directory, split))


def label_counts(directory: Path, labels: list[str]) -> list[int]:
    import pyarrow.parquet as pq

    column = [v for f in _parquet_files(directory, "train") for v in pq.read_table(f, columns=["label"]).column("label").to_pylist()]
    return [column.count(label) for label in labels]


# ---------------------------------------------------------------- worker side


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    if "input_ids" in batch:
        return {"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"]}
    return {"features": BackboneOutput(**{k: batch[k] for k in FEATURE_COLUMNS if k in batch})}


def _batches(shard, cfg: Config, epoch: int, device, shuffle: bool):
    kwargs = dict(batch_size=cfg.data.batch_size, device=device, drop_last=shuffle, prefetch_batches=2)
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


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from safetensors.torch import load_model

    from sgmft.models.sgmft import build_model
    from sgmft.optim import build_optimizer, warmup_cosine

    cfg: Config = config_from_dict(loop["config"])
    labels: list[str] = loop["labels"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(loop["torch_threads"])
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    device = ray.train.torch.get_device()

    model = build_model(cfg.model, load_pretrained=True)
    optimizer = build_optimizer(model, cfg.train)
    steps_per_epoch = loop["train_rows"] // world // cfg.data.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{loop['train_rows']} training rows give no full batch of {cfg.data.batch_size} per worker on {world} workers")
    total_updates = math.ceil(steps_per_epoch / cfg.train.grad_accum_steps) * cfg.train.epochs
    scheduler = warmup_cosine(optimizer, total_updates, cfg.train.warmup_ratio)

    start_epoch, history, global_step = 0, [], 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            load_model(model, str(Path(directory) / "model.safetensors"))
            state = torch.load(Path(directory) / TRAIN_STATE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history, global_step = state["epoch"] + 1, json.loads(state["history"]), state["global_step"]
        torch.set_rng_state(state["rng"])
        if rank == 0:
            print(f"[sgmft] resumed from epoch {state['epoch'] + 1} (step {global_step})", flush=True)

    model = ray.train.torch.prepare_model(model)
    weights = torch.tensor(loop["class_weights"], dtype=torch.float32, device=device) if loop["class_weights"] else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.train.label_smoothing)
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    marker = Path(loop["run_dir"]) / ".fail_once_done"
    started = time.monotonic()

    for epoch in range(start_epoch, cfg.train.epochs):
        torch.manual_seed(cfg.train.seed * 1000 + epoch * 10 + rank)  # dropout RNG: the same on resume
        model.train()
        epoch_start, wait_time, loss_sum, seen = time.monotonic(), 0.0, 0.0, 0
        batches = iter(_batches(train_shard, cfg, epoch, device, shuffle=True))
        for step in range(steps_per_epoch):
            fetch = time.monotonic()
            batch = next(batches)
            wait_time += time.monotonic() - fetch
            _maybe_fail(cfg, rank, global_step, marker)
            sync = (step + 1) % cfg.train.grad_accum_steps == 0 or step + 1 == steps_per_epoch
            context = model.no_sync() if (not sync and hasattr(model, "no_sync")) else contextlib.nullcontext()
            with context, _autocast(cfg, device):
                logits = model(**_model_inputs(batch)).logits
                loss = loss_fn(logits.float(), batch["label_id"])
            (loss / cfg.train.grad_accum_steps).backward()
            if sync:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.item() * len(batch["label_id"])
            seen += len(batch["label_id"])
            global_step += 1
        for _ in batches:  # drain what equal splitting left over so the iterator closes cleanly
            pass
        train_time = time.monotonic() - epoch_start

        model.eval()
        matrix = torch.zeros(len(labels), len(labels), dtype=torch.int64)
        with torch.inference_mode(), _autocast(cfg, device):
            for batch in _batches(val_shard, cfg, epoch, device, shuffle=False):
                predicted = model(**_model_inputs(batch)).logits.argmax(-1)
                matrix += torch.from_numpy(confusion_matrix(batch["label_id"].cpu().numpy(), predicted.cpu().numpy(), len(labels)))
        totals = torch.tensor([loss_sum, seen, wait_time, train_time], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            matrix, totals = matrix.to(device), totals.to(device)
            dist.all_reduce(matrix)
            dist.all_reduce(totals)
        report = classification_report(matrix.cpu().numpy(), labels)
        loss_sum, seen, wait_time, train_time = totals.cpu().tolist()
        samples_per_s = seen / (train_time / world)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "val_accuracy": report["accuracy"],
            "val_macro_f1": report["macro_f1"],
            "samples_per_s": samples_per_s,
            "data_wait_share": wait_time / max(train_time, 1e-9),
            "global_step": global_step,
            **{f"val_f1/{label}": v["f1"] for label, v in report["per_class"].items()},
        }
        history.append({k: metrics[k] for k in ("epoch", "train_loss", "val_accuracy", "val_macro_f1", "samples_per_s", "data_wait_share")})
        if rank == 0:
            elapsed = time.monotonic() - started
            remaining = elapsed / (epoch + 1 - start_epoch) * (cfg.train.epochs - epoch - 1)
            print(f"[sgmft] epoch {epoch + 1}/{cfg.train.epochs}  loss {metrics['train_loss']:.4f}  "
                  f"val acc {report['accuracy']:.3f}  macro-F1 {report['macro_f1']:.3f}  "
                  f"{samples_per_s:.1f} samples/s  data wait {metrics['data_wait_share']:.0%}  ETA {remaining:.0f}s", flush=True)
            state = {
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                "global_step": global_step, "rng": torch.get_rng_state(), "history": json.dumps(history),
            }
            directory, ckpt = _save_checkpoint(model, cfg, labels, {**metrics, "val_report": report}, state)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch-{epoch + 1:04d}")
            shutil.rmtree(directory, ignore_errors=True)
        else:
            ray.train.report(metrics, checkpoint=None)


# ---------------------------------------------------------------- driver side


def build_trainer(cfg: Config, datasets: dict, loop: dict, cpus_per_worker: float | None = None, run_config=None):
    """A TorchTrainer for ``cfg``; Tune trials pass their own run_config and CPU share."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = cfg.train
    resources = {"CPU": cpus_per_worker if cpus_per_worker is not None else t.cpus_per_worker}
    if t.use_gpu:
        resources["GPU"] = 1
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
    )


def maybe_materialize(ds, estimated_bytes: int, mode: str):
    """Decode once and keep the result when it fits comfortably in the object store.

    Streaming re-runs the whole read-decode pipeline every epoch; for a split that fits,
    that repeats work and adds the pipeline's start-up to every epoch's first batch.
    """
    import ray

    budget = ray.cluster_resources().get("object_store_memory", 0) / 5
    if mode == "always" or (mode == "auto" and estimated_bytes < budget):
        return ds.materialize()
    return ds


def prepare(cfg: Config) -> tuple[dict, dict]:
    """Ray datasets (train, val) and the loop config for ``cfg``."""
    from sgmft.data.preprocess import PreprocessSpec
    from sgmft.data.schema import load_labels
    from sgmft.ray_data import split_dataset

    if cfg.train.features_path:
        from sgmft.features import check_cache, feature_split

        dataset_dir = Path(cfg.train.features_path)
        check_cache(dataset_dir, cfg)
        labels = load_labels(dataset_dir)
        datasets = {
            split: maybe_materialize(feature_split(dataset_dir, split, labels),
                                     sum(f.stat().st_size for f in _parquet_files(dataset_dir, split)) * 2, cfg.data.materialize)
            for split in ("train", "val")
        }
    else:
        dataset_dir = resolve_dataset(cfg)
        labels = load_labels(dataset_dir)
        spec = PreprocessSpec.from_config(cfg)
        datasets = {
            split: maybe_materialize(
                split_dataset(dataset_dir, split, spec, labels, batch_size=cfg.data.preprocess_batch_size,
                              concurrency=cfg.data.preprocess_concurrency),
                split_rows(dataset_dir, split) * (12 * spec.image_size ** 2 + 8 * spec.context_length + 8),
                cfg.data.materialize)
            for split in ("train", "val")
        }
    if cfg.model.num_labels != len(labels):
        cfg.model.num_labels = len(labels)  # the dataset brings its label set
    class_weights = None
    if cfg.train.class_weights == "balanced":
        counts = np.array(label_counts(dataset_dir, labels), dtype=np.float64)
        class_weights = (counts.sum() / (len(labels) * np.maximum(counts, 1))).tolist()
    loop = {
        "config": config_to_dict(cfg), "labels": labels, "class_weights": class_weights,
        "train_rows": split_rows(dataset_dir, "train"), "run_dir": str(run_dir(cfg)), "dataset_dir": str(dataset_dir),
    }
    return datasets, loop


def export_best(result, cfg: Config, destination: Path) -> tuple[Path, dict, list]:
    """Copy the best checkpoint's model files (not its optimizer state) to a model directory."""
    candidates = [(ckpt, m) for ckpt, m in (result.best_checkpoints or []) if ckpt is not None]
    if not candidates:
        raise RuntimeError(f"training produced no checkpoint (error: {result.error})")
    sign = 1 if cfg.train.metric_mode == "max" else -1
    best_ckpt, best_metrics = max(candidates, key=lambda cm: (sign * cm[1][cfg.train.metric], cm[1]["epoch"]))
    # Ray keeps the latest checkpoint besides the best-k; its state holds the whole epoch history
    latest = result.checkpoint or max(candidates, key=lambda cm: cm[1]["epoch"])[0]
    with latest.as_directory() as directory:
        history = json.loads(torch.load(Path(directory) / TRAIN_STATE, weights_only=True)["history"])
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    with best_ckpt.as_directory() as directory:
        for name in TRAIN_FILES:
            shutil.copy2(Path(directory) / name, staging / name)
    metrics = json.loads((staging / METRICS).read_text())
    metrics.update({"version": f"{cfg.train.run_name}-epoch{best_metrics['epoch']}", "history": history})
    (staging / METRICS).write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    if destination.exists():
        shutil.rmtree(destination)
    staging.rename(destination)
    return destination, best_metrics, history


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
