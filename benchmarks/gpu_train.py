"""Ray Train on one GPU against the bare training step of the same model, with a crash.

For each backbone policy (``full`` and ``last_k``): ViT-B-16 random init, bf16, one GPU
worker, synthetic posts, 3 epochs, the worker killed once in the middle of epoch 2. It
records per-epoch samples/s and data-wait share, whether the run finished every epoch
after the crash, and the bare bf16 step of the same model and batch on the same card.

    python -m benchmarks.gpu_train            # on a GPU machine: writes results/gpu_train.json
    python -m benchmarks.gpu_train --dry-run  # on a CPU: the same code path at the tiny preset

Goals: data wait under 10% in every epoch; Ray Train at least 0.8x the bare step;
``resumed_after_crash: true``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from benchmarks.common import Timer, local_ray, save
from sgmft.config import load_config

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3


def _config(tmp: Path, policy: str, n: int, dry_run: bool, worker_cpus: float):
    preset = ["model.backbone.preset=tiny", "data.batch_size=16", "data.synth.image_size=64"] if dry_run else [
        "model.backbone.preset=ViT-B-16", "model.d_model=512", "model.num_heads=8", "data.batch_size=64",
        "data.synth.image_size=256", "train.use_gpu=true", "train.precision=bf16"]
    return load_config(REPO / "jobs" / "configs" / "demo.yaml", [
        *preset, f"model.backbone.policy={policy}", "model.backbone.trainable_last_k=4", f"data.synth.n={n}",
        f"train.epochs={EPOCHS}", f"train.storage_path={tmp}", f"train.run_name=gpu-{policy}",
        "train.num_workers=1", f"train.cpus_per_worker={worker_cpus}", "train.max_failures=1",
    ])


def one_policy(tmp: Path, policy: str, n: int, dry_run: bool, worker_cpus: float) -> dict:
    from sgmft.data.schema import split_rows
    from sgmft.runs import resolve_dataset
    from sgmft.train import train

    cfg = _config(tmp, policy, n, dry_run, worker_cpus)
    steps = split_rows(resolve_dataset(cfg), "train") // cfg.data.batch_size
    cfg.train.fail_once_at_step = steps + steps // 2  # the middle of epoch 2
    with Timer() as timer:
        outcome = train(cfg, evaluate_test=False)
    crashed = (tmp / cfg.train.run_name / ".fail_once_done").is_file()
    epochs = [h["epoch"] for h in outcome.history]
    return {
        "policy": policy, "batch": cfg.data.batch_size, "steps_per_epoch": steps, "crash_at_step": cfg.train.fail_once_at_step,
        "epochs": [{k: h[k] for k in ("epoch", "samples_per_s", "data_wait_share", "val_accuracy")} for h in outcome.history],
        "resumed_after_crash": crashed and epochs == list(range(1, EPOCHS + 1)),
        "wall_s": timer.seconds,
    }


def run(quick: bool = False, dry_run: bool = False, policies: tuple[str, ...] = ("full", "last_k")) -> dict:
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_train needs a CUDA GPU (or --dry-run on a CPU); nothing measured")
    n = 600 if dry_run else (2000 if quick else 4000)
    worker_cpus = 0.5 if dry_run else 2.0  # the rest of the node's CPUs preprocess
    result: dict = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "preset": "tiny" if dry_run else "ViT-B-16", "posts": n, "policies": {}}
    with tempfile.TemporaryDirectory(prefix="sgmft-gpu-train-") as tmp, local_ray():
        for policy in policies:
            measured = one_policy(Path(tmp), policy, n, dry_run, worker_cpus)
            if not dry_run:
                from benchmarks.gpu_check import bare_train_step, vit_b16_config

                bare = bare_train_step(vit_b16_config(policy), measured["batch"], 10 if quick else 20)
                measured["bare_step_samples_per_s"] = bare["samples_per_s"]
                measured["ratio_to_bare_step"] = [e["samples_per_s"] / bare["samples_per_s"] for e in measured["epochs"]]
            measured["max_data_wait_share"] = max(e["data_wait_share"] for e in measured["epochs"])
            result["policies"][policy] = measured
            if not dry_run:
                save("gpu_train", result)  # after each policy: a run cut short keeps what it measured
            print(f"{policy}: " + ", ".join(f"epoch {e['epoch']} {e['samples_per_s']:.0f} samples/s wait {e['data_wait_share']:.1%}"
                                            for e in measured["epochs"])
                  + f"; bare step {measured.get('bare_step_samples_per_s', float('nan')):.0f}; resumed {measured['resumed_after_crash']}",
                  flush=True)
    result["resumed_after_crash"] = all(p["resumed_after_crash"] for p in result["policies"].values())
    if dry_run:
        print(json.dumps(result, indent=2))  # a check of the script, not a result to keep
    else:
        save("gpu_train", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2,000 posts instead of 4,000")
    parser.add_argument("--dry-run", action="store_true", help="tiny preset on the CPU: checks the script, measures nothing useful")
    parser.add_argument("--policies", nargs="+", default=["full", "last_k"], choices=["full", "last_k"],
                        help="backbone policies to measure, in order (a device session can take one at a time)")
    args = parser.parse_args()
    run(args.quick, args.dry_run, tuple(args.policies))
