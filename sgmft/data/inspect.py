"""What is in a dataset directory: counts, text and image size distributions, quarantine."""

from __future__ import annotations

import io
import unicodedata
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from sgmft.data import schema
from sgmft.data.labels import display_name


def _stats(values: Sequence[float]) -> dict[str, float] | None:
    if not len(values):
        return None
    arr = np.asarray(values, dtype=np.float64)
    return {"min": float(arr.min()), "median": float(np.median(arr)),
            "p95": float(np.percentile(arr, 95)), "max": float(arr.max())}


def _image_header(data: bytes) -> tuple[str, int, int] | None:
    """Format and size from the header only; None when Pillow cannot identify it."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return str(image.format), *image.size
    except Exception:
        return None


def inspect_dataset(dataset_dir: str | Path) -> dict[str, Any]:
    """Counts per split and label, size distributions, quarantine summary and build report."""
    root = Path(dataset_dir)
    labels = schema.load_labels(root)
    splits = schema.available_splits(root)
    if not splits:
        raise schema.DatasetError(f"{root}: no split holds Parquet shards")
    text_chars: list[int] = []
    image_bytes: list[int] = []
    widths: list[int] = []
    heights: list[int] = []
    formats: Counter = Counter()
    per_split: dict[str, Any] = {}
    for split in splits:
        label_counts: Counter = Counter()
        rows = 0
        for path in schema.split_files(root, split):
            table = pq.read_table(path, columns=["text", "image", "label"])
            rows += table.num_rows
            label_counts.update(table.column("label").to_pylist())
            text_chars.extend(len(t or "") for t in table.column("text").to_pylist())
            for data in table.column("image").to_pylist():
                image_bytes.append(len(data or b""))
                header = _image_header(data or b"")
                formats[header[0] if header else "unidentified"] += 1
                if header:
                    widths.append(header[1])
                    heights.append(header[2])
        per_split[split] = {"rows": rows, "labels": {("(unlabeled)" if k is None else k): v
                                                     for k, v in sorted(label_counts.items(), key=lambda kv: str(kv[0]))}}
    quarantine = schema.read_quarantine(root)
    report = schema.read_report(root) or {}
    return {
        "dir": str(root),
        "labels": labels,
        "splits": per_split,
        "rows": sum(s["rows"] for s in per_split.values()),
        "text_chars": _stats(text_chars),
        "empty_texts": sum(1 for n in text_chars if n == 0),
        "image_bytes": _stats(image_bytes),
        "image_width": _stats(widths),
        "image_height": _stats(heights),
        "image_formats": dict(sorted(formats.items())),
        "quarantine": {"rows": len(quarantine),
                       "reasons": dict(sorted(Counter(q.get("reason", "?") for q in quarantine).items()))},
        "build": {k: report[k] for k in ("kind", "seed", "read", "kept", "quarantined", "noise", "realized_noise")
                  if k in report},
    }


def _display_width(text: str) -> int:
    """Terminal columns: CJK characters take two."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - _display_width(text))


def _fmt_stats(stats: dict[str, float] | None, unit: str = "") -> str:
    if stats is None:
        return "-"
    return " / ".join(f"{k} {stats[k]:g}{unit}" for k in ("min", "median", "p95", "max"))


def format_inspection(info: dict[str, Any]) -> str:
    """A short human-readable summary of :func:`inspect_dataset`'s result."""
    splits = list(info["splits"])
    lines = [f"dataset {info['dir']}: {info['rows']} rows, {len(info['labels'])} labels"]
    if info["build"]:
        lines.append("build: " + ", ".join(f"{k}={v}" for k, v in info["build"].items()))
    names = {x: f"{x} {display_name(x)}" if display_name(x) != x else x for x in info["labels"]}
    width = max([5, *map(_display_width, names.values())]) + 2
    lines.append(_pad("label", width) + "".join(s.rjust(8) for s in splits))
    extra = sorted({k for s in splits for k in info["splits"][s]["labels"]} - set(info["labels"]))
    for label in [*info["labels"], *extra]:
        lines.append(_pad(names.get(label, label), width) + "".join(str(info["splits"][s]["labels"].get(label, 0)).rjust(8) for s in splits))
    lines.append(_pad("total", width) + "".join(str(info["splits"][s]["rows"]).rjust(8) for s in splits))
    lines.append(f"text chars:   {_fmt_stats(info['text_chars'])} ({info['empty_texts']} empty)")
    lines.append(f"image bytes:  {_fmt_stats(info['image_bytes'])}")
    lines.append(f"image width:  {_fmt_stats(info['image_width'], 'px')}")
    lines.append(f"image height: {_fmt_stats(info['image_height'], 'px')}")
    lines.append("image formats: " + ", ".join(f"{k} {v}" for k, v in info["image_formats"].items()))
    q = info["quarantine"]
    lines.append(f"quarantine: {q['rows']} rows" + (": " + ", ".join(f"{k} {v}" for k, v in q["reasons"].items())
                                                   if q["reasons"] else ""))
    return "\n".join(lines)


def plot_label_histogram(info: dict[str, Any], path: str | Path) -> None:
    """A PNG bar chart of rows per label, stacked by split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = info["labels"] or sorted({k for s in info["splits"].values() for k in s["labels"]})
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(labels) + 2), 4))
    bottom = np.zeros(len(labels))
    for split, data in info["splits"].items():
        heights = np.array([data["labels"].get(label, 0) for label in labels], dtype=float)
        ax.bar(labels, heights, bottom=bottom, label=split)
        bottom += heights
    ax.set_ylabel("posts")
    ax.set_title(f"labels of {Path(info['dir']).name}")
    ax.legend()
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
