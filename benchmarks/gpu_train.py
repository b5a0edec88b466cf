"""Ray Train on one GPU against the bare training step of the same model, with a crash.

For each backbone policy (``full`` and ``last_k``): ViT-B-16 from random weights with the
recipe of ``jobs/configs/vit_b16_scratch.yaml`` (bf16, one GPU worker, synthetic posts), the
worker killed once in the middle of epoch 2. It records per epoch the validation accuracy,
steady-state samples/s (the epoch's first step left out), the time to first step (worker
set-up: model built and restored, DDP; then the first step: CUDA context, kernel loading,
first allocations), data-wait share, gradient norm and learning rate; whether the run
finished every epoch after the crash; and the bare bf16 step of the same model and batch on
the same card.

    python -m benchmarks.gpu_train            # on a GPU machine: writes results/gpu_train.json
    python -m benchmarks.gpu_train --dry-run  # on a CPU: the same code path at the tiny preset

Goals: the last epoch's validation accuracy at least 3x chance (a policy below it is marked
failed: it did not learn); data wait under 10% in every epoch; steady state at least 0.8x
the bare step; ``resumed_after_crash: true``.
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
EPOCH_KEYS = ("epoch", "val_accuracy", "samples_per_s", "steady_samples_per_s", "setup_s", "first_step_s",
              "data_wait_share", "grad_norm", "lr", "collapsed")
LEARNED_OVER_CHANCE = 3.0


def _config(tmp: Path, policy: str, n: int, epochs: int, dry_run: bool, worker_cpus: float):
    recipe, preset = ("demo.yaml", ["data.synth.image_size=64"]) if dry_run else ("vit_b16_scratch.yaml", [])
    return load_config(REPO / "jobs" / "configs" / recipe, [
        *preset, f"model.backbone.policy={policy}", "model.backbone.trainable_last_k=4", f"data.synth.n={n}",
        f"train.epochs={epochs}", f"train.storage_path={tmp}", f"train.run_name=gpu-{policy}",
        "train.num_workers=1", f"train.cpus_per_worker={worker_cpus}", "train.max_failures=1",
    ])


def one_policy(tmp: Path, policy: str, n: int, epochs: int, dry_run: bool, worker_cpus: float) -> dict:
    from sgmft.data.schema import split_rows
    from sgmft.runs import resolve_dataset
    from sgmft.train import train

    cfg = _config(tmp, policy, n, epochs, dry_run, worker_cpus)
    steps = split_rows(resolve_dataset(cfg), "train") // cfg.data.batch_size
    cfg.train.fail_once_at_step = steps + steps // 2  # the middle of epoch 2
    with Timer() as timer:
        outcome = train(cfg, evaluate_test=False)
    crashed = (tmp / cfg.train.run_name / ".fail_once_done").is_file()
    history = outcome.history
    chance = 1.0 / cfg.model.num_labels
    return {
        "policy": policy, "batch": cfg.data.batch_size, "steps_per_epoch": steps, "crash_at_step": cfg.train.fail_once_at_step,
        "lr": cfg.train.lr, "backbone_lr": cfg.train.backbone_lr, "warmup_ratio": cfg.train.warmup_ratio,
        "epochs": [{k: h.get(k) for k in EPOCH_KEYS} for h in history],
        "resumed_after_crash": crashed and [h["epoch"] for h in history] == list(range(1, epochs + 1)),
        "chance": chance, "learned": history[-1]["val_accuracy"] >= LEARNED_OVER_CHANCE * chance,
        "wall_s": timer.seconds,
    }


def run(quick: bool = False, dry_run: bool = False, policies: tuple[str, ...] = ("full", "last_k")) -> dict:
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_train needs a CUDA GPU (or --dry-run on a CPU); nothing measured")
    n, epochs = (600, 3) if dry_run else ((2500, 4) if quick else (4000, 4))
    worker_cpus = 0.5 if dry_run else 2.0  # the rest of the node's CPUs preprocess
    result: dict = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "preset": "tiny" if dry_run else "ViT-B-16", "posts": n, "policies": {}}
    with tempfile.TemporaryDirectory(prefix="sgmft-gpu-train-") as tmp, local_ray():
        for policy in policies:
            measured = one_policy(Path(tmp), policy, n, epochs, dry_run, worker_cpus)
            if not dry_run:
                from benchmarks.gpu_check import bare_train_step, vit_b16_config

                bare = bare_train_step(vit_b16_config(policy), measured["batch"], 10 if quick else 20)
                measured["bare_step_samples_per_s"] = bare["samples_per_s"]
                measured["steady_ratio_to_bare_step"] = [e["steady_samples_per_s"] / bare["samples_per_s"] for e in measured["epochs"]]
            measured["max_data_wait_share"] = max(e["data_wait_share"] for e in measured["epochs"])
            result["policies"][policy] = measured
            if not dry_run:
                save("gpu_train", result)  # after each policy: a run cut short keeps what it measured
            print(f"{policy}: " + ", ".join(f"epoch {e['epoch']} val acc {e['val_accuracy']:.3f} {e['steady_samples_per_s']:.0f} "
                                            f"samples/s (first step {e['first_step_s']:.1f} s after {e['setup_s']:.1f} s set-up) "
                                            f"wait {e['data_wait_share']:.1%}" for e in measured["epochs"])
                  + f"; bare step {measured.get('bare_step_samples_per_s', float('nan')):.0f}; resumed {measured['resumed_after_crash']}"
                  + f"; {'learned' if measured['learned'] else 'FAILED: last epoch under 3x chance'}", flush=True)
    result["resumed_after_crash"] = all(p["resumed_after_crash"] for p in result["policies"].values())
    result["failed_policies"] = [name for name, p in result["policies"].items() if not p["learned"]]
    if dry_run:
        print(json.dumps(result, indent=2))  # a check of the script, not a result to keep
    else:
        save("gpu_train", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2,500 posts instead of 4,000")
    parser.add_argument("--dry-run", action="store_true", help="tiny preset on the CPU: checks the script, measures nothing useful")
    parser.add_argument("--policies", nargs="+", default=["full", "last_k"], choices=["full", "last_k"],
                        help="backbone policies to measure, in order (a device session can take one at a time)")
    args = parser.parse_args()
    run(args.quick, args.dry_run, tuple(args.policies))
