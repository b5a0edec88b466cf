"""Where a model replica's time goes, batch by batch, in this process (no Ray, no HTTP).

    python -m benchmarks.model_replica_profile [--quick]   CPU: tiny demo model
    python -m benchmarks.model_replica_profile --gpu       GPU: ViT-B-16 bf16, CUDA graphs

Under load on an H200 the model replica was one core busy while the GPU computed about half
the time (gpu_serve.json: 51 forwards of 30 posts a second at 512 clients, each forward ~9 ms
on the card). This runs :meth:`serve_app.app.ServedModel.run` on batches as ingresses send
them (JPEG bytes, or pixels the ingress decoded) and times each phase with the device
synchronised between phases: the images to the device (decode, copies), the forward, and
the top-k answers; wall and CPU time (``time.thread_time``, which counts a CUDA sync's spin).
Then ``torch.profiler`` over a few runs, its operators by self CPU time.

Writes benchmarks/results/model_replica_profile.json (CPU) or gpu_model_replica_profile.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import save
from benchmarks.serve_load import make_model_dir, photos, texts


def timed(step: Callable[[], Any], sync: Callable[[], None], repeats: int) -> dict[str, float]:
    """Median wall and CPU milliseconds of ``step``, the device synchronised after each call."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.thread_time()
        step()
        sync()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.thread_time() - cpu)
    return {"wall_ms": 1000 * statistics.median(walls), "cpu_ms": 1000 * statistics.median(cpus)}


def phases(served, batches: list, sync: Callable[[], None], repeats: int) -> dict[str, dict[str, float]]:
    """Each phase of ``ServedModel.run`` on ``batches`` alone, then the whole run."""
    import numpy as np

    input_ids = np.concatenate([b.input_ids for b in batches])
    pixels, _ = served._pixels(batches)
    probs = served.runner.probabilities(input_ids, pixels)
    return {
        "images_to_device": timed(lambda: served._pixels(batches), sync, repeats),
        "forward": timed(lambda: served.runner.probabilities(input_ids, pixels), sync, repeats),
        "top_k": timed(lambda: served.runner.top_k(probs, 3), sync, repeats),
        "whole_run": timed(lambda: served.run(batches), sync, repeats),
    }


def profiler_table(served, batches: list, gpu: bool, runs: int = 5) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(runs):
            served.run(batches)
        if gpu:
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=50)


def run(quick: bool = False, gpu: bool = False) -> dict[str, Any]:
    import numpy as np
    import torch

    from serve_app.app import PostBatch, ServedModel
    from sgmft.data.preprocess import image_pixels, tokenize

    if gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA GPU; nothing measured")
    torch.set_num_threads(1)  # as a replica with one CPU
    preset, sizes = ("ViT-B-16", (8, 32, 128)) if gpu else ("tiny", (8, 32))
    repeats = 5 if quick else 20
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    images, image_source = photos()
    post_texts, _ = texts()
    result: dict[str, Any] = {"preset": preset, "posts": f"640x480 JPEG ({image_source})", "repeats": repeats,
                              "by_batch": {}}
    with tempfile.TemporaryDirectory(prefix="sgmft-replica-profile-") as tmp:
        served = ServedModel(str(make_model_dir(Path(tmp), preset)), max_batch_size=max(sizes), top_k=3, cuda_graphs=True)
        spec = served.runner.spec
        for size in sizes:
            ids = tokenize([post_texts[i % len(post_texts)] for i in range(size)], spec.context_length)
            jpegs = [images[i % len(images)] for i in range(size)]
            # As they arrive at a model replica: several ingresses' batches of 8, merged into one run.
            as_jpegs = [PostBatch.of(list(zip(ids[i:i + 8], jpegs[i:i + 8]))) for i in range(0, size, 8)]
            as_pixels = [PostBatch.of([(ids[i + k], image_pixels(jpegs[i + k], spec)) for k in range(min(8, size - i))])
                         for i in range(0, size, 8)]
            served.run(as_jpegs), served.run(as_pixels)  # warm: decoder state, graphs
            result["by_batch"][size] = {"jpegs": phases(served, as_jpegs, sync, repeats),
                                        "pixels": phases(served, as_pixels, sync, repeats)}
            print(size, result["by_batch"][size], flush=True)
        biggest = [PostBatch.of(list(zip(ids[i:i + 8], jpegs[i:i + 8]))) for i in range(0, max(sizes), 8)]
        result["profiler_self_cpu"] = profiler_table(served, biggest, gpu)
        print(result["profiler_self_cpu"], flush=True)
        served.close()
    result["forward_share_of_run"] = {size: r["jpegs"]["forward"]["wall_ms"] / r["jpegs"]["whole_run"]["wall_ms"]
                                      for size, r in result["by_batch"].items()}
    save("gpu_model_replica_profile" if gpu else "model_replica_profile", result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--gpu", action="store_true", help="ViT-B-16 on the GPU")
    args = parser.parse_args()
    run(args.quick, args.gpu)


if __name__ == "__main__":
    main()
