"""Evaluate a model directory on a labelled split: metrics JSON and a confusion-matrix PNG.

Where the dataset has a ``meta_case`` column (the synthetic set names each post's case,
``sgmft.data.synth.CASES``), the report adds the accuracy of each case beside the totals.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sgmft.cli_args import add_verbose_arg, check_inputs, print_where, progress_bars, ray_for_command, show_path
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


CASE_COLUMN = "meta_case"


def per_case_accuracy(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{case: {"accuracy", "n"}}`` over the rows that decoded, for rows with a ``case``.

    Cases are in the order of :data:`sgmft.data.synth.CASES`, then any others by name.
    """
    from sgmft.data.synth import CASES

    hits: dict[str, list[bool]] = {}
    for r in rows:
        if r.get("case") is not None and not r["error"]:
            hits.setdefault(r["case"], []).append(r["predicted_label"] == r["label"])
    order = [c for c in CASES if c in hits] + sorted(c for c in hits if c not in CASES)
    return {c: {"accuracy": float(np.mean(hits[c])), "n": len(hits[c])} for c in order}


def format_per_case(per_case: dict[str, dict[str, Any]]) -> str:
    """The ``per_case`` of a report as aligned lines: case, accuracy, posts."""
    width = max([len("case"), *(len(case) for case in per_case)])
    lines = [f"{'case':<{width}} {'accuracy':>8} {'posts':>5}"]
    lines += [f"{case:<{width}} {m['accuracy']:>8.3f} {m['n']:>5}" for case, m in per_case.items()]
    return "\n".join(lines)


def _report(labels: list[str], rows: list[dict[str, Any]], split: str) -> dict[str, Any]:
    """Totals, per-class figures and the confusion matrix; ``per_case`` when rows carry a ``case``."""
    failed = [r for r in rows if r["error"]]
    good = [r for r in rows if not r["error"]]
    index = {label: i for i, label in enumerate(labels)}
    matrix = confusion_matrix(np.array([index[r["label"]] for r in good], dtype=np.int64),
                              np.array([index[r["predicted_label"]] for r in good], dtype=np.int64), len(labels))
    report = classification_report(matrix, labels)
    report.update({"split": split, "labels": labels, "failed": len(failed), "failed_examples": [r["error"] for r in failed[:10]]})
    if any(r.get("case") is not None for r in rows):
        report["per_case"] = per_case_accuracy(rows)
    return report


def _cases(dataset_dir: str | Path, split: str) -> dict[str, str] | None:
    """post_id -> meta_case of ``split``, or None when the dataset has no such column."""
    import pyarrow.parquet as pq

    from sgmft.data.schema import split_files

    cases: dict[str, str] = {}
    for path in split_files(dataset_dir, split):
        if CASE_COLUMN not in pq.read_schema(path).names:
            return None
        table = pq.read_table(path, columns=["post_id", CASE_COLUMN])
        cases.update(zip(table.column("post_id").to_pylist(), table.column(CASE_COLUMN).to_pylist()))
    return cases


def _check_labels(model_labels: list[str], model_dir: str | Path, dataset_dir: str | Path) -> list[str]:
    """The model's labels, once checked to be the dataset's, in the same order."""
    from sgmft.data.schema import load_labels

    if load_labels(dataset_dir) != list(model_labels):
        raise ValueError(f"{dataset_dir} has a different label set from the model in {model_dir}")
    return list(model_labels)


def split_predictions(model_dir: str | Path, dataset_dir: str | Path, split: str = "test",
                      batch_size: int = 64) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Each batch of ``split`` (with its ``meta_case`` column where the dataset has one) and the
    model's output for it, computed in this process; the two label sets must agree."""
    import pyarrow.parquet as pq

    from sgmft.data.schema import split_files
    from sgmft.inference import InferenceRunner

    runner = InferenceRunner(model_dir)
    try:
        _check_labels(runner.labels, model_dir, dataset_dir)
        for path in split_files(dataset_dir, split):
            file = pq.ParquetFile(path)
            columns = ["post_id", "text", "image", "label"] + ([CASE_COLUMN] if CASE_COLUMN in file.schema_arrow.names else [])
            for record_batch in file.iter_batches(batch_size=batch_size, columns=columns):
                batch = {name: np.asarray(record_batch.column(name).to_pylist(), dtype=object) for name in record_batch.schema.names}
                yield batch, runner.predict_batch(batch)
    finally:
        runner.close()


def evaluate_local(model_dir: str | Path, dataset_dir: str | Path, split: str = "test", batch_size: int = 64) -> dict[str, Any]:
    """The same report computed in this process (small splits, no files written)."""
    from sgmft.data.schema import load_labels

    rows: list[dict[str, Any]] = []
    for batch, out in split_predictions(model_dir, dataset_dir, split, batch_size):
        cases = batch.get(CASE_COLUMN, [None] * len(out["error"]))
        rows += [{"label": l, "predicted_label": p, "error": e, "case": c}
                 for l, p, e, c in zip(out["label"], out["predicted_label"], out["error"], cases)]
    return _report(load_labels(dataset_dir), rows, split)  # the model's labels: split_predictions checked


def evaluate(model_dir: str | Path, dataset_dir: str | Path, split: str = "test", out_dir: str | Path | None = None,
             **predict_kwargs: Any) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class P/R/F1 and the confusion matrix of ``split``.

    Written to ``out_dir`` (default: the model directory) as ``eval-{split}.json`` and
    ``confusion-{split}.png``. Rows whose image fails to decode are counted, not hidden.
    With a ``meta_case`` column in the dataset the report has ``per_case``:
    ``{case: {"accuracy", "n"}}`` over the posts that decoded.
    """
    from sgmft.checkpoint import check_model_dir
    from sgmft.inference import predictions

    model_dir = Path(model_dir)
    labels = _check_labels(check_model_dir(model_dir)[1], model_dir, dataset_dir)
    ds, _ = predictions(model_dir, dataset_dir, split, **predict_kwargs)
    rows = ds.select_columns(["post_id", "label", "predicted_label", "error"]).take_all()
    cases = _cases(dataset_dir, split)  # predictions carry post ids, not meta columns
    if cases is not None:
        rows = [{**r, "case": cases.get(r["post_id"])} for r in rows]
    report = _report(labels, rows, split)
    out = Path(out_dir) if out_dir else model_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / f"eval-{split}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    plot_confusion(np.array(report["confusion_matrix"]), labels, out / f"confusion-{split}.png",
                   f"{split}: accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f}")
    return report


# --- the command line ----------------------------------------------------------------------

def cmd_evaluate(args: argparse.Namespace) -> None:

    check_inputs(args.model, args.data)
    log_dir = Path(args.out or args.model) / "logs"
    print(f"SG-MFT evaluate: {show_path(args.model)} on the {args.split} split of {show_path(args.data)}", flush=True)
    print_where("written to", args.out or args.model, log_dir, args.verbose)
    with ray_for_command(args, log_dir) as console, progress_bars(console):
        report = evaluate(args.model, args.data, split=args.split, out_dir=args.out)
    failed = f", {report['failed']} failed to decode" if report["failed"] else ""
    print(f"{args.split}: accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f} on {report['num_examples']} posts{failed}")
    width = max(len(label) for label in report["labels"])
    print(f"{'label':<{width}} {'precision':>9} {'recall':>7} {'F1':>6} {'support':>7}")
    for label, m in report["per_class"].items():
        print(f"{label:<{width}} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['f1']:>6.3f} {m['support']:>7}")
    if report.get("per_case"):  # datasets with a meta_case column (the synthetic set)
        print(format_per_case(report["per_case"]))
    written = Path(args.out or args.model) / f"eval-{args.split}.json"
    print(f"written: {written} and confusion-{args.split}.png")


def add_commands(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("evaluate", help="metrics and confusion matrix of a model on a labelled split")
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", help="where to write (default: the model directory)")
    add_verbose_arg(parser)
    parser.set_defaults(func=cmd_evaluate)
