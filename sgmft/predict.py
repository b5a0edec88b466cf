"""Batch prediction over a Parquet set on Ray Data.

``predict_dataset`` runs :class:`sgmft.inference.InferenceRunner` in a Ray Data actor
pool and writes every input row out, failed rows with their error, so the row counts
reconcile.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sgmft import progress
from sgmft.inference import InferenceRunner


class _RayPredictor:
    """Ray Data actor: one model per actor, reused across batches."""

    def __init__(self, model_dir: str, device: str | None = None):
        self.runner = InferenceRunner(model_dir, device)
        self.progress = progress.Reporter("predict")  # posts done, for the driver's progress bar

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.runner.predict_batch(batch)
        self.progress.advance(len(out["error"]))
        return out


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
    import ray

    from sgmft.checkpoint import check_model_dir

    check_model_dir(model_dir)  # a bad path is the caller's error here, not a failed actor later
    posts = read_posts(data, split)
    progress.expect("predict", posts.count, f"predict {split or 'posts'}")
    return posts.map_batches(
        _RayPredictor, fn_constructor_kwargs={"model_dir": str(Path(model_dir).resolve())}, batch_size=batch_size,
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=concurrency), num_gpus=num_gpus, num_cpus=num_cpus,
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
