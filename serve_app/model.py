"""The model side of serving, without Ray: fetch a model directory, run batched forwards.

A model directory is a local path or a URI that ``pyarrow.fs`` understands (``s3://``,
``gs://``, ``abfs://``, ``hdfs://``, ``file://``). Remote directories are copied to a local
temporary directory first: the model files are small next to a replica's life, and
``load_model_dir`` then reads safetensors and JSON only, never a pickle.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from sgmft.checkpoint import CONFIG, LABELS, METRICS, WEIGHTS, LoadedModel, ModelDirError, load_model_dir
from sgmft.config import config_to_dict
from sgmft.data.preprocess import PreprocessSpec

logger = logging.getLogger("ray.serve")

REQUIRED_FILES = (WEIGHTS, CONFIG, LABELS)
OPTIONAL_FILES = (METRICS,)


def is_uri(source: str) -> bool:
    return "://" in source


def resolve_source(source: str) -> str:
    """A URI as is; a local path made absolute (replicas do not share the caller's cwd)."""
    if not source:
        raise ModelDirError("no model directory given (serve.model_dir is empty)")
    return source if is_uri(source) else str(Path(source).expanduser().resolve())


def fetch_model_dir(uri: str, destination: Path) -> Path:
    """Copy the model files of ``uri`` into ``destination/<basename>``; return that directory.

    The copy keeps the directory's name, so a model's version (its ``metrics.json``
    ``version``, or else its directory name) is the same whether loaded locally or remotely.
    """
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # pyarrow raises several types for unknown schemes and bad URIs
        raise ModelDirError(f"cannot open model URI {uri!r}: {exc}") from exc
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise ModelDirError(f"model URI {uri!r} is not a directory")
    path = path.rstrip("/")
    local = destination / (PurePosixPath(path).name or "model")
    local.mkdir(parents=True)
    # Only the model files: a training run's directory may also hold optimizer state and logs.
    for name in (*REQUIRED_FILES, *OPTIONAL_FILES):
        remote = f"{path}/{name}"
        if fs.get_file_info(remote).type != pafs.FileType.File:
            if name in REQUIRED_FILES:
                raise ModelDirError(f"model URI {uri!r} is not a model directory: {name} is missing")
            continue
        pafs.copy_files(remote, str(local / name), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ModelRunner:
    """A loaded model directory: batched probabilities and the metadata the API shows."""

    def __init__(self, source: str, device: str | torch.device | None = None):
        self.source = source
        self.device = torch.device(device) if device is not None else default_device()
        self._tmp: Path | None = None
        local = source
        if is_uri(source):
            self._tmp = Path(tempfile.mkdtemp(prefix="sgmft-model-"))
            local = fetch_model_dir(source, self._tmp)
        try:
            self.loaded: LoadedModel = load_model_dir(local, self.device)
        except BaseException:
            self.close()
            raise
        self.labels = self.loaded.labels
        self.version = self.loaded.version
        self.spec = PreprocessSpec.from_config(self.loaded.config)

    @torch.inference_mode()
    def probabilities(self, input_ids: np.ndarray, pixel_values: np.ndarray) -> np.ndarray:
        """int64 (B, L) and float32 (B, 3, S, S) -> float32 (B, num_labels) probabilities."""
        ids = torch.from_numpy(np.ascontiguousarray(input_ids)).to(self.device, non_blocking=True)
        pixels = torch.from_numpy(np.ascontiguousarray(pixel_values)).to(self.device, non_blocking=True)
        # bf16 autocast on GPU only: CPU bf16 matmuls are slower than fp32 on most CPUs.
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.loaded.model(ids, pixels).logits
        return torch.softmax(logits.float(), dim=-1).cpu().numpy()

    def top_k(self, probs: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        """Per row, the ``k`` most probable labels as ``{"label", "probability"}``, best first."""
        k = max(1, min(k, probs.shape[1]))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[{"label": self.labels[j], "probability": float(row[j])} for j in idx] for row, idx in zip(probs, order)]

    def warmup(self, batch_size: int = 2) -> None:
        """One forward on blank inputs, so the first request does not pay for lazy init."""
        size, length = self.spec.image_size, self.spec.context_length
        self.probabilities(np.zeros((batch_size, length), np.int64), np.zeros((batch_size, 3, size, size), np.float32))

    def info(self) -> dict[str, Any]:
        """JSON-able metadata: what GET /v1/model shows and what the ingress preprocesses with."""
        return {
            "version": self.version,
            "source": self.source,
            "labels": list(self.labels),
            "device": str(self.device),
            "preprocess": dataclasses.asdict(self.spec),
            "config": config_to_dict(self.loaded.config),
            "metrics": self.loaded.metrics,
        }

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def spec_from_info(info: dict[str, Any]) -> PreprocessSpec:
    values = dict(info["preprocess"])
    values["mean"], values["std"] = tuple(values["mean"]), tuple(values["std"])
    return PreprocessSpec(**values)
