"""Contrastive image-text pretraining of the Chinese-CLIP backbone with Ray Train (``sgmft pretrain``).

The same run as ``sgmft train`` (Ray Data feeding a ``TorchTrainer``, the worker loop of
:mod:`sgmft.train_loop` with its checkpoints, crash resume, divergence checks and console),
with another task: the backbone read as CLIP (:class:`sgmft.models.contrastive.ContrastiveCLIP`,
any preset, either implementation, from random weights or continued from released ones in
``model.backbone.checkpoint``), the symmetric InfoNCE over the global batch (embeddings
gathered across workers with their gradients) and, each epoch, recall@1/5/10 both ways on
the held-out split (and zero-shot labelling of ``pretrain.zero_shot_data``, when set). The
best epoch's backbone is exported as released weights are stored (``<run>/backbone``), for
``sgmft train``, ``tune``, ``features cache`` and ``ablate`` to load with
``model.backbone.checkpoint``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sgmft.commands import add_config_args, add_verbose_arg, config_from_args, print_where, progress_bars, ray_for_command, show_path
from sgmft.config import Config
from sgmft.model_dir import METRICS, TRAIN_STATE, WEIGHTS, staged_model_dir
from sgmft.runs import best_checkpoint, check_resume, maybe_materialize, preprocess_concurrency, run_dir
from sgmft.train_loop import WorkerRun, _all_reduce, _autocast, _batches, build_trainer, raise_if_diverged
from sgmft.worker_spec import WorkerSpec

PROMPT = "我在{label}"
"""How a location label is put as text for zero-shot labelling."""
CHECKPOINT_METRIC = "val_recall@1"
"""The mean of text-to-image and image-to-text recall@1: what picks the exported epoch."""


def pairs_dir(cfg: Config) -> Path:
    """The configured pair dataset, or the synthetic grounding pairs built once in the run directory."""
    p = cfg.pretrain
    if p.pairs_path:
        path = Path(p.pairs_path)
        if not path.is_dir():
            raise FileNotFoundError(f"pretrain.pairs_path {path} does not exist")
        return path
    from sgmft.data.pairs import synthesize_pairs

    path = run_dir(cfg) / (f"pairs-n{p.synth_n}-seed{p.synth_seed}-px{p.synth_image_size}-two{p.two_object_share}"
                           f"-val{p.synth_val_frac}-test{p.synth_test_frac}")
    if not (path / "labels.json").is_file():
        synthesize_pairs(path, n=p.synth_n, seed=p.synth_seed, image_size=p.synth_image_size,
                         two_object_share=p.two_object_share, val_frac=p.synth_val_frac, test_frac=p.synth_test_frac)
    return path


def prepare_pairs(cfg: Config) -> tuple[dict[str, Any], WorkerSpec]:
    """The pairs' train and val splits as Ray datasets (decoded and tokenised by the one
    preprocessing), and what every worker is handed."""
    from sgmft.data.preprocess import PreprocessSpec
    from sgmft.data.schema import split_rows
    from sgmft.ray_data import split_dataset

    directory, spec = pairs_dir(cfg), PreprocessSpec.from_config(cfg)
    datasets = {
        split: maybe_materialize(split_dataset(directory, split, spec, None, batch_size=cfg.data.preprocess_batch_size,
                                               concurrency=preprocess_concurrency(cfg), num_cpus=cfg.data.task_cpus),
                                 split_rows(directory, split) * (3 * spec.image_size ** 2 + 8 * spec.context_length),
                                 cfg.data.materialize)
        for split in ("train", "val")
    }
    return datasets, WorkerSpec(config=cfg, labels=[], train_rows=split_rows(directory, "train"), run_dir=str(run_dir(cfg)),
                                dataset_dir=str(directory))


# --- on the workers ------------------------------------------------------------------------

def contrastive_objective(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from sgmft.models.contrastive import contrastive_loss

    return contrastive_loss(model(batch["input_ids"], batch["pixel_values"]))


def contrastive_task(spec: WorkerSpec):
    """The backbone read as CLIP (released weights loaded when configured) and its loss."""
    from sgmft.models.contrastive import ContrastiveCLIP

    return ContrastiveCLIP(spec.config.model.backbone, load_pretrained=True), contrastive_objective


def _embeddings(run: WorkerRun, shard, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This worker's share of the held-out split embedded, then every worker's, in rank order."""
    import torch.distributed as dist

    run.model.eval()
    texts, images = [], []
    with torch.inference_mode(), _autocast(run.cfg, run.device):
        for batch in _batches(shard, run.cfg, epoch, run.device, shuffle=False):
            out = run.model(batch["input_ids"], batch["pixel_values"])
            texts.append(out.text.float().cpu())
            images.append(out.image.float().cpu())
    mine = (torch.cat(texts), torch.cat(images))
    if not (dist.is_available() and dist.is_initialized()):
        return mine
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return torch.cat([t for t, _ in everyone]), torch.cat([i for _, i in everyone])


def retrieval_validation(run: WorkerRun, epoch: int, val_shard) -> tuple[dict[str, Any], dict[str, Any]]:
    """Recall@1/5/10 both ways over the held-out split (every worker's share), and zero-shot accuracy."""
    from sgmft.models.contrastive import retrieval_metrics

    recall = retrieval_metrics(*_embeddings(run, val_shard, epoch))
    metrics = {"val_t2i_r@1": recall["text_to_image_recall@1"], "val_i2t_r@1": recall["image_to_text_recall@1"],
               CHECKPOINT_METRIC: (recall["text_to_image_recall@1"] + recall["image_to_text_recall@1"]) / 2,
               **{f"val_retrieval/{k}": v for k, v in recall.items()}}
    if run.cfg.pretrain.zero_shot_data:
        (accuracy,) = _all_reduce(torch.tensor(zero_shot(run) if run.rank == 0 else 0.0, dtype=torch.float64))
        metrics["val_zero_shot_accuracy"] = float(accuracy)
    return metrics, {"retrieval": recall}


def zero_shot(run: WorkerRun, max_posts: int = 512) -> float:
    """Zero-shot accuracy on ``pretrain.zero_shot_data``'s val split (its first ``max_posts``):
    each post labelled with the label whose prompt's text embedding is nearest its image's."""
    import pyarrow.parquet as pq

    from sgmft.data.labels import display_name
    from sgmft.data.preprocess import PreprocessSpec, encode_labels, preprocess_batch, tokenize
    from sgmft.data.schema import load_labels, split_files
    from sgmft.models.contrastive import zero_shot_accuracy

    directory, cfg = Path(run.cfg.pretrain.zero_shot_data), run.cfg
    labels = load_labels(directory)
    rows = pq.read_table(split_files(directory, "val"), columns=["text", "image", "label"]).slice(0, max_posts).to_pydict()
    inputs = preprocess_batch(rows, PreprocessSpec.from_config(cfg))
    prompts = torch.from_numpy(tokenize([PROMPT.format(label=display_name(label)) for label in labels], cfg.data.context_length))
    pixels = torch.from_numpy(inputs["pixel_values"])
    model = getattr(run.model, "module", run.model)
    with torch.inference_mode(), _autocast(cfg, run.device):
        prompt_embeds = model.embed_text(prompts.to(run.device))
        image_embeds = torch.cat([model.embed_image(pixels[i:i + 64].to(run.device)) for i in range(0, len(pixels), 64)])
    return zero_shot_accuracy(prompt_embeds, image_embeds, torch.from_numpy(encode_labels(rows["label"], labels)).to(run.device))


# --- on the driver -------------------------------------------------------------------------

@dataclass
class PretrainOutcome:
    backbone: Path
    """What ``model.backbone.checkpoint`` takes: cn_clip's ``.pt`` file, or a Hugging Face directory."""
    best: dict[str, Any]
    history: list[dict[str, Any]]


def export_backbone(result: Any, cfg: Config, destination: Path) -> PretrainOutcome:
    """The best epoch's backbone, stored as released weights are (``weights.pt`` for cn_clip, an
    ``hf`` model directory for transformers), with ``metrics.json``; written aside and renamed
    into place, so a reader never sees half of it."""
    from safetensors.torch import load_model

    from sgmft.models.contrastive import ContrastiveCLIP

    ckpt, best = best_checkpoint(result, cfg)
    latest = result.checkpoint or ckpt
    model = ContrastiveCLIP(cfg.model.backbone, load_pretrained=False)
    with latest.as_directory() as directory:
        history = json.loads(torch.load(Path(directory) / TRAIN_STATE, weights_only=True)["history"])
    with ckpt.as_directory() as directory:
        load_model(model, str(Path(directory) / WEIGHTS))
    name = "hf" if cfg.model.backbone.implementation == "hf" else "weights.pt"
    with staged_model_dir(destination) as staging:
        model.backbone.save_released(staging / name)
        (staging / METRICS).write_text(json.dumps({"best": best, "history": history, "preset": cfg.model.backbone.preset,
                                                   "implementation": cfg.model.backbone.implementation},
                                                  indent=2, ensure_ascii=False))
    return PretrainOutcome(backbone=destination / name, best=best, history=history)


def pretrain(cfg: Config) -> PretrainOutcome:
    """Pretrain ``cfg.model.backbone`` contrastively on the connected Ray cluster; export the best epoch."""
    from sgmft.run_watch import fit_watched

    cfg.train.metric, cfg.train.metric_mode = CHECKPOINT_METRIC, "max"
    check_resume(cfg)
    datasets, spec = prepare_pairs(cfg)
    Path(spec.run_dir).mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(spec, datasets, task=contrastive_task, validation=retrieval_validation)
    result = fit_watched(trainer, spec.run_dir, cfg.train.stall_timeout_s)
    raise_if_diverged(result)
    if result.error:
        raise RuntimeError(f"pretraining failed: {result.error}") from result.error
    return export_backbone(result, cfg, Path(spec.run_dir) / "backbone")


def cmd_pretrain(args: argparse.Namespace) -> None:
    cfg = config_from_args(args)
    b, t = cfg.model.backbone, cfg.train
    source = cfg.pretrain.pairs_path or f"{cfg.pretrain.synth_n} synthetic grounding pairs"
    print(f"SG-MFT pretrain: {source}, {b.preset} Chinese-CLIP ({b.implementation}, "
          f"{'from ' + b.checkpoint if b.checkpoint else 'random init'}), contrastive, {t.num_workers} Ray Train workers, "
          f"{t.epochs} epochs", flush=True)
    log_dir = run_dir(cfg) / "logs"
    print_where("run directory", run_dir(cfg), log_dir, args.verbose)
    with ray_for_command(args, log_dir) as console, progress_bars(console):
        outcome = pretrain(cfg)
    best = outcome.best
    print(f"best epoch {best['epoch']}: recall@1 text->image {best['val_t2i_r@1']:.3f}, image->text {best['val_i2t_r@1']:.3f}")
    print(f"backbone: {show_path(outcome.backbone)}\nnext: sgmft train --set model.backbone.preset={b.preset} "
          f"--set model.backbone.implementation={b.implementation} --set model.backbone.checkpoint={show_path(outcome.backbone)}",
          flush=True)


def add_commands(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("pretrain", help="contrastive image-text pretraining of the backbone with Ray Train")
    add_config_args(parser)
    add_verbose_arg(parser)
    parser.set_defaults(func=cmd_pretrain)
