"""Tuning on cached frozen-backbone features against end to end: one trial, and a search.

Both ways train the same head (same config, same seed, so the same initial weights) on the
same frozen backbone; the cached way reads token features computed once by Ray Data
instead of decoding images and running the backbone every epoch of every trial. Each
search prepares its data once and runs single-worker trials in their own Tune actors
(see ``sgmft.tune``); only the best model is exported.

CPU (default; the project's 2-core machine): the ``small`` random-init backbone, 960 posts.

- one trial each way: a one-trial search of 4 epochs: its wall time (data prepared, the
  trial, the export) and the trial's own time as Tune measured it;
- a search of 8 trials each way: the same grid (4 learning rates x 2 dropouts), 2 epochs,
  no early stopping (so both ways run the same 8 x 2 epochs), 2 trials at a time;
- the cache build, once: amortised over every trial and search on the same backbone;
- the compute bound: FLOPs (torch's FlopCounterMode) and one-thread times of a batch's
  backbone forward, head training step and head forward, in this process. A cached epoch
  can be at most (epoch FLOPs end to end) / (epoch FLOPs cached) faster, and only where the
  head runs at the backbone's FLOP rate; the measured rates say how far from that it is.

Writes ``results/tune_cache.json``. Goal: a cached trial at least 5x faster, with the same
best validation accuracy within noise.

GPU (``--gpu``, one prepared run on a GPU machine): ViT-B-16 random init, frozen, bf16;
8 cached trials at 0.25 GPU each (four share the card) against the same 8 trials end to
end at 1 GPU each; wall time and best accuracy each way, and the GPU's name. Writes
``results/gpu_tune.json``. Goal: the cached search at least 10x faster.
``--gpu --dry-run`` runs that code path on a CPU at the tiny preset (no GPU requested;
writes ``results/gpu_tune_dry_run.json``, which measures nothing useful).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from pathlib import Path

from benchmarks.common import Timer, local_ray, save
from sgmft.config import load_config

REPO = Path(__file__).resolve().parents[1]
GRID = {"train.lr": {"grid": [5e-4, 1e-3, 2e-3, 4e-3]}, "model.dropout": {"grid": [0.0, 0.1]}}
ONE = {"train.lr": {"grid": [1e-3]}}


def search(base: list[str], run_name: str, space: dict, epochs: int, *extra: str) -> dict:
    """Run one search (no early stopping: grace period = epochs) and summarise it."""
    from sgmft.tune import tune

    cfg = load_config(REPO / "jobs" / "configs" / "demo.yaml", [
        *base, f"train.run_name={run_name}", f"train.epochs={epochs}", f"tune.grace_period={epochs}", "tune.num_samples=1", *extra])
    cfg.tune.search_space = space
    with Timer() as timer:
        outcome = tune(cfg, resume=False)
    trial_s = sorted(float(row["time_s"]) for row in outcome.table)
    # a trial's fixed cost: its first report (start-up + first epoch) less a later epoch
    startup_s = [row["first_epoch_s"] - row["epoch_s"] for row in outcome.table if row["epoch_s"] is not None]
    return {
        "wall_s": timer.seconds, "trials": len(outcome.table), "epochs": epochs,
        "trial_s": trial_s, "mean_trial_s": sum(trial_s) / len(trial_s),
        "epoch_s": sum(row["epoch_s"] for row in outcome.table if row["epoch_s"]) / max(1, len(startup_s)),
        "startup_s": sorted(startup_s),
        "driver_s": {k: round(v, 2) for k, v in outcome.timings.items()},
        "best_val_accuracy": outcome.best_metrics["val_accuracy"],
        "val_accuracy_by_trial": {",".join(f"{k}={row[k]:g}" for k in space): row["val_accuracy"] for row in outcome.table},
    }


def _best_seconds(fn, rounds: int = 7, repeat: int = 5) -> float:
    """Seconds of one ``fn()``: the best of ``rounds`` means over ``repeat`` calls (the machine drifts)."""
    import time

    fn()
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - started) / repeat)
    return best


def compute_bound(overrides: list[str], rows: dict[str, int]) -> dict:
    """FLOPs and one-thread seconds of a batch: backbone forward, head training step, head forward.

    Random inputs of the model's sizes (the head's work does not depend on the values), the
    config's seed, batch size and dropout; the step is what a cached trial runs per batch
    (forward, loss, backward, clipping, AdamW). Returns each part's FLOPs, seconds and
    GFLOP/s, and the epoch ratios they bound for an epoch over ``rows`` (posts per split, as a
    feature cache's manifest counts them).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sgmft.models.model import build_model
    from sgmft.optim import build_optimization
    from sgmft.train_loop import ClassificationLoss, train_step
    from sgmft.config import image_size_of

    cfg = load_config(REPO / "jobs" / "configs" / "demo.yaml", overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a trial with tune.cpus_per_worker < 1 runs on
    try:
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, load_pretrained=False)
        batch, size = cfg.data.batch_size, image_size_of(cfg.model.backbone.preset)
        ids = torch.randint(1000, 20000, (batch, cfg.data.context_length))
        ids[:, cfg.data.context_length // 2:] = 0  # padding, as short posts have
        pixels = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
        labels = torch.randint(0, cfg.model.num_labels, (batch,))
        with torch.no_grad():
            features = model.features(ids, pixels)
        optimizer, scheduler = build_optimization(model.head, cfg.train, torch.device("cpu"), total_updates=10_000)
        head_batch = {"label_id": labels, **vars(features)}
        loss_fn = ClassificationLoss(torch.nn.CrossEntropyLoss())

        def backbone_forward():
            with torch.no_grad():
                model.features(ids, pixels)

        def head_step():
            model.head.train()
            train_step(model, head_batch, loss_fn, optimizer, scheduler, autocast=contextlib.nullcontext(),
                       max_grad_norm=cfg.train.max_grad_norm)

        def head_forward():
            model.head.eval()
            with torch.inference_mode():
                model.head(features)

        parts = {}
        for name, fn in (("backbone_forward", backbone_forward), ("head_train_step", head_step), ("head_forward", head_forward)):
            with FlopCounterMode(display=False) as counter:
                fn()
            seconds = _best_seconds(fn)
            parts[name] = {"gflop": counter.get_total_flops() / 1e9, "s": seconds, "gflop_per_s": counter.get_total_flops() / 1e9 / seconds}
    finally:
        torch.set_num_threads(threads)
    train_steps, val_batches = rows["train"] // batch, -(-rows["val"] // batch)  # whole batches train, all validate
    b, t, v = (parts[k] for k in ("backbone_forward", "head_train_step", "head_forward"))
    cached_flops = train_steps * t["gflop"] + val_batches * v["gflop"]
    cached_s = train_steps * t["s"] + val_batches * v["s"]
    backbone_flops = (train_steps + val_batches) * b["gflop"]
    return {
        "threads": 1, "batch_size": batch, "train_steps": train_steps, "val_batches": val_batches, "parts": parts,
        # the most a cached epoch can gain: its head at the backbone's FLOP rate, no overhead
        "epoch_flop_ratio": (backbone_flops + cached_flops) / cached_flops,
        # what these rates give, still with no overhead
        "epoch_compute_ratio": ((train_steps + val_batches) * b["s"] + cached_s) / cached_s,
        "head_rate_vs_backbone": t["gflop_per_s"] / b["gflop_per_s"],
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def run(quick: bool = False) -> dict:
    """The CPU benchmark."""
    from sgmft.features import cache_features
    from sgmft.runs import resolve_dataset

    n, epochs, search_epochs = (480, 2, 1) if quick else (960, 4, 2)
    with tempfile.TemporaryDirectory(prefix="sgmft-bench-") as tmp:
        base = ["model.backbone.preset=small", "model.backbone.policy=frozen", "model.d_model=64", f"data.synth.n={n}",
                "data.synth.image_size=128", "data.batch_size=32", f"train.storage_path={tmp}", "train.num_workers=1",
                "tune.cpus_per_worker=0.25", "tune.max_concurrent_trials=2"]  # two single-thread trials on two cores
        dataset_dir = resolve_dataset(load_config(REPO / "jobs" / "configs" / "demo.yaml", [*base, "train.run_name=data"]))
        base.append(f"data.path={dataset_dir}")
        cached = f"train.features_path={Path(tmp) / 'features'}"
        load_before = os.getloadavg()
        with local_ray(num_cpus=4):
            with Timer() as build:
                manifest = cache_features(load_config(REPO / "jobs" / "configs" / "demo.yaml", base), dataset_dir,
                                          Path(tmp) / "features", concurrency=2)
            one_e2e = search(base, "one-e2e", ONE, epochs)
            one_cached = search(base, "one-cached", ONE, epochs, cached)
            grid_cached = search(base, "grid-cached", GRID, search_epochs, cached)
            grid_e2e = search(base, "grid-e2e", GRID, search_epochs)
    bound = compute_bound(base, manifest["rows"])
    result = {
        "preset": "small (frozen)", "rows": n, "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "cache_build_s": build.seconds,
        "one_trial": {"end_to_end": one_e2e, "cached": one_cached,
                      "trial_speedup": one_e2e["mean_trial_s"] / one_cached["mean_trial_s"],
                      "search_speedup": one_e2e["wall_s"] / one_cached["wall_s"]},
        "search_8_trials": {"end_to_end": grid_e2e, "cached": grid_cached,
                            "search_speedup": grid_e2e["wall_s"] / grid_cached["wall_s"],
                            "trial_speedup": grid_e2e["mean_trial_s"] / grid_cached["mean_trial_s"]},
        "compute_bound": bound,
        "goal": "a cached trial >= 5x faster, same best val accuracy within noise",
    }
    result["speedup"] = result["one_trial"]["trial_speedup"]  # the headline (benchmarks.run_all)
    o, g = result["one_trial"], result["search_8_trials"]
    print(f"one trial ({n} posts, {epochs} epochs, frozen small backbone): end-to-end {one_e2e['mean_trial_s']:.1f}s, "
          f"cached {one_cached['mean_trial_s']:.1f}s -> {o['trial_speedup']:.1f}x per trial; one-trial search "
          f"{one_e2e['wall_s']:.1f}s vs {one_cached['wall_s']:.1f}s -> {o['search_speedup']:.1f}x; best val accuracy "
          f"{one_e2e['best_val_accuracy']:.3f} vs {one_cached['best_val_accuracy']:.3f}; per epoch {one_e2e['epoch_s']:.1f}s vs "
          f"{one_cached['epoch_s']:.1f}s, fixed cost per trial {_mean(one_e2e['startup_s']):.1f}s vs {_mean(one_cached['startup_s']):.1f}s")
    print(f"8-trial search ({search_epochs} epochs): end-to-end {grid_e2e['wall_s']:.1f}s, cached {grid_cached['wall_s']:.1f}s -> "
          f"{g['search_speedup']:.1f}x ({g['trial_speedup']:.1f}x per trial); best val accuracy "
          f"{grid_e2e['best_val_accuracy']:.3f} vs {grid_cached['best_val_accuracy']:.3f}; fixed cost per trial "
          f"{_mean(grid_e2e['startup_s']):.1f}s vs {_mean(grid_cached['startup_s']):.1f}s; cache built once in {build.seconds:.1f}s")
    parts = bound["parts"]
    print(f"compute bound (one thread, batch {bound['batch_size']}): backbone forward {parts['backbone_forward']['gflop']:.1f} GFLOP in "
          f"{parts['backbone_forward']['s'] * 1e3:.0f} ms ({parts['backbone_forward']['gflop_per_s']:.0f} GFLOP/s), head training step "
          f"{parts['head_train_step']['gflop']:.2f} GFLOP in {parts['head_train_step']['s'] * 1e3:.0f} ms "
          f"({parts['head_train_step']['gflop_per_s']:.0f} GFLOP/s); a cached epoch ({bound['train_steps']} steps, "
          f"{bound['val_batches']} val batches) is at most {bound['epoch_flop_ratio']:.1f}x faster (head at the backbone's rate, "
          f"no overhead), {bound['epoch_compute_ratio']:.1f}x at the rates measured")
    save("tune_cache", result)
    return result


def run_gpu(quick: bool = False, dry_run: bool = False) -> dict:
    """8 cached trials at 0.25 GPU against the same 8 end to end at 1 GPU (ViT-B-16 random init, frozen)."""
    import torch

    from sgmft.features import cache_features
    from sgmft.runs import resolve_dataset

    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("tune_cache --gpu needs a CUDA GPU (or --dry-run on a CPU); nothing measured")
    n, epochs = (240, 2) if dry_run else ((1500, 2) if quick else (8000, 5))
    model = ["model.backbone.preset=tiny", "data.batch_size=16", "data.synth.image_size=64", "tune.cpus_per_worker=0.5",
             "tune.max_concurrent_trials=2"] if dry_run else [
        "model.backbone.preset=ViT-B-16", "model.d_model=512", "model.num_heads=8", "data.batch_size=64",
        "data.synth.image_size=256", "train.use_gpu=true", "train.precision=bf16", "tune.cpus_per_worker=2"]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    with tempfile.TemporaryDirectory(prefix="sgmft-gpu-tune-") as tmp:
        base = [*model, "model.backbone.policy=frozen", f"data.synth.n={n}", f"train.storage_path={tmp}", "train.num_workers=1"]
        dataset_dir = resolve_dataset(load_config(REPO / "jobs" / "configs" / "demo.yaml", [*base, "train.run_name=data"]))
        base.append(f"data.path={dataset_dir}")
        with local_ray():
            with Timer() as build:
                cache_features(load_config(REPO / "jobs" / "configs" / "demo.yaml", base), dataset_dir, Path(tmp) / "features",
                               concurrency=1, batch_size=16 if dry_run else 256, num_gpus=0.0 if dry_run else 1.0)
            cached = search(base, "grid-cached", GRID, epochs, f"train.features_path={Path(tmp) / 'features'}",
                            "train.gpus_per_worker=0.25")
            e2e = search(base, "grid-e2e", GRID, epochs, "train.gpus_per_worker=1")
    result = {
        "gpu": gpu, "preset": "tiny (dry run)" if dry_run else "ViT-B-16 (random init, frozen, bf16)", "posts": n, "epochs": epochs,
        "cache_build_s": build.seconds, "cached_0.25_gpu": cached, "end_to_end_1_gpu": e2e,
        "search_speedup": e2e["wall_s"] / cached["wall_s"], "goal": "the cached search >= 10x faster",
    }
    print(f"8-trial search on {gpu or 'CPU (dry run)'} ({n} posts, {epochs} epochs): end-to-end at 1 GPU/trial {e2e['wall_s']:.1f}s, "
          f"cached at 0.25 GPU/trial {cached['wall_s']:.1f}s -> {result['search_speedup']:.1f}x; best val accuracy "
          f"{e2e['best_val_accuracy']:.3f} vs {cached['best_val_accuracy']:.3f}; cache built once in {build.seconds:.1f}s")
    save("gpu_tune_dry_run" if dry_run else "gpu_tune", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--gpu", action="store_true", help="the GPU benchmark (results/gpu_tune.json)")
    parser.add_argument("--dry-run", action="store_true", help="with --gpu: its code path on a CPU at the tiny preset")
    args = parser.parse_args()
    if args.dry_run and not args.gpu:
        parser.error("--dry-run goes with --gpu")
    run_gpu(args.quick, args.dry_run) if args.gpu else run(args.quick)
