"""One prepared GPU check at ViT-B-16 size on random weights (a few minutes at most).

1. A bf16 training step (forward, backward, AdamW) of the full SG-MFT, last-4-layers policy.
2. Batched inference throughput of the full SG-MFT forward (backbone + head) in bf16 at
   batch 256; the goal on one H100 is at least 5,000 posts/s.
Run: python -m benchmarks.gpu_check   (writes benchmarks/results/gpu_check.json)
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import save
from sgmft.config import TrainConfig, model_config_for
from sgmft.models.model import build_model
from sgmft.optim import build_optimization
from sgmft.train_loop import ClassificationLoss, train_step


def timed(fn, repeats: int) -> float:
    """Seconds per call of ``fn`` on the GPU, synchronised before and after."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def bare_train_step(model_cfg, batch: int, repeats: int) -> dict:
    """Samples/s of the bf16 training step Ray Train workers run (forward, backward, clipping,
    AdamW, schedule: :func:`sgmft.train_loop.train_step`) on device-resident inputs.

    The upper bound for a Ray Train epoch of the same model and batch: no data loading,
    no DDP, no reporting. Pixels are uint8, as the pipeline delivers them.
    """
    device = torch.device("cuda")
    model = build_model(model_cfg, load_pretrained=False).to(device).train()
    ids = torch.randint(1000, 20000, (batch, 52), device=device)
    pixels = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device=device)
    labels = torch.randint(0, model_cfg.num_labels, (batch,), device=device)
    train_cfg = TrainConfig()
    optimizer, scheduler = build_optimization(model, train_cfg, device, total_updates=repeats + 3)
    inputs = {"input_ids": ids, "pixel_values": pixels, "label_id": labels}
    loss_fn = ClassificationLoss(torch.nn.CrossEntropyLoss())

    def step():
        train_step(model, inputs, loss_fn, optimizer, scheduler, autocast=torch.autocast("cuda", dtype=torch.bfloat16),
                   max_grad_norm=train_cfg.max_grad_norm)

    for _ in range(3):
        step()
    step_s = timed(step, repeats)
    result = {"batch": batch, "seconds": step_s, "samples_per_s": batch / step_s,
              "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    return result  # the model and optimizer go with this frame; callers empty the CUDA cache


def vit_b16_config(policy: str = "last_k"):
    cfg = model_config_for("ViT-B-16", num_labels=10)
    cfg.backbone.policy, cfg.backbone.trainable_last_k = policy, 4
    return cfg


def run(quick: bool = False, compile_model: bool = False) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU; nothing measured")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = vit_b16_config()
    result: dict = {"gpu": torch.cuda.get_device_name(0), "preset": "ViT-B-16", "d_model": cfg.d_model}
    batch = 64
    result["train_step"] = bare_train_step(cfg, batch, 5 if quick else 20)
    torch.cuda.empty_cache()
    model = build_model(cfg, load_pretrained=False).to(device)
    model.eval()
    forward = torch.compile(model) if compile_model else model
    serve_batch = 256
    ids = torch.randint(1000, 20000, (serve_batch, 52), device=device)
    pixels = torch.randint(0, 256, (serve_batch, 3, 224, 224), dtype=torch.uint8, device=device)

    @torch.inference_mode()
    def infer():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            forward(ids, pixels).logits.float()

    for _ in range(3):
        infer()
    infer_s = timed(infer, 5 if quick else 20)
    result["inference"] = {"batch": serve_batch, "seconds": infer_s, "posts_per_s": serve_batch / infer_s,
                           "compiled": compile_model, "goal_posts_per_s_h100": 5000}
    print(f"{result['gpu']}: bf16 train step {result['train_step']['samples_per_s']:.0f} samples/s; "
          f"bf16 inference at batch {serve_batch}: {serve_batch / infer_s:.0f} posts/s")
    save("gpu_check", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also torch.compile the inference model")
    args = parser.parse_args()
    run(args.quick, args.compile)
