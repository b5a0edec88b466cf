"""Batch prediction over a Parquet set on Ray Data.

``predict_dataset`` runs :class:`sgmft.inference.InferenceRunner` in a Ray Data actor
pool (:func:`sgmft.inference.predictions`, which evaluation reads too) and writes every
input row out, failed rows with their error, so the row counts reconcile.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sgmft.inference import predictions


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
