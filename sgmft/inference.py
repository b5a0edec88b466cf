"""THE inference runner: a model directory on a device, batched probabilities and top-k.

Used by batch prediction, evaluation, the one-post CLI and the Serve model replicas, so
device choice, precision, host-to-device copies and top-k are written once. Ray-free to
import: :func:`predictions`, the runner in a Ray Data actor pool over a Parquet set (what
batch prediction writes out and evaluation scores), imports Ray when called.

A model directory is a local path or a URI that ``pyarrow.fs`` understands (``s3://``,
``gs://``, ``abfs://``, ``hdfs://``, ``file://``). Remote directories are copied (model
files only, :func:`sgmft.model_dir.fetch_model_dir`) to a local temporary directory first;
loading then reads safetensors and JSON only, never a pickle.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sgmft import progress
from sgmft.model_dir import check_model_dir, fetch_model_dir, is_uri
from sgmft.config import CLIP_MEAN, CLIP_STD, PREDICT_BATCH_SIZE, config_to_dict
from sgmft.data.preprocess import PreprocessSpec, preprocess_batch
from sgmft.models.model import LoadedModel, load_model_dir


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device, enabled: bool | None = None, cache: bool = True):
    """bf16 autocast on a GPU; off on a CPU, where bf16 matmuls are slower than fp32 on most parts.

    ``cache=False`` while capturing a CUDA graph: autocast's cast cache must not outlive a capture.
    """
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" if enabled is None else enabled,
                          cache_enabled=cache)


def host_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor ready to go to ``device``: pinned when that is a GPU, so the
    copy there can run without blocking."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.pin_memory() if device.type == "cuda" else tensor


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device``: pinned and copied without blocking when that is a GPU."""
    return host_tensor(array, device).to(device, non_blocking=device.type == "cuda")


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """Batch sizes a compiled model is specialised for: powers of two up to, and including, the maximum."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return (*sizes, max_batch_size)


class InferenceRunner:
    """A loaded model directory: batched probabilities and the metadata an API shows.

    ``buckets``: batch sizes the forward is specialised for when ``compile`` or
    ``cuda_graphs`` is on; every batch is padded to the next of them, so only that many
    graphs are ever built, all by :meth:`warmup`.
    ``compile``: run the model under ``torch.compile``.
    ``cuda_graphs`` (GPU only, ignored on a CPU): capture the forward once per bucket and
    replay it. An eager SG-MFT forward launches about 1,500 kernels from Python, which at
    serving batch sizes costs more host time than the GPU spends computing; a replay is one
    launch. Inputs are copied into the graph's static buffers, so calls are serialised.
    """

    def __init__(self, source: str | Path, device: str | torch.device | None = None,
                 buckets: Sequence[int] | None = None, compile: bool = False, cuda_graphs: bool = False):
        self.source = str(source)
        self.device = torch.device(device) if device is not None else default_device()
        if (compile or cuda_graphs) and not buckets:
            raise ValueError("compile and cuda_graphs need the batch-size buckets to specialise for")
        self._tmp: Path | None = None
        local = self.source
        if is_uri(self.source):
            self._tmp = Path(tempfile.mkdtemp(prefix="sgmft-model-"))
            local = fetch_model_dir(self.source, self._tmp)
        try:
            self.loaded: LoadedModel = load_model_dir(local, self.device)
        except BaseException:
            self.close()
            raise
        self.labels = self.loaded.labels
        self.version = self.loaded.version
        self.spec = PreprocessSpec.from_config(self.loaded.config)
        self.compiled = compile
        self._want_graphs = cuda_graphs and not compile and self.device.type == "cuda"
        # Padding to a bucket only pays where graphs are specialised; on a CPU it is wasted work.
        self.buckets = tuple(sorted(set(buckets))) if (compile or self._want_graphs) else ()
        self._forward = torch.compile(self.loaded.model, dynamic=False) if compile else self.loaded.model
        self._graphs: dict[int, _CapturedForward] = {}
        self._lock = threading.Lock()

    def _padded(self, n: int) -> int:
        for size in self.buckets:
            if size >= n:
                return size
        return n

    @torch.inference_mode()
    def probabilities(self, input_ids: np.ndarray, pixel_values: np.ndarray | torch.Tensor) -> np.ndarray:
        """int64 (B, L) and uint8 (B, 3, S, S) -> float32 (B, num_labels) probabilities.

        ``pixel_values`` may already be on the model's device (decoded there)."""
        n = len(input_ids)
        size = self._padded(n)
        captured = self._graphs.get(size)
        if captured is not None:
            pixels = pixel_values if isinstance(pixel_values, torch.Tensor) else host_tensor(pixel_values, self.device)
            with self._lock:
                return captured.run(host_tensor(input_ids, self.device), pixels)
        ids = to_device(input_ids, self.device)
        pixels = pixel_values if isinstance(pixel_values, torch.Tensor) else to_device(pixel_values, self.device)
        if size > n:  # pad rows are all-padding text and black images, and are dropped below
            ids = torch.cat([ids, ids.new_zeros((size - n, *ids.shape[1:]))])
            pixels = torch.cat([pixels, pixels.new_zeros((size - n, *pixels.shape[1:]))])
        with autocast(self.device):
            logits = self._forward(ids, pixels).logits[:n]
        return torch.softmax(logits.float(), dim=-1).cpu().numpy()

    def top_k(self, probs: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        """Per row, the ``k`` most probable labels as ``{"label", "probability"}``, best first."""
        k = max(1, min(k, probs.shape[1]))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[{"label": self.labels[j], "probability": float(row[j])} for j in idx] for row, idx in zip(probs, order)]

    def predict_batch(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """Column batch (text, image bytes, optional post_id/label) -> predictions; never raises on bad rows."""
        inputs = preprocess_batch(batch, self.spec, on_error="record")
        errors = np.asarray(inputs["error"], dtype=object)
        ok = errors == ""
        probs = np.zeros((len(errors), len(self.labels)), dtype=np.float32)
        if ok.any():
            probs[ok] = self.probabilities(inputs["input_ids"][ok], inputs["pixel_values"][ok])
        predicted = np.array([self.labels[i] if good else None for i, good in zip(probs.argmax(-1), ok)], dtype=object)
        out = {
            "post_id": np.asarray(batch["post_id"], dtype=object) if "post_id" in batch else np.array([None] * len(errors), dtype=object),
            "predicted_label": predicted,
            "probability": np.where(ok, probs.max(-1), np.nan).astype(np.float32),
            "probabilities": probs,
            "error": errors,
        }
        if "label" in batch:
            out["label"] = np.asarray(batch["label"], dtype=object)
        return out

    def predict_post(self, text: str, image: bytes, top_k: int = 3) -> dict[str, Any]:
        """One post; a bad image raises ImageDecodeError (the caller decides how to report it)."""
        inputs = preprocess_batch({"text": np.array([text], dtype=object), "image": np.array([image], dtype=object)}, self.spec)
        (top,) = self.top_k(self.probabilities(inputs["input_ids"], inputs["pixel_values"]), top_k)
        return {"label": top[0]["label"], "top_k": top, "model_version": self.version}

    def warmup(self, batch_size: int = 2) -> None:
        """Forwards on blank inputs, so no request pays for lazy initialisation, compilation or capture."""
        size, length = self.spec.image_size, self.spec.context_length
        if self._want_graphs and not self._graphs:
            self._capture_graphs(size, length)
        for n in self.buckets or (batch_size,):
            self.probabilities(np.zeros((n, length), np.int64), np.zeros((n, 3, size, size), np.uint8))

    def _capture_graphs(self, size: int, length: int) -> None:
        pool = None
        try:
            for n in sorted(self.buckets, reverse=True):  # largest first: the smaller graphs reuse its memory
                captured = _CapturedForward(self.loaded.model, self.device, n, length, size, pool)
                pool = captured.graph.pool()
                self._graphs[n] = captured
        except RuntimeError as exc:  # a model with a host sync or data-dependent shape cannot be captured
            self._graphs.clear()
            warnings.warn(f"CUDA graph capture failed, running eagerly: {exc}", RuntimeWarning, stacklevel=2)

    def info(self) -> dict[str, Any]:
        """JSON-able metadata: what GET /v1/model shows and what an ingress preprocesses with."""
        return {
            "version": self.version,
            "source": self.source,
            "labels": list(self.labels),
            "device": str(self.device),
            "compiled_batch_sizes": list(self.buckets) if self.compiled else [],
            "cuda_graph_batch_sizes": sorted(self._graphs),
            "preprocess": {**dataclasses.asdict(self.spec), "pixels": "uint8, normalised on the model's device",
                           "mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
            "config": config_to_dict(self.loaded.config),
            "metrics": self.loaded.metrics,
        }

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


class _RayPredictor:
    """Ray Data actor: one model per actor, reused across batches."""

    def __init__(self, model_dir: str, device: str | None = None):
        self.runner = InferenceRunner(model_dir, device)
        self.progress = progress.Reporter("predict")  # posts done, for the driver's progress bar

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.runner.predict_batch(batch)
        self.progress.advance(len(out["error"]))
        return out


def predictions(model_dir: str | Path, data: str | Path, split: str | None = None, *, batch_size: int = PREDICT_BATCH_SIZE,
                concurrency: int = 1, num_gpus: float = 0.0, num_cpus: float = 1.0):
    """A lazy Ray dataset of predictions, one row per input row."""
    import ray

    from sgmft.ray_data import read_posts

    check_model_dir(model_dir)  # a bad path is the caller's error here, not a failed actor later
    posts = read_posts(data, split)
    progress.expect("predict", posts.count, f"predict {split or 'posts'}")
    return posts.map_batches(
        _RayPredictor, fn_constructor_kwargs={"model_dir": str(Path(model_dir).resolve())}, batch_size=batch_size,
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=concurrency), num_gpus=num_gpus, num_cpus=num_cpus,
    ), posts


def spec_from_info(info: dict[str, Any]) -> PreprocessSpec:
    """The preprocessing spec an :meth:`InferenceRunner.info` describes."""
    fields = {f.name for f in dataclasses.fields(PreprocessSpec)}
    return PreprocessSpec(**{k: v for k, v in info["preprocess"].items() if k in fields})


class _CapturedForward:
    """One batch size's forward and softmax, captured as a CUDA graph over static buffers."""

    def __init__(self, model: torch.nn.Module, device: torch.device, batch: int, length: int, size: int, pool: Any):
        self.input_ids = torch.zeros((batch, length), dtype=torch.int64, device=device)
        self.pixel_values = torch.zeros((batch, 3, size, size), dtype=torch.uint8, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.inference_mode(), autocast(device, cache=False):
            for _ in range(2):  # kernels chosen and workspaces allocated before capture, as capture requires
                model(self.input_ids, self.pixel_values)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph, pool=pool), autocast(device, cache=False):
            self.probs = torch.softmax(model(self.input_ids, self.pixel_values).logits.float(), dim=-1)

    def run(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> np.ndarray:
        """Pinned host inputs of up to ``batch`` rows, copied straight into the static buffers."""
        n = len(input_ids)
        # Rows are independent through the model, so rows past n keep whatever they held.
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.pixel_values[:n].copy_(pixel_values, non_blocking=True)
        self.graph.replay()
        return self.probs[:n].cpu().numpy()
