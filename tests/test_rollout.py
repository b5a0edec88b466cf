"""A new model version rolled out under load, as ``serve deploy`` does it: the running
application's config changes (its ``model_dir``), Serve starts the new replicas and only then
stops the old ones."""

from __future__ import annotations

import base64
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from sgmft.config import Config
from sgmft.local_ray import free_port

CLIENTS = 4


def model_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """Two versions of the tiny model (the same weights, versions v1 and v2 in metrics.json)."""
    import json

    from sgmft.config import model_config_for
    from sgmft.model_dir import save_model_dir
    from sgmft.models.model import build_model

    cfg = Config()
    cfg.model = model_config_for("tiny", num_labels=10)
    labels = [f"place{i}" for i in range(10)]
    v1 = save_model_dir(tmp_path / "v1", build_model(cfg.model, load_pretrained=False), cfg, labels,
                        {"version": "v1", "val_accuracy": 0.1})
    v2 = tmp_path / "v2"
    shutil.copytree(v1, v2)
    metrics = json.loads((v2 / "metrics.json").read_text())
    (v2 / "metrics.json").write_text(json.dumps({**metrics, "version": "v2"}))
    return v1, v2


def app_config(model_dir: Path) -> Config:
    cfg = Config()
    cfg.serve.model_dir = str(model_dir)
    cfg.serve.num_cpus_per_replica = 0.25
    # Serve replaces a deployment's replicas a fifth (at least one) at a time: with one
    # replica of each deployment, requests wait while the only one restarts
    cfg.serve.ingress_replicas = 2
    cfg.serve.min_replicas = cfg.serve.max_replicas = 2
    return cfg


@pytest.fixture
def serve_port(ray_cluster):
    from ray import serve

    serve.shutdown()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


def test_a_new_version_rolls_out_under_load_with_no_error_and_no_slow_request(serve_port, tmp_path):
    from ray import serve

    from serve_app.app import build_app

    v1, v2 = model_dirs(tmp_path)
    serve.run(build_app(app_config(v1)), name="rollout", route_prefix="/")
    post = {"text": "周末在商场逛街", "image_base64": base64.b64encode(_image()).decode()}
    answers: list[tuple[float, float, int, str]] = []  # (sent at, seconds, status, version)
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{serve_port}", timeout=30.0, trust_env=False) as http:
            while not stop.is_set():
                sent = time.monotonic()
                r = http.post("/v1/predict", json=post)
                version = r.json().get("model_version", "") if r.status_code == 200 else r.text[:200]
                answers.append((sent, time.monotonic() - sent, r.status_code, version))

    _wait_answering(serve_port)
    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(3)
    switch = time.monotonic()
    serve.run(build_app(app_config(v2)), name="rollout", route_prefix="/", blocking=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(a[3] == "v2" and a[0] > switch for a in answers[-CLIENTS * 4:]):
        time.sleep(0.5)
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join()
    serve.delete("rollout")
    errors = [a for a in answers if a[2] != 200]
    slowest = max(a[1] for a in answers)
    print(f"{len(answers)} requests, {len(errors)} errors, slowest {slowest:.2f} s "
          f"(before the switch {max((a[1] for a in answers if a[0] + a[1] < switch), default=0):.2f} s), "
          f"versions {sorted({a[3] for a in answers if a[2] == 200})}")
    assert not errors, errors[:5]
    assert {a[3] for a in answers} == {"v1", "v2"}
    assert answers[-1][3] == "v2"
    # the switch makes nobody wait: no request over 2 s, or, on a machine so loaded that
    # requests took longer before the switch, over twice the slowest of those
    before = max((a[1] for a in answers if a[0] + a[1] < switch), default=0.0)
    assert slowest < max(2.0, 2 * before), (before, sorted(answers, key=lambda a: -a[1])[:5])


def _image() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 120, 40)).save(buf, "JPEG")
    return buf.getvalue()


def _wait_answering(port: int, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0, trust_env=False) as http:
        while time.monotonic() < deadline:
            try:
                if http.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
    raise TimeoutError(f"the app did not answer within {timeout_s:.0f} s")
