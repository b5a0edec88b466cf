"""What users of the Serve app see: closed-loop HTTP load against the in-process baseline.

    python -m benchmarks.serve_load [--quick] [--python-proxy]   CPU: tiny demo model
    python -m benchmarks.serve_load --compare-proxies            both proxies, one after the other
    python -m benchmarks.serve_load --gpu                        GPU: ViT-B-16 bf16, writes gpu_serve.json
    python -m benchmarks.serve_load ... --apps NAME... --tag TAG   some app variants, into <result>_TAG.json

Posts are photo-sized JPEGs (640x480, made from the workshop corpus images where
../shared/corpus exists, else drawn by the synthetic generator) with Weibo-like texts, sent
as JSON with base64 images by aiohttp clients in several processes (closed loop: each client
sends its next post when the last one is answered, or, answered 503, after its Retry-After;
their CPU time is reported), at concurrency 1 to 512. Side by side in the same run, on the
same cores, with Ray started as ``sgmft serve`` starts it (the HAProxy fast path, unless
``--python-proxy``):

- ``serve``: the app as ``sgmft serve`` builds it, over HTTP on 127.0.0.1;
- ``serve_colocated`` (CPU): the same with ``serve.model_placement: ingress`` and one
  ingress replica per core;
- ``inprocess``: decode + tokenise + forward of the same posts in this process, one post
  per call on one thread (what one post costs without serving), and the same in batches.

Every point has the CPU time of the service's processes per answered post, by kind (proxy,
ingress, model replica, Ray's own), read from /proc over the load window; the in-process
points have their own CPU time a post. The machine's load average at the start and the end
is saved with the result: a run beside other work is not a measurement.

Writes benchmarks/results/serve_load.json (CPU), serve_load_python_proxy.json, or
gpu_serve.json (GPU); ``--compare-proxies`` runs the first two and writes
serve_load_proxies.json, the two proxies back to back, each against its own in-process rows.
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
from serve_app.fastpath import use_fast_path

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
    server_cpu_ms_per_post: dict[str, float] | None = None
    """CPU time of the service's processes per answered post over the load window, by kind
    (proxy, ingress, model replica, ray), and their total; the clients' is not in it."""
    refusal_p50_ms: float | None = None
    refusal_p99_ms: float | None = None
    """How long a refused post waited for its 503; None where none was refused."""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def make_point(mode: str, concurrency: int, seconds: float, latencies: list[float], statuses: Counter,
               batches: list[int]) -> Point:
    ms = [x * 1000 for x in latencies]
    errors = sum(n for code, n in statuses.items() if code not in ("200", "503"))  # 503: shed, counted in statuses
    return Point(mode, concurrency, round(seconds, 2), len(latencies), errors, dict(statuses), len(latencies) / seconds,
                 percentile(ms, 50), percentile(ms, 95), percentile(ms, 99), statistics.fmean(batches) if batches else 0.0)


# --- CPU time of the service's processes -------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_kind(cmdline: str) -> str:
    """What a process under this one does for the service, from its command line."""
    if "multiprocessing" in cmdline:
        return "client"  # the load generator's processes: their CPU time is reported apart
    if "SGMFTIngress" in cmdline:
        return "ingress"
    if "SGMFTModel" in cmdline:
        return "model_replica"
    if "haproxy" in cmdline.lower() or "ProxyActor" in cmdline:
        return "proxy"
    return "ray"


def service_cpu_seconds() -> dict[int, tuple[str, float]]:
    """pid -> (kind, user + system CPU seconds) of every process under this one: the local Ray
    it started (its daemons, workers, replicas and HAProxy) and the load clients."""
    stats: dict[int, tuple[int, str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        stats[int(entry.name)] = (int(fields[1]), cmdline, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    ours, frontier = {}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, cmdline, cpu) in stats.items():
            if ppid == parent and pid not in ours:
                ours[pid] = (process_kind(cmdline), cpu)
                frontier.append(pid)
    return ours


def cpu_ms_per_post(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], posts: int) -> dict[str, float]:
    """CPU-ms a post by kind between two snapshots (a process started between them counts from 0)."""
    by_kind: Counter = Counter()
    for pid, (kind, cpu) in after.items():
        if kind != "client":
            by_kind[kind] += cpu - before.get(pid, (kind, 0.0))[1]
    result = {kind: round(1000 * seconds / max(1, posts), 3) for kind, seconds in sorted(by_kind.items())}
    result["total"] = round(sum(result.values()), 3)
    return result


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
                       headers: dict[str, str]) -> tuple[list[float], list[float], Counter, list[int], float, float]:
    import json

    import aiohttp

    latencies: list[float] = []
    refusals: list[float] = []
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
                    if r.status == 503:  # shed: a well-behaved client waits as it is told
                        refusals.append(time.perf_counter() - t0)
                        await asyncio.sleep(min(float(r.headers.get("Retry-After") or 1), deadline - time.perf_counter()))
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    statuses[type(exc).__name__] += 1
                i += concurrency

        await asyncio.gather(*(one_client(k) for k in range(concurrency)))
        return latencies, refusals, statuses, batches, time.perf_counter() - start, time.process_time() - cpu_start


def client_process(url: str, bodies: list[bytes], concurrency: int, duration_s: float, offset: int,
                   headers: dict[str, str]) -> tuple[list[float], list[float], Counter, list[int], float, float]:
    """Closed-loop clients on aiohttp, posting pre-encoded JSON bodies: the load generator
    shares the cores with the server, so it spends as little of them as it can (httpx took
    six times the CPU per request); its CPU time is measured and reported."""
    return asyncio.run(_closed_loop(url, bodies, concurrency, duration_s, offset, headers))


def http_point(pool: ProcessPoolExecutor, processes: int, url: str, bodies: list[bytes], concurrency: int,
               duration_s: float, mode: str = "serve", headers: dict[str, str] | None = None) -> Point:
    """``concurrency`` clients spread over up to ``processes`` client processes."""
    shares = [concurrency // processes + (1 if k < concurrency % processes else 0) for k in range(processes)]
    cpu_before = service_cpu_seconds()
    futures = [pool.submit(client_process, url, bodies, share, duration_s, 1000 * k, headers or {})
               for k, share in enumerate(shares) if share]
    latencies, refusals, statuses, batches, seconds, client_cpu = [], [], Counter(), [], 0.0, 0.0
    for future in futures:
        lat, refused, st, ba, elapsed, cpu = future.result()
        latencies += lat
        refusals += refused
        statuses.update(st)
        batches += ba
        seconds = max(seconds, elapsed)
        client_cpu += cpu
    point = make_point(mode, concurrency, seconds, latencies, statuses, batches)
    point.client_cpu_ms_per_post = 1000 * client_cpu / max(1, len(latencies))
    point.server_cpu_ms_per_post = cpu_ms_per_post(cpu_before, service_cpu_seconds(), len(latencies))
    if refusals:
        point.refusal_p50_ms, point.refusal_p99_ms = (percentile([x * 1000 for x in refusals], q) for q in (50, 99))
    return point


# --- the in-process baseline -------------------------------------------------------------

def inprocess_point(runner, posts: list[dict], batch: int, duration_s: float) -> Point:
    """Decode + tokenise + forward + top-k of ``batch`` posts per call, in this process."""
    from sgmft.data.preprocess import preprocess_batch

    runner.warmup(batch)
    latencies: list[float] = []
    cpu_start = time.process_time()
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < duration_s:
        chunk = [posts[(i + k) % len(posts)] for k in range(batch)]
        t0 = time.perf_counter()
        inputs = preprocess_batch({"text": [p["text"] for p in chunk], "image": [p["image"] for p in chunk]}, runner.spec)
        runner.top_k(runner.probabilities(inputs["input_ids"], inputs["pixel_values"]), 3)
        latencies += [time.perf_counter() - t0] * batch  # every post of the batch waits for all of it
        i += batch
    point = make_point(f"inprocess_batch{batch}", batch, time.perf_counter() - start, latencies,
                       Counter({"200": len(latencies)}), [batch] * len(latencies))
    cpu_ms = round(1000 * (time.process_time() - cpu_start) / max(1, len(latencies)), 3)
    point.server_cpu_ms_per_post = {"inprocess": cpu_ms, "total": cpu_ms}
    return point


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
    _, _, statuses, _, _, _ = future.result()
    time.sleep(idle_s)
    return {"replicas_before": before, "replicas_peak": peak, "replicas_after_idle": running(), "statuses": dict(statuses)}


# --- the run -------------------------------------------------------------------------------

def app_variants(gpu: bool, cpus: int) -> dict[str, list[str]]:
    """The Serve apps measured, by point mode: their overrides of the default config.

    ``serve``: on a CPU, the app exactly as ``sgmft serve`` builds it (ingress replicas sized
    from the CPUs, one model replica that may scale to two); on a GPU, one model replica on
    the card, JPEGs decoded there; ``serve_cpu_decode``: the same with every image decoded by
    the ingress replicas; ``serve_2_per_gpu``: two model replicas of half the card each, so one
    prepares its batch while the other's forward runs. On a CPU, also ``serve_colocated``:
    ``serve.model_placement: ingress``, one ingress replica per core, each running its own forwards.
    """
    if gpu:
        one_gpu = ["serve.num_gpus_per_replica=1", "serve.num_cpus_per_replica=2", "serve.max_batch_size=128",
                   "serve.max_ongoing_requests=512", "serve.ingress_max_posts=256",
                   "serve.ingress_cpus_per_replica=1", "serve.min_replicas=1", "serve.max_replicas=1"]
        two_per_gpu = [o for o in one_gpu if "replicas" not in o and "num_gpus" not in o] + [
            "serve.num_gpus_per_replica=0.5", "serve.min_replicas=2", "serve.max_replicas=2"]
        return {"serve": one_gpu, "serve_cpu_decode": [*one_gpu, "serve.jpeg_decode=ingress"],
                "serve_2_per_gpu": two_per_gpu}
    return {"serve": [], "serve_colocated": ["serve.model_placement=ingress", f"serve.ingress_replicas={cpus}"]}


def inprocess_points(model_dir: Path, posts: list[dict], duration: float, gpu: bool, extra: dict[str, Any],
                     points: list[Point]) -> None:
    """The in-process baseline, one thread: one post a call, then a batch a call; on a GPU, also
    the forward alone."""
    import torch

    from sgmft.inference import InferenceRunner, batch_buckets

    torch.set_num_threads(1)
    baseline_batch = 256 if gpu else 32
    # The same runner settings as the model replica's (graphs are GPU-only; eager on a CPU).
    runner = InferenceRunner(model_dir, buckets=batch_buckets(baseline_batch), cuda_graphs=True)
    runner.warmup()
    for batch in (1, baseline_batch):
        points.append(inprocess_point(runner, posts, batch, duration))
        print(f"in-process batch {batch}: {points[-1].posts_per_s:.1f} posts/s p50 {points[-1].p50_ms:.1f} ms "
              f"CPU-ms a post {points[-1].server_cpu_ms_per_post}", flush=True)
    if gpu:
        extra["forward_only_posts_per_s"] = {n: forward_only_posts_per_s(runner, n) for n in (1, 32, baseline_batch)}
        print(f"forward only, posts/s by batch: {extra['forward_only_posts_per_s']}", flush=True)
    runner.close()


@dataclass
class Load:
    """How the HTTP points are driven: client processes, bodies, concurrencies, seconds a point."""

    pool: ProcessPoolExecutor
    processes: int
    bodies: list[bytes]
    concurrency: tuple[int, ...]
    duration: float


def serve_points(load: Load, model_dir: Path, apps: dict[str, list[str]], autoscaling: bool, extra: dict[str, Any],
                 points: list[Point], record) -> None:
    """Each app deployed in turn on the local Ray and measured at every concurrency; then, if
    asked (GPU), the half-GPU autoscaling check."""
    import httpx
    from ray import serve

    from serve_app.app import INGRESS_NAME
    from sgmft.local_ray import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for mode, overrides in apps.items():
            base = f"http://127.0.0.1:{port}{deploy(model_dir, 'bench', overrides)}"
            wait_healthy(base)
            model = httpx.get(f"{base}/v1/model", timeout=10.0, trust_env=False).json()
            extra.setdefault("model_replica", {})[mode] = {
                **{k: v for k, v in model.items() if k in ("device", "compiled_batch_sizes", "cuda_graph_batch_sizes")},
                "ingress_replicas": sum(serve.status().applications["bench"].deployments[INGRESS_NAME].replica_states.values()),
                "decode_path": {"model": "JPEGs on the model's device", "ingress": "on the ingress CPUs"}[model["jpeg_decode"]]}
            http_point(load.pool, load.processes, f"{base}/v1/predict", load.bodies, 8, min(3.0, load.duration))  # warm-up
            for c in load.concurrency:
                points.append(http_point(load.pool, load.processes, f"{base}/v1/predict", load.bodies, c, load.duration, mode))
                print(f"{mode} c={c}: {points[-1].posts_per_s:.1f} posts/s p50 {points[-1].p50_ms:.1f} ms "
                      f"CPU-ms a post {points[-1].server_cpu_ms_per_post}", flush=True)
                record()
            serve.delete("bench")
        if autoscaling:
            scaled = f"http://127.0.0.1:{port}" + deploy(model_dir, "scale", [
                o for o in app_variants(True, 0)["serve"] if "replicas" not in o and "num_gpus" not in o] + [
                "serve.num_gpus_per_replica=0.5", "serve.min_replicas=1", "serve.max_replicas=2",
                "serve.upscale_delay_s=2", "serve.downscale_delay_s=5", "serve.target_ongoing_requests=32"])
            wait_healthy(scaled)
            extra["autoscaling_half_gpu_replicas"] = autoscaling_check(load.pool, load.processes, scaled, load.bodies,
                                                                       "scale", 20.0, 15.0)
    finally:
        serve.shutdown()


def run(quick: bool = False, python_proxy: bool = False, gpu: bool = False, only: list[str] | None = None,
        tag: str | None = None) -> dict[str, Any]:
    """``only``: the app variants to measure (default all, and on a GPU the autoscaling check);
    ``tag``: saved as ``<result>_<tag>.json``, so a partial run leaves the full result alone."""
    import json

    import torch

    from benchmarks.common import local_ray

    if gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA GPU; nothing measured")
    # As `sgmft serve` starts Ray: the HAProxy fast path unless asked for Serve's Python proxy.
    fast = None if python_proxy else use_fast_path()
    # Ray starts workers at nice 15; on a shared machine that alone slows the replicas next to
    # the clients and the in-process baseline, so they get the same priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    cpus = os.cpu_count() or 2
    preset = "ViT-B-16" if gpu else "tiny"
    concurrency = (1, 32, 128, 512) if gpu else ((1, 32, 512) if quick else (1, 8, 32, 128, 512))
    duration = (6.0 if gpu else 5.0) if quick else 12.0
    processes = 8 if gpu else 2
    apps = app_variants(gpu, cpus)
    unknown = sorted(set(only or ()) - set(apps))
    if unknown:
        raise SystemExit(f"--apps: unknown {unknown}; this mode has {sorted(apps)}")
    apps = {name: overrides for name, overrides in apps.items() if not only or name in only}
    image_bytes, image_source = photos()
    post_texts, text_source = texts()
    posts = [{"text": post_texts[i % len(post_texts)], "image": image_bytes[i % len(image_bytes)]} for i in range(64)]
    bodies = [json.dumps({"text": p["text"], "image_base64": base64.b64encode(p["image"]).decode()}).encode() for p in posts]
    result_name = ("gpu_serve" if gpu else "serve_load") + ("_python_proxy" if python_proxy else "") + (f"_{tag}" if tag else "")
    setup = {"preset": preset, "posts": f"{PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} JPEG ({image_source}), {text_source}",
             "client_processes": processes, "client": "aiohttp, pre-encoded JSON bodies", "seconds_per_point": duration,
             "apps": apps, "proxy": "haproxy" if fast else "python",
             "throughput_optimized": os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1", "cpus": cpus,
             "load_average_at_start": os.getloadavg(), "client_503": "waits Retry-After, then sends again"}
    extra: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0)} if gpu else {}
    points: list[Point] = []

    def record() -> dict[str, Any]:  # saved after every point: a run cut short keeps what it measured
        result = summarise(setup, points, extra)
        save(result_name, result)
        return result

    with tempfile.TemporaryDirectory(prefix="sgmft-serve-bench-") as tmp, \
            ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        model_dir = make_model_dir(Path(tmp), preset)
        inprocess_points(model_dir, posts, duration, gpu, extra, points)
        with local_ray(num_cpus=cpus):
            try:
                serve_points(Load(pool, processes, bodies, concurrency, duration), model_dir, apps, gpu and not only, extra,
                             points, record)
            finally:
                setup["load_average_at_end"] = os.getloadavg()
    if fast is not None:
        fast.stop_haproxy()
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
            result[f"cpu_ms_per_post_c32{suffix}"] = by_c[32].server_cpu_ms_per_post
            result[f"cpu_c32_vs_inprocess{suffix}"] = (by_c[32].server_cpu_ms_per_post["total"]
                                                      / one_post.server_cpu_ms_per_post["total"])
        if 512 in by_c:
            result[f"serve_c512_posts_per_s{suffix}"] = by_c[512].posts_per_s
            result[f"serve_c512_p99_ms{suffix}"] = by_c[512].p99_ms
            result[f"serve_c512_statuses{suffix}"] = by_c[512].statuses
            result[f"serve_c512_refusal_p99_ms{suffix}"] = by_c[512].refusal_p99_ms
            if 32 in by_c:
                result[f"serve_c512_vs_c32{suffix}"] = by_c[512].posts_per_s / by_c[32].posts_per_s
    return result


def print_table(points: list[Point], result: dict[str, Any]) -> None:
    print(f"{'mode':<20}{'c':>5}{'posts/s':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'batch':>7}{'503':>6}"
          f"{'503 p99':>9}{'errors':>7}{'CPU-ms':>8}")
    for p in points:
        refused = f"{p.refusal_p99_ms:>9.1f}" if p.refusal_p99_ms is not None else f"{'-':>9}"
        print(f"{p.mode:<20}{p.concurrency:>5}{p.posts_per_s:>10.1f}{p.p50_ms:>9.1f}{p.p95_ms:>9.1f}{p.p99_ms:>9.1f}"
              f"{p.mean_batch:>7.1f}{p.statuses.get('503', 0):>6}{refused}{p.errors:>7}"
              f"{(p.server_cpu_ms_per_post or {}).get('total', 0):>8.2f}")
    for key, value in result.items():
        if key.startswith(("overhead_p50_ms_c1", "serve_c32_vs_inprocess_one_thread", "cpu_c32_vs", "serve_c512_vs")):
            print(f"{key}: {value:.2f}")
        elif key.startswith("cpu_ms_per_post_c32"):
            print(f"{key}: {value}")


def compare_proxies(quick: bool) -> dict[str, Any]:
    """Serve's Python proxy, then the fast path (HAProxy + throughput-optimized, read when Ray
    starts, so each runs in a process of its own), in one invocation; their ratios side by side."""
    import json
    import subprocess
    import sys

    modes = {"python_proxy": (["--python-proxy"], "serve_load_python_proxy"), "fast_path": ([], "serve_load")}
    result: dict[str, Any] = {}
    for mode, (flags, name) in modes.items():
        argv = [sys.executable, "-m", "benchmarks.serve_load", *(["--quick"] if quick else []), *flags]
        subprocess.run(argv, check=True, cwd=Path(__file__).resolve().parents[1])
        saved = json.loads((RESULTS / f"{name}.json").read_text())
        result[mode] = {"result_file": f"{name}.json", **{k: v for k, v in saved.items() if k.startswith((
            "inprocess_one_post_", "overhead_p50_ms_c1", "serve_c32_vs_inprocess_one_thread", "cpu_c32_vs_inprocess"))}}
    for mode, r in result.items():
        for app in ("", "_colocated"):
            print(f"{mode}{app}: +{r.get(f'overhead_p50_ms_c1{app}', float('nan')):.1f} ms p50 at 1 client, "
                  f"{r.get(f'serve_c32_vs_inprocess_one_thread{app}', float('nan')):.2f}x the one-thread in-process posts/s "
                  f"and {r.get(f'cpu_c32_vs_inprocess{app}', float('nan')):.2f}x its CPU a post at 32")
    save("serve_load_proxies", result)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer and shorter points")
    parser.add_argument("--python-proxy", action="store_true", help="Serve's Python proxy instead of the HAProxy fast path")
    parser.add_argument("--gpu", action="store_true", help="ViT-B-16 on the GPU; writes results/gpu_serve.json")
    parser.add_argument("--compare-proxies", action="store_true", help="Serve's Python proxy, then the fast path")
    parser.add_argument("--apps", nargs="+", help="only these app variants (no autoscaling check)")
    parser.add_argument("--tag", help="save as <result>_<tag>.json")
    args = parser.parse_args()
    if args.compare_proxies:
        compare_proxies(args.quick)
    else:
        run(args.quick, args.python_proxy, args.gpu, args.apps, args.tag)
