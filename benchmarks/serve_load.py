"""Closed-loop HTTP load on the Serve app at concurrency 1, 8 and 32 (not a test).

    .venv/bin/python -m benchmarks.serve_load [--quick] [--haproxy]

Compares, side by side in one run on the same machine, at the ``small`` preset (random init):

- ``serve_batched``: the Serve app over HTTP on 127.0.0.1 with dynamic batching on
  (max_batch_size 32);
- ``serve_unbatched``: the same app with max_batch_size 1;
- ``inprocess``: preprocess + forward in this process, no HTTP and no Serve; at
  concurrency c it handles c posts as one batch, the ideal that dynamic batching
  approximates (at c = 1: one plain call).

Each configuration gets one model replica with one CPU (one torch thread), and the
in-process baseline uses one torch thread too, so the comparison is of serving paths, not
of compute. Both apps are deployed side by side and the points are interleaved by
concurrency, so drifting machine load hits every mode alike. Posts are real Weibo texts and corpus images, sent as JSON with base64 images.
Writes benchmarks/results/serve_load.json and serve_load.png (latency vs concurrency).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, save

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
CONCURRENCY = (1, 8, 32)
IMAGES = ("hopper.jpg", "flower.jpg", "pil_sample_rgb.jpg", "hopper.png", "transparent.png", "hopper.webp",
          "rgb.jpg", "flower2.jpg")
FALLBACK_TEXTS = ("今天在公司加班到很晚，楼下的咖啡店都关门了", "周末带孩子去公园看花", "医院排队三个小时", "机场延误，坐在候机厅发呆")
BATCHED, UNBATCHED, INPROCESS = "serve_batched", "serve_unbatched", "inprocess"


@dataclass
class Point:
    mode: str
    concurrency: int
    duration_s: float
    requests: int
    errors: int
    throughput_rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_batch_size: float


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def make_point(mode: str, concurrency: int, elapsed: float, latencies: list[float], errors: int, batch_sizes: list[int]) -> Point:
    ms = [x * 1000 for x in latencies]
    return Point(mode, concurrency, round(elapsed, 2), len(latencies), errors, len(latencies) / elapsed,
                 percentile(ms, 50), percentile(ms, 95), percentile(ms, 99),
                 statistics.fmean(batch_sizes) if batch_sizes else float("nan"))


def posts() -> list[dict[str, Any]]:
    """Real inputs: Weibo texts of the shared corpus and images Pillow decodes."""
    texts: list[str] = []
    try:
        from sgmft.data.weibo import WeiboPost, parse_weibo_dump

        texts = [p.text for p in parse_weibo_dump(CORPUS / "weibo-rumor-2017" / "test_nonrumor.txt")
                 if isinstance(p, WeiboPost) and p.text][:64]
    except (ImportError, OSError):
        pass
    texts = texts or list(FALLBACK_TEXTS)
    images = [(CORPUS / "images" / name).read_bytes() for name in IMAGES]
    return [{"text": texts[i % len(texts)], "image": images[i % len(images)]} for i in range(max(len(texts), len(images)))]


def make_model_dir(root: Path) -> Path:
    from sgmft.checkpoint import save_model_dir
    from sgmft.config import Config, model_config_for
    from sgmft.data.labels import DEFAULT_LABELS
    from sgmft.models.sgmft import build_model

    cfg = Config()
    cfg.model = model_config_for("small", num_labels=len(DEFAULT_LABELS))
    return save_model_dir(root / "small-bench", build_model(cfg.model, load_pretrained=False), cfg, DEFAULT_LABELS,
                          {"version": "small-bench"})


# --- the two sides ------------------------------------------------------------------

async def closed_loop(url: str, payloads: list[dict[str, str]], concurrency: int, duration_s: float, mode: str) -> Point:
    """``concurrency`` clients, each sending its next request as soon as the last one answers."""
    import httpx

    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60.0, limits=limits, trust_env=False) as client:
        start = time.perf_counter()
        deadline = start + duration_s

        async def worker(offset: int) -> None:
            nonlocal errors
            i = offset
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    r = await client.post(url, json=payloads[i % len(payloads)])
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t0)
                    batch_sizes.append(r.json()["batch_size"])
                else:
                    errors += 1
                i += concurrency

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - start
    return make_point(mode, concurrency, elapsed, latencies, errors, batch_sizes)


class InProcess:
    """Preprocess ``concurrency`` posts and forward them as one batch, in this process."""

    def __init__(self, model_dir: Path):
        from serve_app.model import ModelRunner

        self.runner = ModelRunner(str(model_dir), device="cpu")

    def point(self, items: list[dict[str, Any]], concurrency: int, duration_s: float) -> Point:
        from sgmft.data.preprocess import preprocess_batch

        runner = self.runner
        runner.warmup(concurrency)
        latencies: list[float] = []
        start = time.perf_counter()
        i = 0
        while time.perf_counter() - start < duration_s:
            chunk = [items[(i + k) % len(items)] for k in range(concurrency)]
            t0 = time.perf_counter()
            inputs = preprocess_batch({"text": [p["text"] for p in chunk], "image": [p["image"] for p in chunk]}, runner.spec)
            runner.top_k(runner.probabilities(inputs["input_ids"], inputs["pixel_values"]), 3)
            latencies += [time.perf_counter() - t0] * concurrency  # every post of the batch waits for all of it
            i += concurrency
        elapsed = time.perf_counter() - start
        return make_point(INPROCESS, concurrency, elapsed, latencies, 0, [concurrency] * len(latencies))


def deploy(model_dir: Path, mode: str) -> str:
    """One app per mode, side by side (route /<mode>), so the points can be interleaved."""
    from ray import serve

    from sgmft.config import Config
    from serve_app.app import build_app

    cfg = Config()
    s = cfg.serve
    s.model_dir = str(model_dir)
    s.max_batch_size = 32 if mode == BATCHED else 1
    # Under load the next batch fills while the current one runs, so a short wait costs
    # throughput nothing and keeps the concurrency-1 latency low.
    s.batch_wait_timeout_s = 0.002
    s.max_ongoing_requests = 64
    s.min_replicas = s.max_replicas = 1
    s.num_cpus_per_replica = 1.0
    serve.run(build_app(cfg), name=mode, route_prefix=f"/{mode}")
    return f"/{mode}/v1/predict"


def hop_latencies(port: int, n: int = 100) -> dict[str, float]:
    """p50 of the serving path's pieces without the model: HTTP + proxy + ingress (GET /healthz)
    and one handle call to the model deployment (its ``info``)."""
    import httpx
    from ray import serve

    from serve_app.app import MODEL_NAME

    def p50_ms(call) -> float:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        return percentile([t * 1000 for t in times], 50)

    handle = serve.get_deployment_handle(MODEL_NAME, BATCHED)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}/{BATCHED}", trust_env=False, timeout=30.0) as http:
        return {"http_healthz_p50_ms": p50_ms(lambda: http.get("/healthz").raise_for_status()),
                "handle_call_p50_ms": p50_ms(lambda: handle.info.remote().result())}


# --- report -------------------------------------------------------------------------

def by(points: list[Point], mode: str, concurrency: int) -> Point:
    return next(p for p in points if p.mode == mode and p.concurrency == concurrency)


def summarize(points: list[Point]) -> dict[str, Any]:
    c_max = CONCURRENCY[-1]
    batched, unbatched = by(points, BATCHED, c_max), by(points, UNBATCHED, c_max)
    c1 = {mode: by(points, mode, 1) for mode in (BATCHED, UNBATCHED, INPROCESS)}
    ratios = {
        f"batched_vs_unbatched_throughput_c{c_max}": batched.throughput_rps / unbatched.throughput_rps,
        **{f"batched_vs_inprocess_throughput_c{c}": by(points, BATCHED, c).throughput_rps / by(points, INPROCESS, c).throughput_rps
           for c in CONCURRENCY},
        "overhead_p50_ms_c1_unbatched": c1[UNBATCHED].p50_ms - c1[INPROCESS].p50_ms,
        "overhead_p50_ms_c1_batched": c1[BATCHED].p50_ms - c1[INPROCESS].p50_ms,
    }
    errors = sum(p.errors for p in points)
    goals = {
        f"batched >= 3x unbatched throughput at c={c_max}": ratios[f"batched_vs_unbatched_throughput_c{c_max}"] >= 3.0,
        "HTTP+Serve adds < 5 ms p50 at c=1 (unbatched)": ratios["overhead_p50_ms_c1_unbatched"] < 5.0,
        "HTTP+Serve adds < 5 ms p50 at c=1 (batched)": ratios["overhead_p50_ms_c1_batched"] < 5.0,
        "zero errors": errors == 0,
    }
    return {"ratios": ratios, "errors": errors, "goals": goals}


def table(points: list[Point]) -> str:
    lines = [f"{'mode':<16}{'conc':>5}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'batch':>7}{'reqs':>7}{'errs':>6}"]
    for p in points:
        lines.append(f"{p.mode:<16}{p.concurrency:>5}{p.throughput_rps:>9.1f}{p.p50_ms:>9.1f}{p.p95_ms:>9.1f}"
                     f"{p.p99_ms:>9.1f}{p.mean_batch_size:>7.1f}{p.requests:>7}{p.errors:>6}")
    return "\n".join(lines)


def plot(points: list[Point], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, color in ((BATCHED, "tab:blue"), (UNBATCHED, "tab:orange"), (INPROCESS, "tab:green")):
        ps = [p for p in points if p.mode == mode]
        xs = [p.concurrency for p in ps]
        lat.plot(xs, [p.p50_ms for p in ps], "o-", color=color, label=f"{mode} p50")
        lat.plot(xs, [p.p95_ms for p in ps], "o--", color=color, alpha=0.6, label=f"{mode} p95")
        thr.plot(xs, [p.throughput_rps for p in ps], "o-", color=color, label=mode)
    for ax, ylabel in ((lat, "latency (ms, log)"), (thr, "throughput (posts/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(CONCURRENCY), [str(c) for c in CONCURRENCY])
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    lat.set_yscale("log")
    fig.suptitle("SG-MFT on Ray Serve, small preset, 1 model replica x 1 CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(quick: bool = False, haproxy: bool = False) -> dict[str, Any]:
    """Measure all three modes; write results/serve_load.json and .png; return the results."""
    import torch

    from benchmarks.common import local_ray
    from sgmft.local_ray import free_port

    if haproxy:
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"  # read by Serve's controller and proxy at start
    # Ray starts workers (the replicas) at nice 15; the load generator and the in-process
    # baseline run at nice 0. On a shared machine that alone slows the replicas' forwards, so
    # the local Ray's workers get the same priority as this process.
    os.environ.setdefault("RAY_worker_niceness", "0")
    duration = 5.0 if quick else 12.0
    items = posts()
    payloads = [{"text": p["text"], "image_base64": base64.b64encode(p["image"]).decode()} for p in items]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="sgmft-serve-bench-") as tmp:
        model_dir = make_model_dir(Path(tmp))
        torch.set_num_threads(1)  # as the model replica: one CPU, one torch thread
        inprocess = InProcess(model_dir)
        points: list[Point] = []
        # Logical CPUs for both apps at once (only one is under load at a time).
        with local_ray(num_cpus=4):
            from ray import serve

            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            try:
                urls = {mode: f"http://127.0.0.1:{port}{deploy(model_dir, mode)}" for mode in (BATCHED, UNBATCHED)}
                for url in urls.values():  # warm-up, not recorded
                    asyncio.run(closed_loop(url, payloads, 8, min(3.0, duration), "warmup"))
                hops = hop_latencies(port)
                # Interleaved by concurrency: the machine's load drifts, and each comparison
                # should see the same conditions.
                for c in CONCURRENCY:
                    points.append(inprocess.point(items, c, duration))
                    points += [asyncio.run(closed_loop(url, payloads, c, duration, mode)) for mode, url in urls.items()]
            finally:
                serve.shutdown()
    points.sort(key=lambda p: ([INPROCESS, BATCHED, UNBATCHED].index(p.mode), p.concurrency))
    result = {
        "setup": {"preset": "small", "duration_s_per_point": duration, "concurrency": list(CONCURRENCY),
                  "proxy": "haproxy" if haproxy else "default", "model_replicas": 1, "cpus_per_replica": 1,
                  "torch_threads": 1, "batch_wait_timeout_s": 0.002, "max_batch_size": {BATCHED: 32, UNBATCHED: 1},
                  "worker_niceness": os.environ["RAY_worker_niceness"],
                  "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "points": [asdict(p) for p in points],
        "hops": hops,
        **summarize(points),
    }
    # Top-level figures for benchmarks.run_all's summary line.
    result["throughput_ratio_batched_vs_unbatched_c32"] = round(result["ratios"]["batched_vs_unbatched_throughput_c32"], 2)
    result["overhead_p50_ms_c1_unbatched"] = round(result["ratios"]["overhead_p50_ms_c1_unbatched"], 2)
    name = "serve_load_haproxy" if haproxy else "serve_load"
    result["plot"] = str(RESULTS / f"{name}.png")
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(points, RESULTS / f"{name}.png")
    save(name, result)
    print(table(points))
    for key, value in {**result["ratios"], **hops}.items():
        print(f"{key}: {value:.2f}")
    for goal, met in result["goals"].items():
        print(f"[{'met' if met else 'MISSED'}] {goal}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 s per point instead of 12 s")
    parser.add_argument("--haproxy", action="store_true", help="use Serve's HAProxy proxy (RAY_SERVE_ENABLE_HA_PROXY=1)")
    args = parser.parse_args()
    run(args.quick, args.haproxy)
