"""Contrastive pretraining throughput, and what gathering the global batch costs.

1. ``sgmft pretrain`` on a local Ray (2 workers, synthetic pairs): steady-state samples/s
   per epoch, as the run reports it.
2. The same training step (:func:`sgmft.train_loop.train_step` with the contrastive loss)
   in two processes of one process group, side by side: with the negatives gathered across
   both ranks (what pretraining runs) and with each rank's own batch only. The difference is
   the all-gather's cost (forward and backward), given as its share of the step.

    python -m benchmarks.pretrain_throughput [--quick]   # CPU: tiny preset, gloo
    python -m benchmarks.pretrain_throughput --gpu       # GPU: ViT-B-16 in bf16, nccl, a rank a GPU
                                                         # (on one GPU: its step alone, no gather)

Writes ``results/pretrain_throughput.json`` (``gpu_pretrain_throughput.json`` with --gpu).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from benchmarks.common import Timer, local_ray, save
from sgmft.config import BackboneConfig, TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def _step_seconds(rank: int, world: int, port: int, preset: str, batch: int, steps: int, gpu: bool, out: dict) -> None:
    """Seconds a step takes on this rank, with the gather and without, alternating rounds."""
    import torch.distributed as dist

    from sgmft.models.contrastive import ContrastiveCLIP, contrastive_loss
    from sgmft.optim import build_optimization
    from sgmft.train_loop import train_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    device = torch.device(f"cuda:{rank}" if gpu else "cpu")
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(ContrastiveCLIP(BackboneConfig(preset=preset), load_pretrained=False).to(device))
        size = model.module.backbone.image_size
        batch_data = {"input_ids": torch.randint(1000, 20000, (batch, 52), device=device),
                      "pixel_values": torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)}
        optimizer, scheduler = build_optimization(model, TrainConfig(), device, total_updates=10_000)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else contextlib.nullcontext()

        def local_only(m, b):  # the same loss with this rank's batch as its only negatives
            return contrastive_loss(m(b["input_ids"], b["pixel_values"]), gather=False)

        def gathered(m, b):
            return contrastive_loss(m(b["input_ids"], b["pixel_values"]))

        times = {"gathered": [], "local": []}
        for round_ in range(steps + 2):
            for name, loss_fn in (("gathered", gathered), ("local", local_only)):
                if gpu:
                    torch.cuda.synchronize(device)
                dist.barrier()
                start = time.perf_counter()
                train_step(model, batch_data, loss_fn, optimizer, scheduler, autocast=autocast, max_grad_norm=1.0)
                if gpu:
                    torch.cuda.synchronize(device)
                if round_ >= 2:  # two warm-up rounds
                    times[name].append(time.perf_counter() - start)
        out[rank] = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    finally:
        dist.destroy_process_group()


def gather_share(preset: str, batch: int, steps: int, gpu: bool) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # a rank a GPU (nccl will not put two on one); two CPU ranks over gloo
    world = min(2, torch.cuda.device_count()) if gpu else 2
    out = mp.Manager().dict()
    mp.spawn(_step_seconds, args=(world, port, preset, batch, steps, gpu, out), nprocs=world, join=True)
    gathered = max(out[r]["gathered"] for r in range(world))
    local = max(out[r]["local"] for r in range(world))
    return {"preset": preset, "batch_per_rank": batch, "ranks": world, "backend": "nccl" if gpu else "gloo",
            "median_step_s_gathered": gathered, "median_step_s_local": local,
            # one rank has nothing to gather: its share is not measured
            "all_gather_share": max(0.0, gathered - local) / gathered if world > 1 else None,
            "samples_per_s_gathered": world * batch / gathered}


def ray_run(quick: bool) -> dict:
    from sgmft.pretrain import pretrain

    with tempfile.TemporaryDirectory(prefix="sgmft-pretrain-bench-") as tmp, local_ray(num_cpus=4), Timer() as timer:
        cfg = load_config(REPO / "jobs" / "configs" / "pretrain.yaml", [
            f"train.storage_path={tmp}", f"pretrain.synth_n={1200 if quick else 4000}", f"train.epochs={2 if quick else 3}"])
        outcome = pretrain(cfg)
    return {"preset": cfg.model.backbone.preset, "pairs": cfg.pretrain.synth_n, "workers": cfg.train.num_workers,
            "global_batch": cfg.data.batch_size * cfg.train.num_workers, "wall_s": timer.seconds,
            "epochs": [{k: h[k] for k in ("epoch", "steady_samples_per_s", "data_wait_share", "val_recall@1")} for h in outcome.history]}


def run(quick: bool = False, gpu: bool = False) -> dict:
    if gpu and not torch.cuda.is_available():
        raise SystemExit("the GPU mode needs a CUDA GPU; nothing measured")
    preset, batch = ("ViT-B-16", 128) if gpu else ("tiny", 64)
    result = {"gather": gather_share(preset, batch, 5 if quick else 15, gpu)}
    if not gpu:
        result["ray"] = ray_run(quick)
    g = result["gather"]
    share = "not measured (one rank)" if g["all_gather_share"] is None else f"{g['all_gather_share']:.1%} of a step"
    print(f"pretraining step ({preset}, {batch} pairs a rank, {g['ranks']} ranks): {g['samples_per_s_gathered']:.0f} "
          f"samples/s; the all-gather: {share} ({g['median_step_s_gathered'] * 1e3:.0f} ms gathered against "
          f"{g['median_step_s_local'] * 1e3:.0f} ms local)")
    if "ray" in result:
        print("sgmft pretrain on Ray: " + ", ".join(f"epoch {e['epoch']} {e['steady_samples_per_s']:.0f} samples/s"
                                                    for e in result["ray"]["epochs"]))
    save("gpu_pretrain_throughput" if gpu else "pretrain_throughput", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer steps and pairs, for a smoke run")
    parser.add_argument("--gpu", action="store_true", help="ViT-B-16 in bf16 on 2 GPUs with nccl")
    args = parser.parse_args()
    run(args.quick, args.gpu)
