"""Evaluate a model directory on a labelled split: metrics JSON and a confusion-matrix PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sgmft.metrics import classification_report, confusion_matrix


def plot_confusion(matrix: np.ndarray, labels: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(labels), 0.8 + 0.6 * len(labels)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=8, color="white" if value > matrix.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _report(labels: list[str], rows: list[dict[str, Any]], split: str) -> dict[str, Any]:
    failed = [r for r in rows if r["error"]]
    good = [r for r in rows if not r["error"]]
    index = {label: i for i, label in enumerate(labels)}
    matrix = confusion_matrix(np.array([index[r["label"]] for r in good], dtype=np.int64),
                              np.array([index[r["predicted_label"]] for r in good], dtype=np.int64), len(labels))
    report = classification_report(matrix, labels)
    report.update({"split": split, "labels": labels, "failed": len(failed), "failed_examples": [r["error"] for r in failed[:10]]})
    return report


def _check_labels(model_dir: Path, dataset_dir: str | Path) -> list[str]:
    from sgmft.data.schema import load_labels

    labels = json.loads((model_dir / "labels.json").read_text())
    if load_labels(dataset_dir) != labels:
        raise ValueError(f"{dataset_dir} has a different label set from the model in {model_dir}")
    return labels


def evaluate_local(model_dir: str | Path, dataset_dir: str | Path, split: str = "test", batch_size: int = 64) -> dict[str, Any]:
    """The same report computed in this process (small splits, no files written)."""
    import pyarrow.parquet as pq

    from sgmft.data.schema import split_files
    from sgmft.inference import InferenceRunner

    model_dir = Path(model_dir)
    labels = _check_labels(model_dir, dataset_dir)
    runner = InferenceRunner(model_dir)
    rows: list[dict[str, Any]] = []
    for path in split_files(dataset_dir, split):
        for record_batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=["post_id", "text", "image", "label"]):
            batch = {name: np.asarray(record_batch.column(name).to_pylist(), dtype=object) for name in record_batch.schema.names}
            out = runner.predict_batch(batch)
            rows += [{"label": l, "predicted_label": p, "error": e} for l, p, e in zip(out["label"], out["predicted_label"], out["error"])]
    return _report(labels, rows, split)


def evaluate(model_dir: str | Path, dataset_dir: str | Path, split: str = "test", out_dir: str | Path | None = None,
             **predict_kwargs: Any) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class P/R/F1 and the confusion matrix of ``split``.

    Written to ``out_dir`` (default: the model directory) as ``eval-{split}.json`` and
    ``confusion-{split}.png``. Rows whose image fails to decode are counted, not hidden.
    """
    from sgmft.predict import predictions

    model_dir = Path(model_dir)
    labels = _check_labels(model_dir, dataset_dir)
    ds, _ = predictions(model_dir, dataset_dir, split, **predict_kwargs)
    report = _report(labels, ds.select_columns(["label", "predicted_label", "error"]).take_all(), split)
    out = Path(out_dir) if out_dir else model_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / f"eval-{split}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    plot_confusion(np.array(report["confusion_matrix"]), labels, out / f"confusion-{split}.png",
                   f"{split}: accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f}")
    return report
