"""What users of the Serve app see: closed-loop HTTP load against the in-process baseline.

    python -m benchmarks.serve_load [--quick] [--haproxy]     CPU: tiny demo model
    python -m benchmarks.serve_load --compare-proxies         both proxies, one after the other
    python -m benchmarks.serve_load --gpu                     GPU: ViT-B-16 bf16, writes gpu_serve.json

Posts are photo-sized JPEGs (640x480, made from the workshop corpus images where
../shared/corpus exists, else drawn by the synthetic generator) with Weibo-like texts, sent
as JSON with base64 images by aiohttp clients in several processes (closed loop: each client
sends its next post when the last one is answered; their CPU time is reported), at
concurrency 1 to 512. Side by side in the same run, on the same cores:

- ``serve``: the app as ``sgmft serve`` builds it, over HTTP on 127.0.0.1;
- ``serve_colocated`` (CPU): the same with ``serve.model_placement: ingress`` and one
  ingress replica per core;
- ``inprocess``: decode + tokenise + forward of the same posts in this process, one post
  per call on one thread (what one post costs without serving), and the same in batches.

Writes benchmarks/results/serve_load.json (CPU) or gpu_serve.json (GPU); with
``--compare-proxies`` also serve_load_haproxy.json and serve_load_proxies.json, the two
proxies measured back to back in one invocation, each against its own in-process rows.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import statistics
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, save

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
PHOTO_SIZE = (640, 480)
CORPUS_PHOTOS = ("hopper.jpg", "flower.jpg", "flower2.jpg", "pil_sample_rgb.jpg", "rgb.jpg", "hopper.png",
                 "hopper.webp", "transparent.png")


@dataclass
class Point:
    mode: str
    concurrency: int
    seconds: float
    posts: int
    errors: int
    statuses: dict[str, int]
    posts_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_batch: float
    client_cpu_ms_per_post: float = 0.0
    """CPU time the load generator spent per answered post, on the same cores as the server."""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def make_point(mode: str, concurrency: int, seconds: float, latencies: list[float], statuses: Counter,
               batches: list[int]) -> Point:
    ms = [x * 1000 for x in latencies]
    errors = sum(n for code, n in statuses.items() if code != "200")
    return Point(mode, concurrency, round(seconds, 2), len(latencies), errors, dict(statuses), len(latencies) / seconds,
                 percentile(ms, 50), percentile(ms, 95), percentile(ms, 99), statistics.fmean(batches) if batches else 0.0)


# --- the posts -----------------------------------------------------------------------

def _as_photo(image) -> bytes:
    """A 640x480 JPEG (quality 90) of ``image``, cropped to 4:3 and resized as a phone would."""
    from PIL import Image, ImageOps

    photo = ImageOps.fit(image.convert("RGB"), PHOTO_SIZE, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def photos(n: int = 8) -> tuple[list[bytes], str]:
    from PIL import Image

    found = [CORPUS / "images" / name for name in CORPUS_PHOTOS if (CORPUS / "images" / name).is_file()]
    if found:
        return [_as_photo(Image.open(path)) for path in found], "corpus images"
    import numpy as np

    from sgmft.data.synth import category_style, draw_category_image

    return [_as_photo(draw_category_image(np.random.default_rng(i), category_style(i % 10, 10), 480)) for i in range(n)], \
        "synthetic images"


def texts(n: int = 64) -> tuple[list[str], str]:
    try:
        from sgmft.data.weibo import WeiboPost, parse_weibo_dump

        found = [p.text for p in parse_weibo_dump(CORPUS / "weibo-rumor-2017" / "test_nonrumor.txt")
                 if isinstance(p, WeiboPost) and p.text][:n]
        if found:
            return found, "corpus Weibo posts"
    except OSError:
        pass
    import numpy as np

    from sgmft.data.labels import DEFAULT_LABELS
    from sgmft.data.synth import chatter_sentences, cue_text

    chatter, _ = chatter_sentences(DEFAULT_LABELS)
    rng = np.random.default_rng(0)
    return [cue_text(rng, DEFAULT_LABELS[i % 10]) if i % 2 else chatter[i] for i in range(n)], "synthetic texts"


# --- clients, in processes -------------------------------------------------------------

async def _closed_loop(url: str, bodies: list[bytes], concurrency: int, duration_s: float, offset: int,
                       headers: dict[str, str]) -> tuple[list[float], Counter, list[int], float, float]:
    import json

    import aiohttp

    latencies: list[float] = []
    statuses: Counter = Counter()
    batches: list[int] = []
    cpu_start = time.process_time()
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60.0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False,
                                     headers={"Content-Type": "application/json", **headers}) as session:
        start = time.perf_counter()
        deadline = start + duration_s

        async def one_client(k: int) -> None:
            i = offset + k
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    async with session.post(url, data=bodies[i % len(bodies)]) as r:
                        body = await r.read()
                        statuses[str(r.status)] += 1
                        if r.status == 200:
                            latencies.append(time.perf_counter() - t0)
                            batches.append(json.loads(body)["batch_size"])
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    statuses[type(exc).__name__] += 1
                i += concurrency

        await asyncio.gather(*(one_client(k) for k in range(concurrency)))
        return latencies, statuses, batches, time.perf_counter() - start, time.process_time() - cpu_start


def client_process(url: str, bodies: list[bytes], concurrency: int, duration_s: float, offset: int,
                   headers: dict[str, str]) -> tuple[list[float], Counter, list[int], float, float]:
    """Closed-loop clients on aiohttp, posting pre-encoded JSON bodies: the load generator
    shares the cores with the server, so it spends as little of them as it can (httpx took
    six times the CPU per request); its CPU time is measured and reported."""
    return asyncio.run(_closed_loop(url, bodies, concurrency, duration_s, offset, headers))


def http_point(pool: ProcessPoolExecutor, processes: int, url: str, bodies: list[bytes], concurrency: int,
               duration_s: float, mode: str = "serve", headers: dict[str, str] | None = None) -> Point:
    """``concurrency`` clients spread over up to ``processes`` client processes."""
    shares = [concurrency // processes + (1 if k < concurrency % processes else 0) for k in range(processes)]
    futures = [pool.submit(client_process, url, bodies, share, duration_s, 1000 * k, headers or {})
               for k, share in enumerate(shares) if share]
    latencies, statuses, batches, seconds, client_cpu = [], Counter(), [], 0.0, 0.0
    for future in futures:
        lat, st, ba, elapsed, cpu = future.result()
        latencies += lat
        statuses.update(st)
        batches += ba
        seconds = max(seconds, elapsed)
        client_cpu += cpu
    point = make_point(mode, concurrency, seconds, latencies, statuses, batches)
    point.client_cpu_ms_per_post = 1000 * client_cpu / max(1, len(latencies))
    return point


# --- the in-process baseline -------------------------------------------------------------

def inprocess_point(runner, posts: list[dict], batch: int, duration_s: float) -> Point:
    """Decode + tokenise + forward + top-k of ``batch`` posts per call, in this process."""
    from sgmft.data.preprocess import preprocess_batch

    runner.warmup(batch)
    latencies: list[float] = []
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < duration_s:
        chunk = [posts[(i + k) % len(posts)] for k in range(batch)]
        t0 = time.perf_counter()
        inputs = preprocess_batch({"text": [p["text"] for p in chunk], "image": [p["image"] for p in chunk]}, runner.spec)
        runner.top_k(runner.probabilities(inputs["input_ids"], inputs["pixel_values"]), 3)
        latencies += [time.perf_counter() - t0] * batch  # every post of the batch waits for all of it
        i += batch
    return make_point(f"inprocess_batch{batch}", batch, time.perf_counter() - start, latencies,
                      Counter({"200": len(latencies)}), [batch] * len(latencies))


def forward_only_posts_per_s(runner, batch: int, repeats: int = 20) -> dict[str, float]:
    """The model alone on device-resident inputs (what the card computes), eager and, where
    the runner captured one for ``batch``, as a CUDA graph replay; GPU only."""
    import torch

    from benchmarks.gpu_check import timed
    from sgmft.inference import autocast

    size, length = runner.spec.image_size, runner.spec.context_length
    ids = torch.randint(1000, 20000, (batch, length), device=runner.device)
    pixels = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=runner.device)

    def posts_per_s(step) -> float:
        for _ in range(3):
            step()
        return batch / timed(step, repeats)

    with torch.inference_mode(), autocast(runner.device):
        result = {"eager": posts_per_s(lambda: runner.loaded.model(ids, pixels).logits.float())}
    captured = runner._graphs.get(batch)
    if captured is not None:
        result["cuda_graph"] = posts_per_s(captured.graph.replay)
    return result


# --- the app -------------------------------------------------------------------------------

def make_model_dir(root: Path, preset: str) -> Path:
    from sgmft.model_dir import save_model_dir
    from sgmft.config import Config, model_config_for
    from sgmft.data.labels import DEFAULT_LABELS
    from sgmft.models.model import build_model

    cfg = Config()
    cfg.model = model_config_for(preset, num_labels=len(DEFAULT_LABELS))
    return save_model_dir(root / f"{preset}-bench", build_model(cfg.model, load_pretrained=False), cfg, DEFAULT_LABELS,
                          {"version": f"{preset}-bench"})


def deploy(model_dir: Path, name: str, overrides: list[str]) -> str:
    from ray import serve

    from serve_app.app import build_app
    from sgmft.config import load_config

    cfg = load_config(None, [f"serve.model_dir={model_dir}", *overrides])
    serve.run(build_app(cfg), name=name, route_prefix=f"/{name}")
    return f"/{name}"


def wait_healthy(base: str, timeout_s: float = 300.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=5.0, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{base} did not become healthy in {timeout_s:.0f}s")


def autoscaling_check(pool, processes, url_base: str, bodies: list[bytes], app: str, load_s: float,
                      idle_s: float) -> dict[str, Any]:
    """Replicas of the model deployment under load and after it: 1 -> 2 -> 1 expected."""
    from ray import serve

    from serve_app.app import MODEL_NAME

    def running() -> int:
        status = serve.status().applications[app].deployments[MODEL_NAME]
        return sum(n for state, n in status.replica_states.items() if str(getattr(state, "value", state)) == "RUNNING")

    before = running()
    future = pool.submit(client_process, f"{url_base}/v1/predict", bodies, 64, load_s, 0, {})
    peak, deadline = before, time.monotonic() + load_s
    while time.monotonic() < deadline:
        peak = max(peak, running())
        time.sleep(1.0)
    _, statuses, _, _, _ = future.result()
    time.sleep(idle_s)
    return {"replicas_before": before, "replicas_peak": peak, "replicas_after_idle": running(), "statuses": dict(statuses)}


# --- the run -------------------------------------------------------------------------------

def app_variants(gpu: bool, cpus: int) -> dict[str, list[str]]:
    """The Serve apps measured, by point mode: their overrides of the default config.

    ``serve``: the app as ``sgmft serve`` builds it (one ingress, one model replica). On a
    CPU, also ``serve_colocated``: ``serve.model_placement: ingress`` with one ingress
    replica per core, the setting the README recommends for CPU-only nodes.
    """
    pinned = ["serve.min_replicas=1", "serve.max_replicas=1"]
    if gpu:
        return {"serve": ["serve.num_gpus_per_replica=1", "serve.num_cpus_per_replica=2", "serve.max_batch_size=128",
                          "serve.max_ongoing_requests=512", f"serve.ingress_replicas={max(1, cpus // 2 - 2)}",
                          "serve.ingress_cpus_per_replica=1", *pinned]}
    common = ["serve.num_cpus_per_replica=0.5", "serve.max_batch_size=32", "serve.max_ongoing_requests=64", *pinned]
    return {"serve": [*common, "serve.ingress_replicas=1"],
            "serve_colocated": [*common, "serve.model_placement=ingress", f"serve.ingress_replicas={cpus}"]}


def run(quick: bool = False, haproxy: bool = False, gpu: bool = False) -> dict[str, Any]:
    import json

    import httpx
    import torch

    from benchmarks.common import local_ray
    from sgmft.inference import InferenceRunner, batch_buckets
    from sgmft.local_ray import free_port

    if gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA GPU; nothing measured")
    if haproxy:
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"  # read by Serve's controller and proxies at start
    # Ray starts workers at nice 15; on a shared machine that alone slows the replicas next to
    # the clients and the in-process baseline, so they get the same priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    cpus = os.cpu_count() or 2
    preset = "ViT-B-16" if gpu else "tiny"
    concurrency = (1, 32, 128, 512) if gpu else ((1, 32) if quick else (1, 8, 32, 128))
    duration = (6.0 if gpu else 5.0) if quick else 12.0
    processes = 8 if gpu else 2
    apps = app_variants(gpu, cpus)
    image_bytes, image_source = photos()
    post_texts, text_source = texts()
    posts = [{"text": post_texts[i % len(post_texts)], "image": image_bytes[i % len(image_bytes)]} for i in range(64)]
    bodies = [json.dumps({"text": p["text"], "image_base64": base64.b64encode(p["image"]).decode()}).encode() for p in posts]
    result_name = ("gpu_serve" if gpu else "serve_load") + ("_haproxy" if haproxy else "")
    setup = {"preset": preset, "posts": f"{PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} JPEG ({image_source}), {text_source}",
             "client_processes": processes, "client": "aiohttp, pre-encoded JSON bodies", "seconds_per_point": duration,
             "apps": apps, "proxy": "haproxy" if haproxy else "default",
             "throughput_optimized": os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1", "cpus": cpus}
    extra: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0)} if gpu else {}
    points: list[Point] = []

    def record() -> dict[str, Any]:  # saved after every point: a run cut short keeps what it measured
        result = summarise(setup, points, extra)
        save(result_name, result)
        return result

    with tempfile.TemporaryDirectory(prefix="sgmft-serve-bench-") as tmp, \
            ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        model_dir = make_model_dir(Path(tmp), preset)
        torch.set_num_threads(1)
        baseline_batch = 256 if gpu else 32
        # The same runner settings as the model replica's (graphs are GPU-only; eager on a CPU).
        runner = InferenceRunner(model_dir, buckets=batch_buckets(baseline_batch), cuda_graphs=True)
        runner.warmup()
        for batch in (1, baseline_batch):
            points.append(inprocess_point(runner, posts, batch, duration))
            print(f"in-process batch {batch}: {points[-1].posts_per_s:.1f} posts/s p50 {points[-1].p50_ms:.1f} ms", flush=True)
        if gpu:
            extra["forward_only_posts_per_s"] = {n: forward_only_posts_per_s(runner, n) for n in (1, 32, baseline_batch)}
            print(f"forward only, posts/s by batch: {extra['forward_only_posts_per_s']}", flush=True)
        del runner
        with local_ray(num_cpus=cpus + (2 if not gpu else 0)):
            from ray import serve

            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            try:
                for mode, overrides in apps.items():
                    base = f"http://127.0.0.1:{port}{deploy(model_dir, 'bench', overrides)}"
                    wait_healthy(base)
                    extra.setdefault("model_replica", {})[mode] = {
                        k: v for k, v in httpx.get(f"{base}/v1/model", timeout=10.0, trust_env=False).json().items()
                        if k in ("device", "compiled_batch_sizes", "cuda_graph_batch_sizes")}
                    http_point(pool, processes, f"{base}/v1/predict", bodies, 8, min(3.0, duration))  # warm-up
                    for c in concurrency:
                        points.append(http_point(pool, processes, f"{base}/v1/predict", bodies, c, duration, mode))
                        print(f"{mode} c={c}: {points[-1].posts_per_s:.1f} posts/s p50 {points[-1].p50_ms:.1f} ms", flush=True)
                        record()
                    serve.delete("bench")
                if gpu:
                    scaled = f"http://127.0.0.1:{port}" + deploy(model_dir, "scale", [
                        o for o in apps["serve"] if "replicas" not in o and "num_gpus" not in o] + [
                        "serve.num_gpus_per_replica=0.5", "serve.min_replicas=1", "serve.max_replicas=2",
                        "serve.upscale_delay_s=2", "serve.downscale_delay_s=5", "serve.target_ongoing_requests=32"])
                    wait_healthy(scaled)
                    extra["autoscaling_half_gpu_replicas"] = autoscaling_check(pool, processes, scaled, bodies, "scale", 20.0, 15.0)
            finally:
                serve.shutdown()
    result = record()
    print_table(points, result)
    return result


def summarise(setup: dict[str, Any], points: list[Point], extra: dict[str, Any]) -> dict[str, Any]:
    """The result file: every point, and the ratios the goals are stated in, per app."""
    one_post, batched = points[0], points[1]
    result: dict[str, Any] = {
        "setup": setup,
        "points": [asdict(p) for p in points],
        "inprocess_one_post_posts_per_s": one_post.posts_per_s,
        "inprocess_one_post_p50_ms": one_post.p50_ms,
        f"inprocess_batch{batched.concurrency}_posts_per_s": batched.posts_per_s,
        "errors": sum(p.errors for p in points),
        **extra,
    }
    for mode in dict.fromkeys(p.mode for p in points[2:]):
        by_c = {p.concurrency: p for p in points if p.mode == mode}
        suffix = "" if mode == "serve" else mode.removeprefix("serve")
        if 1 in by_c:
            result[f"overhead_p50_ms_c1{suffix}"] = by_c[1].p50_ms - one_post.p50_ms
        if 32 in by_c:
            result[f"serve_c32_vs_inprocess_one_thread{suffix}"] = by_c[32].posts_per_s / one_post.posts_per_s
        if 512 in by_c:
            result[f"serve_c512_posts_per_s{suffix}"] = by_c[512].posts_per_s
    return result


def print_table(points: list[Point], result: dict[str, Any]) -> None:
    print(f"{'mode':<20}{'c':>5}{'posts/s':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'batch':>7}{'errors':>7}")
    for p in points:
        print(f"{p.mode:<20}{p.concurrency:>5}{p.posts_per_s:>10.1f}{p.p50_ms:>9.1f}{p.p95_ms:>9.1f}{p.p99_ms:>9.1f}"
              f"{p.mean_batch:>7.1f}{p.errors:>7}")
    for key, value in result.items():
        if key.startswith(("overhead_p50_ms_c1", "serve_c32_vs_inprocess_one_thread")):
            print(f"{key}: {value:.2f}")


HIGH_THROUGHPUT_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def compare_proxies(quick: bool) -> dict[str, Any]:
    """The default proxy, then Serve's high-throughput switches (read when Ray starts, so each
    mode runs in a process of its own), in one invocation; their ratios side by side."""
    import json
    import subprocess
    import sys

    modes = {"default": ({}, "serve_load"), "haproxy_throughput_optimized": (HIGH_THROUGHPUT_ENV, "serve_load_haproxy")}
    result: dict[str, Any] = {}
    for mode, (env, name) in modes.items():
        argv = [sys.executable, "-m", "benchmarks.serve_load", *(["--quick"] if quick else []), *(["--haproxy"] if env else [])]
        subprocess.run(argv, env={**os.environ, **env}, check=True, cwd=Path(__file__).resolve().parents[1])
        saved = json.loads((RESULTS / f"{name}.json").read_text())
        result[mode] = {"env": env, "result_file": f"{name}.json", **{k: v for k, v in saved.items() if k.startswith((
            "inprocess_one_post_", "overhead_p50_ms_c1", "serve_c32_vs_inprocess_one_thread"))}}
    for mode, r in result.items():
        for app in ("", "_colocated"):
            print(f"{mode}{app}: +{r.get(f'overhead_p50_ms_c1{app}', float('nan')):.1f} ms p50 at 1 client, "
                  f"{r.get(f'serve_c32_vs_inprocess_one_thread{app}', float('nan')):.2f}x the one-thread in-process posts/s at 32")
    save("serve_load_proxies", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer and shorter points")
    parser.add_argument("--haproxy", action="store_true", help="Serve's HAProxy proxy (RAY_SERVE_ENABLE_HA_PROXY=1)")
    parser.add_argument("--gpu", action="store_true", help="ViT-B-16 on the GPU; writes results/gpu_serve.json")
    parser.add_argument("--compare-proxies", action="store_true", help="the default proxy, then HAProxy + throughput-optimized")
    args = parser.parse_args()
    compare_proxies(args.quick) if args.compare_proxies else run(args.quick, args.haproxy, args.gpu)
