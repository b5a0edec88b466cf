"""Prediction from a model directory: one post, a batch of posts, or a Parquet set on Ray Data.

``Predictor`` is the Ray-free core (shared by batch prediction, evaluation and the CLI);
``predict_dataset`` runs it in a Ray Data actor pool and writes every input row out,
failed rows with their error, so the row counts reconcile.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sgmft.checkpoint import LoadedModel, load_model_dir


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Predictor:
    """Loads a model directory once; preprocesses with the training preprocessing function."""

    def __init__(self, model_dir: str | Path, device: str | None = None):
        from sgmft.data.preprocess import PreprocessSpec

        self.device = torch.device(device or default_device())
        self.loaded: LoadedModel = load_model_dir(model_dir, self.device)
        self.labels = self.loaded.labels
        self.spec = PreprocessSpec.from_config(self.loaded.config)

    @torch.inference_mode()
    def probabilities(self, input_ids: np.ndarray, pixel_values: np.ndarray) -> np.ndarray:
        ids = torch.as_tensor(input_ids, device=self.device)
        pixels = torch.as_tensor(pixel_values, device=self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.loaded.model(ids, pixels).logits
        return torch.softmax(logits.float(), dim=-1).cpu().numpy()

    def predict_batch(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """Column batch (text, image bytes, optional post_id/label) -> predictions; never raises on bad rows."""
        from sgmft.data.preprocess import preprocess_batch

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
        from sgmft.data.preprocess import preprocess_batch

        inputs = preprocess_batch({"text": np.array([text], dtype=object), "image": np.array([image], dtype=object)}, self.spec)
        probs = self.probabilities(inputs["input_ids"], inputs["pixel_values"])[0]
        order = np.argsort(-probs)[:top_k]
        return {"label": self.labels[order[0]], "top_k": [{"label": self.labels[i], "probability": float(probs[i])} for i in order],
                "model_version": self.loaded.version}


class _RayPredictor:
    """Ray Data actor: one model per actor, reused across batches."""

    def __init__(self, model_dir: str, device: str | None = None):
        self.predictor = Predictor(model_dir, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.predictor.predict_batch(batch)


def read_posts(data: str | Path, split: str | None):
    """A dataset directory's split, or every Parquet file under ``data``."""
    import ray

    from sgmft.ray_data import read_split

    data = Path(data)
    if split:
        return read_split(data, split)
    files = sorted(str(p) for p in data.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet files under {data}")
    return ray.data.read_parquet(files)


def predictions(model_dir: str | Path, data: str | Path, split: str | None = None, *, batch_size: int = 64,
                concurrency: int = 1, num_gpus: float = 0.0, num_cpus: float = 1.0):
    """A lazy Ray dataset of predictions, one row per input row."""
    from sgmft.checkpoint import check_model_dir

    check_model_dir(model_dir)  # a bad path is the caller's error here, not a failed actor later
    posts = read_posts(data, split)
    return posts.map_batches(
        _RayPredictor, fn_constructor_kwargs={"model_dir": str(Path(model_dir).resolve())}, batch_size=batch_size,
        batch_format="numpy", concurrency=concurrency, num_gpus=num_gpus, num_cpus=num_cpus,
    ), posts


def predict_dataset(model_dir: str | Path, data: str | Path, out_dir: str | Path, split: str | None = None,
                    **kwargs: Any) -> dict[str, Any]:
    """Write predictions as Parquet under ``out_dir``; returns the reconciled counts."""
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"output directory {out_dir} is not empty; choose a new one")
    ds, posts = predictions(model_dir, data, split, **kwargs)
    read = posts.count()
    ds.write_parquet(str(out_dir))
    table = pq.read_table(out_dir, columns=["error"])
    errors = [e for e in table.column("error").to_pylist() if e]
    report = {"read": read, "written": table.num_rows, "predicted": table.num_rows - len(errors), "failed": len(errors)}
    if report["written"] != read:
        raise RuntimeError(f"row counts do not reconcile: read {read}, wrote {report['written']}")
    (out_dir / "_report.json").write_text(json.dumps(report, indent=2))
    return report
