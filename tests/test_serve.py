"""The Serve app over real HTTP on 127.0.0.1, on the session's Ray cluster.

One app (tiny random-init model) serves most tests; a second one, loaded from a
``file://`` URI with short autoscaling delays, scales 1 -> 2 -> 1; the last test deploys
``serve_app/serve_config.yaml`` declaratively with ``serve deploy`` (which replaces
imperatively run apps, hence last).
"""

from __future__ import annotations

import base64
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hostile_images as hi
import httpx
import pytest
import yaml

from sgmft.model_dir import save_model_dir
from sgmft.config import Config, ConfigError, model_config_for
from sgmft.local_ray import free_port
from sgmft.models.model import build_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
IMAGES = hi.corpus_dir() / "images"  # the workshop corpus: absent on a fresh clone, its tests skip
MAX_BODY = 1_000_000  # small, so the oversized-body tests send little
MAX_ITEMS = 8
IMAGE_CODES = {"image_too_large", "image_undecodable", "image_truncated", "image_empty", "image_zero_size"}
# Reasons that are unambiguous for a file of the manifest; the rest must be one of IMAGE_CODES.
EXPECTED_CODE = {"decompression_bomb.gif": "image_too_large", "truncated_jpeg.jpg": "image_truncated",
                 "truncated_image.png": "image_truncated", "broken.png": "image_undecodable",
                 **{s.name: s.code for s in hi.CATALOG if s.code}}


def manifest() -> list[dict[str, str]]:
    """The corpus's MANIFEST.tsv rows; none where the corpus is absent."""
    path = IMAGES / "MANIFEST.tsv"
    return list(csv.DictReader(path.open(encoding="utf-8"), delimiter="\t")) if path.is_file() else []


def generated_manifest() -> list[dict[str, str]]:
    """The same kind of rows for the images tests/hostile_images.py makes in memory."""
    return [{"file": s.name, "expect": s.expect, "what it exercises": s.what} for s in hi.CATALOG]


def manifest_params(rows: list[dict[str, str]], source: str) -> list:
    if not rows:
        return [pytest.param(None, id=f"{source}-absent", marks=pytest.mark.skip(reason=f"the workshop corpus is not at {IMAGES.parent}"))]
    return [pytest.param(r, id=r["file"]) for r in rows]


def image_bytes(row: dict[str, str]) -> bytes:
    """A manifest row's image: generated when its name is in the catalogue, else a corpus file."""
    return hi.sample(row["file"]) if row["file"] in hi.BY_NAME else (IMAGES / row["file"]).read_bytes()


def labels_for(n: int) -> list[str]:
    try:
        from sgmft.data.labels import DEFAULT_LABELS

        return list(DEFAULT_LABELS)[:n]
    except ImportError:
        return [f"label{i}" for i in range(n)]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image(name: str = "gen_photo.jpg") -> bytes:
    """A generated image of tests/hostile_images.py (any clone has it)."""
    return hi.sample(name)


def assert_error(r: httpx.Response, status: int, code: str | None = None, mentions: str | None = None) -> dict:
    """The one error shape: {"error": {"code", "message"}}, with the expected status."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"], body
    if code is not None:
        assert body["error"]["code"] == code, body
    if mentions is not None:
        assert mentions in body["error"]["message"], body
    return body["error"]


def serve_config(model_dir: str, **serve: object) -> Config:
    cfg = Config()
    cfg.serve.model_dir = model_dir
    for key, value in {"num_cpus_per_replica": 0.25, "max_body_bytes": MAX_BODY, "max_batch_items": MAX_ITEMS,
                       "ingress_replicas": 1, **serve}.items():
        setattr(cfg.serve, key, value)
    return cfg


def client(port: int, prefix: str = "") -> httpx.Client:
    # trust_env=False: no proxy from the environment; every request stays on 127.0.0.1.
    return httpx.Client(base_url=f"http://127.0.0.1:{port}{prefix}", timeout=30.0, trust_env=False)


def wait_healthy(http: httpx.Client, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if http.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{http.base_url}/healthz did not answer 200 within {timeout_s:.0f}s")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    cfg = Config()
    cfg.model = model_config_for("tiny", num_labels=10)
    model = build_model(cfg.model, load_pretrained=False)
    path = tmp_path_factory.mktemp("serve") / "tiny-v1"
    return save_model_dir(path, model, cfg, labels_for(10), {"version": "tiny-v1", "val_accuracy": 0.1})


@pytest.fixture(scope="module")
def serve_port(ray_cluster) -> int:
    from ray import serve

    serve.shutdown()  # whatever another module left; this module needs its own HTTP options
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


@pytest.fixture(scope="module")
def api(serve_port, model_dir) -> httpx.Client:
    """The main app at /, batching on (max 8 posts, 50 ms wait so concurrent posts meet)."""
    from ray import serve

    from serve_app.app import build_app

    cfg = serve_config(str(model_dir), max_batch_size=8, batch_wait_timeout_s=0.05, max_ongoing_requests=16,
                       min_replicas=1, max_replicas=1)
    serve.run(build_app(cfg), name="main", route_prefix="/")
    with client(serve_port) as http:
        wait_healthy(http)
        yield http
    delete_app("main")


def delete_app(name: str) -> None:
    from ray import serve

    if name in serve.status().applications:  # the last test shuts Serve down for `serve deploy`
        serve.delete(name)


@pytest.fixture(scope="module")
def labels(model_dir) -> list[str]:
    return json.loads((model_dir / "labels.json").read_text())


# --- images of the workshop corpus (where present) and generated ones --------------------

@pytest.mark.parametrize("row", manifest_params(manifest(), "corpus") + manifest_params(generated_manifest(), "generated"))
def test_manifest_image(api, labels, row):
    data = image_bytes(row)
    r = api.post("/v1/predict", data={"text": "今天在公司加班", "post_id": row["file"]},
                 files={"image": (row["file"], data, "application/octet-stream")})
    assert r.status_code < 500, r.text
    if row["expect"] == "ok" or (row["expect"] == "either" and r.status_code == 200):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["label"] in labels and body["post_id"] == row["file"]
        assert body["top_k"][0]["label"] == body["label"] and len(body["top_k"]) == 3
        assert body["model_version"] == "tiny-v1"
    else:
        err = assert_error(r, 422)
        assert err["code"] == EXPECTED_CODE.get(row["file"], err["code"]) and err["code"] in IMAGE_CODES, err


@pytest.mark.parametrize("source", ["corpus", "generated"])
def test_batch_answers_good_posts_and_names_bad_ones(api, labels, source):
    if source == "corpus" and not manifest():
        pytest.skip(f"the workshop corpus is not at {IMAGES.parent}")
    every = manifest() if source == "corpus" else generated_manifest()
    bomb = "decompression_bomb.gif" if source == "corpus" else "gen_bomb.gif"
    rows = [r for r in every if r["expect"] == "ok"][:3] + [r for r in every if r["expect"] == "reject" and r["file"] != bomb][:3]
    rows += [r for r in every if r["file"] == bomb]
    posts = [{"post_id": r["file"], "text": "周末去公园", "image_base64": b64(image_bytes(r))} for r in rows]
    r = api.post("/v1/predict/batch", json={"posts": posts})
    assert r.status_code == 200, r.text
    body = r.json()
    results = body["results"]
    assert [x["index"] for x in results] == list(range(len(posts)))
    assert [x["post_id"] for x in results] == [p["post_id"] for p in posts]
    for row, result in zip(rows, results):
        if row["expect"] == "ok":
            assert result["label"] in labels and "error" not in result, result
        else:
            assert result["error"]["code"] in IMAGE_CODES and "label" not in result, result
    assert body["num_failed"] == sum(r["expect"] == "reject" for r in rows)
    assert body["num_ok"] + body["num_failed"] == len(posts)
    # A post that breaks the schema (as /openapi.json states it) fails the request, naming it.
    assert_error(api.post("/v1/predict/batch", json={"posts": [*posts[:1], {"post_id": "no-image", "text": "x"}]}), 422,
                 "missing_field", "posts[1].image_base64")


def test_json_and_multipart_give_the_same_answer(api):
    data = image("gen_photo.jpg")
    as_json = api.post("/v1/predict", json={"text": "医院排队", "image_base64": b64(data)}).json()
    as_data_url = api.post("/v1/predict", json={"text": "医院排队", "image_base64": "data:image/jpeg;base64," + b64(data)}).json()
    as_form = api.post("/v1/predict", data={"text": "医院排队"}, files={"image": ("f.jpg", data, "image/jpeg")}).json()
    assert as_json["top_k"] == as_form["top_k"] == as_data_url["top_k"]
    assert "post_id" not in as_json
    assert api.post("/v1/predict", json={"text": "", "image_base64": b64(data)}).status_code == 200  # empty text is a post


def test_long_text_is_truncated_and_says_so(api):
    data = b64(image())
    short = api.post("/v1/predict", json={"text": "在家", "image_base64": data}).json()
    many_chars = api.post("/v1/predict", json={"text": "在家" * 5000, "image_base64": data}).json()
    many_tokens = api.post("/v1/predict", json={"text": "在家" * 40, "image_base64": data}).json()  # 80 chars, > 50 tokens
    assert short["text_truncated"] is False
    assert many_chars["text_truncated"] is True and many_tokens["text_truncated"] is True


# --- hard edges -------------------------------------------------------------------------

def chunks(total: int, size: int = 64 * 1024):
    """A body without Content-Length (chunked transfer encoding)."""
    for _ in range(total // size + 1):
        yield b"x" * size


def _deep_json() -> bytes:
    return b"[" * 100_000 + b"]" * 100_000


MALFORMED = [
    # (id, method, path, httpx kwargs, status, code, mentions)
    ("bad-json", "POST", "/v1/predict", {"content": b'{"text": "a", ', "headers": {"content-type": "application/json"}}, 400, "malformed_json", None),
    ("deep-json", "POST", "/v1/predict", {"content": _deep_json(), "headers": {"content-type": "application/json"}}, 400, "malformed_json", None),
    ("not-utf8-json", "POST", "/v1/predict", {"content": b'{"text": "\xff\xfe"}', "headers": {"content-type": "application/json"}}, 400, "malformed_json", None),
    ("json-array", "POST", "/v1/predict", {"json": [1, 2]}, 422, "invalid_field", None),
    ("missing-text", "POST", "/v1/predict", {"json": {"image_base64": "aGk="}}, 422, "missing_field", "text"),
    ("missing-image", "POST", "/v1/predict", {"json": {"text": "a"}}, 422, "missing_field", "image_base64"),
    ("text-not-string", "POST", "/v1/predict", {"json": {"text": 5, "image_base64": "aGk="}}, 422, "invalid_field", "text"),
    ("bad-base64", "POST", "/v1/predict", {"json": {"text": "a", "image_base64": "not base64!"}}, 422, "invalid_base64", None),
    ("bad-data-url", "POST", "/v1/predict", {"json": {"text": "a", "image_base64": "data:image/png,abc"}}, 422, "invalid_base64", None),
    ("empty-image", "POST", "/v1/predict", {"json": {"text": "a", "image_base64": ""}}, 422, "invalid_field", "image_base64"),
    ("not-an-image", "POST", "/v1/predict", {"json": {"text": "a", "image_base64": b64(b"hello")}}, 422, "image_undecodable", None),
    ("form-missing-image", "POST", "/v1/predict", {"data": {"text": "a"}, "files": {"other": ("a", b"a")}}, 422, "missing_field", "image"),
    ("form-missing-text", "POST", "/v1/predict", {"files": {"image": ("h.jpg", b"abc")}}, 422, "missing_field", "text"),
    ("form-image-not-file", "POST", "/v1/predict", {"data": {"text": "a", "image": "abc"}, "files": {"x": ("x", b"x")}}, 422, "invalid_field", "image"),
    ("form-no-boundary", "POST", "/v1/predict", {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}}, 400, "malformed_multipart", None),
    ("lone-surrogate-id", "POST", "/v1/predict", {"content": b'{"post_id": "\\ud800", "text": "a", "image_base64": "aGk="}', "headers": {"content-type": "application/json"}}, 422, "invalid_field", "post_id"),
    ("form-two-files", "POST", "/v1/predict", {"data": {"text": "a"}, "files": [("image", ("a", b"a")), ("image", ("b", b"b"))]}, 400, "malformed_multipart", None),
    ("text-plain", "POST", "/v1/predict", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type", "text/plain"),
    ("no-content-type", "POST", "/v1/predict", {"content": b"hello"}, 415, "unsupported_media_type", None),
    ("urlencoded", "POST", "/v1/predict", {"data": {"text": "a"}}, 415, "unsupported_media_type", None),
    ("batch-multipart", "POST", "/v1/predict/batch", {"data": {"text": "a"}, "files": {"image": ("h", b"x")}}, 415, "unsupported_media_type", None),
    ("body-too-large", "POST", "/v1/predict", {"json": {"text": "a", "image_base64": "A" * MAX_BODY}}, 413, "body_too_large", str(MAX_BODY)),
    ("body-too-large-chunked", "POST", "/v1/predict", {"content": chunks(MAX_BODY + 1), "headers": {"content-type": "application/json"}}, 413, "body_too_large", None),
    ("batch-too-long", "POST", "/v1/predict/batch", {"json": {"posts": [{"text": "a", "image_base64": "aGk="}] * (MAX_ITEMS + 1)}}, 422, "too_many_posts", str(MAX_ITEMS)),
    ("batch-empty", "POST", "/v1/predict/batch", {"json": {"posts": []}}, 422, "empty_batch", None),
    ("batch-no-posts", "POST", "/v1/predict/batch", {"json": {"post": []}}, 422, "missing_field", "posts"),
    ("batch-posts-not-list", "POST", "/v1/predict/batch", {"json": {"posts": "x"}}, 422, "invalid_field", "posts"),
    ("unknown-route", "GET", "/v2/predict", {}, 404, "not_found", None),
    ("wrong-method", "GET", "/v1/predict", {}, 405, "method_not_allowed", None),
    ("wrong-method-labels", "DELETE", "/v1/labels", {}, 405, "method_not_allowed", None),
]


@pytest.mark.parametrize("method,path,kwargs,status,code,mentions", [pytest.param(*m[1:], id=m[0]) for m in MALFORMED])
def test_malformed_request_is_a_4xx_with_the_error_shape(api, method, path, kwargs, status, code, mentions):
    assert_error(api.request(method, path, **kwargs), status, code, mentions)


def test_lying_content_length_cannot_bypass_the_limit(api):
    """A header that claims a small body: the server reads only what it declares, so the
    rest is never taken as body (and an oversized chunked body is refused by counting)."""
    import socket

    port = api.base_url.port
    body = b'{"text": "a", "image_base64": "' + b"A" * (2 * MAX_BODY) + b'"}'
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 20\r\nConnection: close\r\n\r\n")
        reply = b""
        try:
            sock.sendall(body)
        except OSError:
            pass  # the server may stop reading and close: that is refusing too
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except OSError:
            pass
    assert reply.startswith(b"HTTP/1.1 "), reply[:300]
    status = int(reply.split(b" ", 2)[1])
    assert 400 <= status < 500, reply[:300]


def test_client_errors_do_not_take_replicas_down(api, ray_head):
    """After every malformed request above, the app still answers and no replica died."""
    from ray.util.state import list_actors

    assert api.get("/healthz").json()["status"] == "ok"
    assert api.post("/v1/predict", json={"text": "a", "image_base64": b64(image())}).status_code == 200
    replicas = [a for name in ("SGMFTModel", "SGMFTIngress") for a in list_actors(
        address=ray_head.address, filters=[("class_name", "=", f"ServeReplica:main:{name}")])]
    assert len(replicas) == 2 and all(a.state == "ALIVE" for a in replicas), replicas


# --- read-only routes and docs ----------------------------------------------------------

def test_labels_model_and_health(api, labels, model_dir):
    assert api.get("/v1/labels").json()["labels"] == labels
    assert api.get("/v1/labels").json()["display_names"]["home"] == "家"
    model = api.get("/v1/model").json()
    assert model["version"] == "tiny-v1" and model["source"] == str(model_dir)
    assert model["metrics"]["val_accuracy"] == 0.1 and model["config"]["model"]["backbone"]["preset"] == "tiny"
    assert model["preprocess"]["image_size"] == 32 and model["preprocess"]["context_length"] == 52
    assert api.get("/healthz").json() == {"status": "ok", "model_version": "tiny-v1"}


def test_openapi_documents_the_api(api):
    docs = api.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = api.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/predict/batch", "/v1/labels", "/v1/model", "/healthz"} <= set(spec["paths"])
    predict = spec["paths"]["/v1/predict"]["post"]
    assert {"application/json", "multipart/form-data"} <= set(predict["requestBody"]["content"])
    assert {"200", "413", "415", "422", "503"} <= set(predict["responses"])
    assert "Retry-After" in predict["responses"]["503"]["headers"]
    batch = spec["paths"]["/v1/predict/batch"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    wrapped, bare = batch["oneOf"]  # {"posts": [...]} or the list itself
    assert wrapped["properties"]["posts"]["maxItems"] == bare["maxItems"] == MAX_ITEMS
    assert {"Prediction", "BatchResponse", "ErrorResponse"} <= set(spec["components"]["schemas"])


# Which statuses a request the schema allows may get: an image's content is beyond what JSON
# Schema can say, so a schema-valid post whose image_base64 is not a usable image gets the 422
# that /openapi.json documents (its code names why); anything else is Schemathesis's default.
SCHEMATHESIS_CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "401", "403", "404", "409", "422", "429"]
"""


def test_schemathesis_finds_the_api_as_its_schema_says(api, serve_port, tmp_path):
    """Property-based requests from /openapi.json (every check; at most 40 cases an operation and
    phase, a fixed seed, 240 s at most): no 5xx, responses as documented, and the schema's
    refusals and acceptances hold."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    st = str(Path(sys.executable).with_name("st"))
    out = subprocess.run([st, "--config-file", str(config), "--no-color", "run", f"http://127.0.0.1:{serve_port}/openapi.json",
                          "--checks", "all", "--max-examples", "40", "--workers", "1",
                          "--request-timeout", "30", "--generation-database", "none", "--seed", "1"],
                         capture_output=True, text=True, timeout=240, cwd=tmp_path,  # its .schemathesis cache goes there
                         env={**os.environ, "NO_PROXY": "127.0.0.1"})
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]


# --- batching, metrics ------------------------------------------------------------------

def batch_sizes_under_load(http: httpx.Client, payload: dict, posts: int = 48, clients: int = 16) -> list[int]:
    """The ``batch_size`` each of ``posts`` concurrent predictions ran in (all must answer 200)."""
    def one(_: int) -> int:
        r = http.post("/v1/predict", json=payload)
        assert r.status_code == 200, r.text
        return r.json()["batch_size"]

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(posts)))


def test_concurrent_requests_form_batches(api):
    sizes = batch_sizes_under_load(api, {"text": "商场购物", "image_base64": b64(image())})
    assert max(sizes) > 1, sizes
    assert max(sizes) <= 8, sizes  # serve.max_batch_size


def test_batch_route_takes_a_bare_list_of_posts(api, labels):
    posts = [{"post_id": "a", "text": "健身房撸铁", "image_base64": b64(image())},
             {"post_id": "b", "text": "", "image_base64": b64(image("gen_photo.png"))}]
    r = api.post("/v1/predict/batch", json=posts)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["num_ok"] == 2 and [x["post_id"] for x in body["results"]] == ["a", "b"]
    assert all(x["label"] in labels for x in body["results"])
    # the same answer either way, to float tolerance: the two calls' posts meet the model in batches of other sizes
    again = api.post("/v1/predict/batch", json={"posts": posts}).json()["results"][0]["top_k"]
    assert [x["label"] for x in again] == [x["label"] for x in body["results"][0]["top_k"]]
    assert [x["probability"] for x in again] == pytest.approx([x["probability"] for x in body["results"][0]["top_k"]], abs=1e-5)
    assert_error(api.post("/v1/predict/batch", json=[]), 422, "empty_batch")
    assert_error(api.post("/v1/predict/batch", json="posts"), 422, "missing_field")


# --- model from a URI, autoscaling, replicas that die -------------------------------------

def replica_states(app: str, deployment: str) -> dict[str, int]:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return {}
    return {str(getattr(k, "value", k)): v for k, v in status.deployments[deployment].replica_states.items()}


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def test_model_placed_in_the_ingress_answers_as_the_model_deployment_does(serve_port, model_dir, api):
    """``serve.model_placement: ingress``, here with ``serve.jpeg_decode: model`` (JPEGs decoded
    in batches by the model's decoder, as on a GPU): no model deployment; the same answers,
    errors and batching as the app whose forwards run in a model replica."""
    from ray import serve

    from serve_app.app import INGRESS_NAME, build_app

    cfg = serve_config(str(model_dir), max_batch_size=8, model_placement="ingress", jpeg_decode="model")
    serve.run(build_app(cfg), name="colocated", route_prefix="/colocated")
    try:
        with client(serve_port, "/colocated") as http:
            wait_healthy(http)
            assert set(serve.status().applications["colocated"].deployments) == {INGRESS_NAME}
            model = http.get("/v1/model").json()
            assert model["version"] == api.get("/v1/model").json()["version"]
            assert (model["jpeg_decode"], api.get("/v1/model").json()["jpeg_decode"]) == ("model", "ingress")
            for picture, tolerance in ((image(), 0.02), (hi.good_png(), 1e-5)):  # a JPEG crosses encoded, a PNG as pixels
                post = {"text": "医院排队", "image_base64": b64(picture)}
                here, there = http.post("/v1/predict", json=post).json(), api.post("/v1/predict", json=post).json()
                assert here["label"] == there["label"]
                assert [x["probability"] for x in here["top_k"]] == pytest.approx(
                    [x["probability"] for x in there["top_k"]], abs=tolerance)
            assert_error(http.post("/v1/predict", json={"text": "x", "image_base64": b64(b"not an image")}), 422,
                         "image_undecodable")
            assert_error(http.post("/v1/predict", json={"text": "x", "image_base64": b64(hi.truncated_jpeg())}), 422,
                         "image_truncated")
            sizes = batch_sizes_under_load(http, post)
            assert 1 < max(sizes) <= 8, sizes
    finally:
        delete_app("colocated")


def test_model_from_file_uri_autoscales_up_and_down(serve_port, model_dir):
    """Loaded through pyarrow from a file:// URI; 1 -> 2 replicas under a burst, back to 1 after."""
    from ray import serve

    from serve_app.app import MODEL_NAME, build_app

    cfg = serve_config(model_dir.as_uri(), max_batch_size=2, batch_wait_timeout_s=0.01, max_ongoing_requests=4,
                       min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=1, downscale_delay_s=2)
    serve.run(build_app(cfg), name="autoscale", route_prefix="/autoscale")
    try:
        with client(serve_port, "/autoscale") as http:
            wait_healthy(http)
            model = http.get("/v1/model").json()
            assert model["source"] == model_dir.as_uri() and model["version"] == "tiny-v1"
            assert replica_states("autoscale", MODEL_NAME) == {"RUNNING": 1}

            stop = threading.Event()
            payload = {"text": "车站", "image_base64": b64(image())}
            statuses: list[int] = []

            def load() -> None:
                while not stop.is_set():
                    statuses.append(http.post("/v1/predict", json=payload).status_code)

            threads = [threading.Thread(target=load, daemon=True) for _ in range(6)]
            for t in threads:
                t.start()
            # The burst lasts until Serve runs 2 replicas, at most 30 + 90 s: the controller
            # decides within seconds (look-back 1 s, metrics every 0.5 s), but a new replica
            # imports torch and loads the model, which takes 15 s or more on a busy 2-core box.
            try:
                wait_for(lambda: sum(replica_states("autoscale", MODEL_NAME).values()) == 2, 30,
                         "the controller to start a 2nd replica")
                wait_for(lambda: replica_states("autoscale", MODEL_NAME).get("RUNNING") == 2, 90, "2 running replicas")
            finally:
                stop.set()
                for t in threads:
                    t.join(timeout=30)
            assert statuses and set(statuses) == {200}, sorted(set(statuses))
            wait_for(lambda: replica_states("autoscale", MODEL_NAME) == {"RUNNING": 1}, 60, "scale back to 1 replica")
    finally:
        delete_app("autoscale")


def test_a_model_replica_killed_under_load_costs_no_request(serve_port, model_dir, ray_head):
    """SIGKILL the only model replica while clients send posts: the ingress retries the posts it
    had in flight until Serve has replaced the replica, so every request still gets its answer."""
    from ray import serve
    from ray.util.state import list_actors

    from serve_app.app import MODEL_NAME, build_app

    cfg = serve_config(str(model_dir), max_batch_size=4, max_ongoing_requests=8, min_replicas=1, max_replicas=1,
                       retry_deadline_s=90)
    serve.run(build_app(cfg), name="resilient", route_prefix="/resilient")

    def replica_pids() -> set[int]:
        return {a.pid for a in list_actors(address=ray_head.address, filters=[
            ("class_name", "=", f"ServeReplica:resilient:{MODEL_NAME}"), ("state", "=", "ALIVE")])}

    try:
        with client(serve_port, "/resilient") as http:
            wait_healthy(http)
            (victim,) = replica_pids()
            payload = {"text": "机场候机", "image_base64": b64(image())}
            statuses: list[int] = []
            stop = threading.Event()

            def load() -> None:
                for _ in range(400):  # bounded: at most 400 requests per client
                    if stop.is_set():
                        return
                    statuses.append(http.post("/v1/predict", json=payload, timeout=120).status_code)

            threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
            for t in threads:
                t.start()
            wait_for(lambda: len(statuses) >= 8, 30, "load before the kill")
            os.kill(victim, signal.SIGKILL)  # a process of the Ray cluster this test session started
            wait_for(lambda: (replica_pids() - {victim}) and replica_states("resilient", MODEL_NAME) == {"RUNNING": 1},
                     90, "a replacement replica")
            answered = len(statuses)
            wait_for(lambda: len(statuses) >= answered + 8, 60, "answers from the replacement")
            stop.set()
            for t in threads:
                t.join(timeout=150)
        server_errors = [code for code in statuses if code >= 500]
        assert not server_errors and set(statuses) == {200}, sorted(set(statuses))
    finally:
        delete_app("resilient")


def test_metrics_are_exported_to_prometheus(api, ray_cluster):
    """Batch sizes, queue wait, model latency and request counts reach Ray's metrics endpoint."""
    node = next(n for n in ray_cluster.nodes() if n["Alive"])
    url = f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"
    wanted = ["ray_sgmft_batch_size_bucket", "ray_sgmft_queue_wait_s_bucket", "ray_sgmft_model_latency_s_bucket",
              "ray_sgmft_http_requests_total", "ray_sgmft_preprocess_latency_s_bucket"]

    def scrape() -> str | None:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return text if all(name in text for name in wanted) else None

    text = wait_for(scrape, 45, f"{wanted} at {url}", poll_s=2)
    counts = [line for line in text.splitlines() if line.startswith("ray_sgmft_http_requests_total{")]
    for status in ("200", "413", "422"):
        assert any('route="/v1/predict"' in line and f'status="{status}"' in line for line in counts), counts


# --- builder arguments, CLI, declarative deploy (last) ----------------------------------

def test_app_builder_args_are_checked(model_dir):
    from serve_app.app import app_builder, config_from_builder_args

    cfg = config_from_builder_args({"model_dir": str(model_dir), "config": {"serve": {"max_batch_size": 4}},
                                    "overrides": ["serve.top_k=2"]})
    assert (cfg.serve.model_dir, cfg.serve.max_batch_size, cfg.serve.top_k) == (str(model_dir), 4, 2)
    with pytest.raises(ConfigError, match="unknown"):
        app_builder({"model": "x"})
    with pytest.raises(ConfigError, match="serve.model_dir"):
        app_builder({})
    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        app_builder({"model_dir": "x", "overrides": ["serve.max_batch_size=64"]})
    for path in ("serve_app/serve_config.yaml", "serve_app/kuberay-rayservice.yaml"):
        doc = yaml.safe_load((REPO / path).read_text())
        if doc.get("kind") == "RayService":
            doc = yaml.safe_load(doc["spec"]["serveConfigV2"])
        (app,) = doc["applications"]
        assert app["import_path"] == "serve_app.app:app_builder"
        cfg = config_from_builder_args(app["args"])  # what app_builder deploys, checked against the file
        for override in app["args"].get("overrides") or []:
            key, value = override.split("=", 1)
            assert getattr(cfg.serve, key.removeprefix("serve.")) == yaml.safe_load(value), override
        app_builder(app["args"])


def test_cli_refuses_a_port_out_of_range(model_dir):
    out = subprocess.run([sys.executable, "-m", "sgmft.cli", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
                          "--port", "70000"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--port 70000" in out.stderr, out.stderr


def test_cli_refuses_a_missing_model_dir(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sgmft.cli", "serve", "--model", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "does not exist" in out.stderr, out.stderr
