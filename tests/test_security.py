"""No open doors: the session's Ray head (token authentication) refuses a job without its
token and runs one with it; the HTTP API, with ``serve.api_key_env``, refuses requests
without a valid key (in-process, and deployed on the session cluster)."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sgmft.config import Config, ConfigError, ServeConfig, config_from_dict, model_config_for
from sgmft.data.preprocess import PreprocessSpec
from serve_app.api import create_api
from serve_app.auth import ApiKeyMiddleware, bearer_credentials, key_matches, load_api_keys

REPO = Path(__file__).resolve().parents[1]
RAY_BIN = str(Path(sys.executable).with_name("ray"))
APP_NAME, PREFIX = "security", "/secure"


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def assert_refused(r: httpx.Response, *secrets_: str) -> dict:
    """401 with the API's one error shape, a Bearer challenge, and no key in the answer."""
    assert r.status_code == 401, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == "unauthorized" and body["error"]["message"], body
    assert r.headers["www-authenticate"].startswith("Bearer"), r.headers
    for secret in secrets_:
        assert secret not in r.text and secret not in str(r.headers), "a key was echoed"
    return body["error"]


# --- the middleware in-process (no Ray) -------------------------------------------------

KEYS = ("k1-" + "a" * 40, "k2-" + "b" * 40)


class StandIn:
    info = {"version": "stand-in-v1", "labels": ["home", "office"]}

    def preparing(self):
        return contextlib.nullcontext()

    async def predict(self, input_ids, pixel_values):
        return {"top_k": [{"label": "office", "probability": 0.9}, {"label": "home", "probability": 0.1}], "batch_size": 1}


class RecordingMetrics:
    def __init__(self):
        self.requests, self.refusals = [], []

    def observe_request(self, route, method, status, seconds):
        self.requests.append((route, method, status))

    def observe_preprocess(self, seconds):
        pass

    def observe_auth_refusal(self, reason):
        self.refusals.append(reason)


@pytest.fixture
def keyed(monkeypatch):
    monkeypatch.setenv("SGMFT_UNIT_API_KEYS", f" {KEYS[0]} ,{KEYS[1]},")  # blanks and an empty item are dropped
    metrics = RecordingMetrics()
    app = create_api(StandIn(), ServeConfig(api_key_env="SGMFT_UNIT_API_KEYS", max_body_bytes=100_000),
                     PreprocessSpec(image_size=32), metrics)
    monkeypatch.delenv("SGMFT_UNIT_API_KEYS")  # read once, when the app is built
    with TestClient(app) as client:
        yield client, metrics


def test_every_route_but_healthz_needs_a_key(keyed):
    client, metrics = keyed
    assert client.get("/healthz").status_code == 200
    for method, path in (("GET", "/v1/labels"), ("GET", "/v1/model"), ("POST", "/v1/predict"), ("POST", "/v1/predict/batch"),
                         ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/no/such/route"), ("POST", "/healthz")):
        error = assert_refused(client.request(method, path))
        assert "Authorization: Bearer" in error["message"]
    assert metrics.refusals == ["missing"] * 8
    assert ("/v1/labels", "GET", 401) in metrics.requests and ("/healthz", "GET", 200) in metrics.requests


@pytest.mark.parametrize("header", [f"Bearer {KEYS[0]}x", f"Bearer {KEYS[0][:-1]}", "Bearer k1", f"Basic {KEYS[0]}",
                                    f"{KEYS[0]}", "Bearer ", f"Bearer {KEYS[0]},{KEYS[1]}"])
def test_a_wrong_key_or_scheme_is_refused(keyed, header):
    client, metrics = keyed
    r = client.get("/v1/labels", headers={"Authorization": header})
    assert_refused(r, *KEYS)
    assert metrics.refusals == (["invalid"] if header.startswith("Bearer ") and header.strip() != "Bearer" else ["missing"])


def test_either_key_is_accepted_and_the_body_still_reaches_the_route(keyed):
    client, metrics = keyed
    for key in KEYS:
        r = client.get("/v1/labels", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.json()["labels"] == ["home", "office"], r.text
    body = {"text": "今天在公司加班", "image_base64": base64.b64encode(png_bytes()).decode(), "post_id": "p1"}
    r = client.post("/v1/predict", json=body, headers={"authorization": f"bearer {KEYS[1]}"})  # scheme case-insensitive
    assert r.status_code == 200 and r.json()["label"] == "office" and r.json()["post_id"] == "p1", r.text
    # the body limit still applies behind the key check
    big = client.post("/v1/predict", content=b"x" * 200_000, headers={"Authorization": f"Bearer {KEYS[0]}",
                                                                       "Content-Type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
    assert metrics.refusals == []


def test_keys_off_by_default():
    assert ServeConfig().api_key_env is None
    with TestClient(create_api(StandIn(), ServeConfig(), PreprocessSpec(image_size=32))) as client:
        assert client.get("/v1/labels").status_code == 200


def test_an_unset_or_empty_key_variable_is_a_startup_error_naming_it(monkeypatch):
    monkeypatch.delenv("SGMFT_NOPE_KEYS", raising=False)
    with pytest.raises(ConfigError, match="SGMFT_NOPE_KEYS is not set"):
        create_api(StandIn(), ServeConfig(api_key_env="SGMFT_NOPE_KEYS"), PreprocessSpec(image_size=32))
    for empty in ("", " , ,"):
        with pytest.raises(ConfigError, match="SGMFT_NOPE_KEYS is empty"):
            load_api_keys("SGMFT_NOPE_KEYS", {"SGMFT_NOPE_KEYS": empty})
    assert load_api_keys("K", {"K": "a,b"}) == (b"a", b"b")


def test_api_key_env_must_name_a_variable():
    assert config_from_dict({"serve": {"api_key_env": "SGMFT_API_KEYS"}}).serve.api_key_env == "SGMFT_API_KEYS"
    assert config_from_dict({"serve": {"api_key_env": None}}).serve.api_key_env is None
    for bad in ("", "MY-KEYS", "1KEYS", "$KEYS", "a key"):
        with pytest.raises(ConfigError, match="serve.api_key_env"):
            config_from_dict({"serve": {"api_key_env": bad}})


def test_key_comparison_checks_every_key():
    assert key_matches(b"b", (b"a", b"b")) and not key_matches(b"c", (b"a", b"b")) and not key_matches(b"", (b"a",))
    from starlette.datastructures import Headers

    assert bearer_credentials(Headers({"authorization": "Bearer  abc "})) == b"abc"
    assert bearer_credentials(Headers({"authorization": "Token abc"})) is None
    with pytest.raises(ValueError):
        ApiKeyMiddleware(app=None, keys=(), routes=[])


# --- Ray token authentication on the session's head ------------------------------------

def no_token_env(home: Path) -> dict[str, str]:
    """A client environment with no token anywhere: no RAY_AUTH_* variables, and a HOME
    without ~/.ray/auth_token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_") and k != "RAY_ADDRESS"}
    return {**env, "HOME": str(home)}


@pytest.mark.slow
def test_the_dashboard_refuses_requests_without_the_token(ray_head):
    for headers, status in (({}, 401), ({"Authorization": "Bearer not-the-token"}, 403), (ray_head.auth_headers(), 200)):
        request = urllib.request.Request(f"{ray_head.dashboard_url}/api/jobs/", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                got = response.status
        except urllib.error.HTTPError as exc:
            got = exc.code
        assert got == status, (headers.keys(), got)


@pytest.mark.slow
def test_job_submit_without_the_token_is_refused(ray_head, tmp_path):
    cmd = [RAY_BIN, "job", "submit", "--address", ray_head.dashboard_url, "--", "python", "-c", "print('ok')"]
    without = subprocess.run(cmd, env=no_token_env(tmp_path), capture_output=True, text=True, timeout=120)
    out = without.stdout + without.stderr
    assert without.returncode != 0 and "Authentication required" in out and "Missing authentication token" in out, out[-3000:]
    assert "Connection refused" not in out and "ConnectionError" not in out, out[-3000:]

    wrong = {**no_token_env(tmp_path), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
    with_wrong = subprocess.run(cmd, env=wrong, capture_output=True, text=True, timeout=120)
    out = with_wrong.stdout + with_wrong.stderr
    assert with_wrong.returncode != 0 and "Forbidden: Invalid authentication token" in out, out[-3000:]
    assert ray_head.token not in out


@pytest.mark.slow
def test_job_submitted_with_the_token_succeeds(ray_head):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_head.dashboard_url, headers=ray_head.auth_headers())
    deadline = time.monotonic() + 60
    while True:
        try:
            job_id = client.submit_job(entrypoint="python -c \"print('ok')\"")
            break
        except RuntimeError as exc:
            # the dashboard takes jobs once its agent on the head has registered (can lag on a busy machine)
            if "No available agent" not in str(exc):
                raise
            if time.monotonic() > deadline:
                raise AssertionError(f"{exc}\n{ray_head.log_tail('dashboard_JobHead.log', 'dashboard_agent.log')}") from exc
            time.sleep(2)
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job {job_id} still {status} after 60 s"
        time.sleep(1)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job_id)
    assert "ok" in client.get_job_logs(job_id)


# --- the API with keys, deployed on the session's cluster -------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from sgmft.model_dir import save_model_dir
    from sgmft.data.labels import DEFAULT_LABELS
    from sgmft.models.model import build_model

    cfg = Config()
    cfg.model = model_config_for("tiny", num_labels=4)
    model = build_model(cfg.model, load_pretrained=False)
    return save_model_dir(tmp_path_factory.mktemp("security") / "tiny-sec", model, cfg, list(DEFAULT_LABELS)[:4],
                          {"version": "tiny-sec"})


@pytest.fixture(scope="module")
def secured(ray_cluster, model_dir, api_keys):
    """The app with serve.api_key_env naming the variable the session cluster was started with."""
    from ray import serve

    from sgmft.local_ray import free_port
    from serve_app.app import build_app

    env_name, keys = api_keys
    serve.shutdown()  # whatever another module left; this one needs its own HTTP options
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = Config()
    for key, value in {"model_dir": str(model_dir), "num_cpus_per_replica": 0.25, "min_replicas": 1, "max_replicas": 1,
                       "api_key_env": env_name}.items():
        setattr(cfg.serve, key, value)
    serve.run(build_app(cfg), name=APP_NAME, route_prefix=PREFIX)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}{PREFIX}", timeout=30.0, trust_env=False) as http:
            deadline = time.monotonic() + 90
            while http.get("/healthz").status_code != 200:  # /healthz answers without a key
                assert time.monotonic() < deadline, "the secured app did not become healthy"
                time.sleep(0.5)
            yield http, keys
    finally:
        if APP_NAME in serve.status().applications:
            serve.delete(APP_NAME)
        serve.shutdown()


@pytest.mark.slow
def test_deployed_api_requires_a_key(secured):
    http, keys = secured
    assert http.get("/healthz").status_code == 200
    assert_refused(http.get("/v1/labels"), *keys)
    assert_refused(http.get("/openapi.json"), *keys)
    assert_refused(http.get("/v1/labels", headers={"Authorization": "Bearer wrong-key"}), *keys)
    assert_refused(http.get("/v1/labels", headers={"Authorization": f"Bearer {keys[0][:-2]}"}), *keys)
    post = {"text": "健身房", "image_base64": base64.b64encode(png_bytes()).decode()}
    assert_refused(http.post("/v1/predict", json=post), *keys)


@pytest.mark.slow
def test_deployed_api_accepts_either_key(secured):
    http, keys = secured
    for key in keys:
        r = http.get("/v1/labels", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and len(r.json()["labels"]) == 4, r.text
        assert key not in r.text
    r = http.post("/v1/predict", json={"text": "健身房", "image_base64": base64.b64encode(png_bytes()).decode()},
                  headers={"Authorization": f"Bearer {keys[1]}"})
    assert r.status_code == 200, r.text
    labels = http.get("/v1/labels", headers={"Authorization": f"Bearer {keys[0]}"}).json()["labels"]
    assert r.json()["model_version"] == "tiny-sec" and r.json()["label"] in labels, r.text
    assert keys[1] not in r.text
