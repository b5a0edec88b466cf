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

from sgmft.commands import add_verbose_arg, check_inputs, print_where, progress_bars, ray_for_command, show_path
from sgmft.config import PREDICT_BATCH_SIZE
from sgmft.classification import classification_report, confusion_matrix


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
PREDICTION_COLUMNS = ("post_id", "label", "predicted_label", "probabilities", "error")


def per_case_accuracy(correct: np.ndarray, ok: np.ndarray, cases: np.ndarray) -> dict[str, dict[str, Any]]:
    """``{case: {"accuracy", "n"}}`` over the posts that decoded (``ok``); a post that failed
    to decode is neither right nor wrong: reports count it as failed.

    Posts whose case is None are left out. Cases are in the order of
    :data:`sgmft.data.synth.CASES`, then any others by name.
    """
    from sgmft.data.synth import CASES

    found = {c for c in cases[ok] if c is not None}
    order = [c for c in CASES if c in found] + sorted(found - set(CASES))
    per_case = {}
    for case in order:
        mine = ok & (cases == case)
        per_case[case] = {"accuracy": float(correct[mine].mean()), "n": int(mine.sum())}
    return per_case


def format_per_case(per_case: dict[str, dict[str, Any]]) -> str:
    """The ``per_case`` of a report as aligned lines: case, accuracy, posts."""
    width = max([len("case"), *(len(case) for case in per_case)])
    lines = [f"{'case':<{width}} {'accuracy':>8} {'posts':>5}"]
    lines += [f"{case:<{width}} {m['accuracy']:>8.3f} {m['n']:>5}" for case, m in per_case.items()]
    return "\n".join(lines)


def _report(labels: list[str], columns: dict[str, np.ndarray], split: str) -> dict[str, Any]:
    """Totals, per-class figures and the confusion matrix of :func:`split_predictions`' columns;
    ``per_case`` when posts have a case."""
    ok = columns["error"] == ""
    index = {label: i for i, label in enumerate(labels)}
    truth = np.array([index[label] for label in columns["label"][ok]], dtype=np.int64)
    predicted = np.array([index[label] for label in columns["predicted_label"][ok]], dtype=np.int64)
    report = classification_report(confusion_matrix(truth, predicted, len(labels)), labels)
    failed = columns["error"][~ok]
    report.update({"split": split, "labels": labels, "failed": len(failed), "failed_examples": failed[:10].tolist()})
    cases = columns["case"]
    if any(c is not None for c in cases):
        correct = np.array([p == t for p, t in zip(columns["predicted_label"], columns["label"])], dtype=bool)
        report["per_case"] = per_case_accuracy(correct, ok, cases)
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


def split_predictions(model_dir: str | Path, dataset_dir: str | Path, split: str = "test", *, in_process: bool = False,
                      **predict_kwargs: Any) -> dict[str, np.ndarray]:
    """Every post of ``split`` with the model's output, as columns sorted by post id: ``post_id``,
    ``label``, ``predicted_label``, ``probabilities``, ``error`` ("" where the post decoded) and
    ``case`` (its ``meta_case``, None where the dataset has none). The model's and the
    dataset's label sets must agree.

    Predicted by a Ray Data actor pool (:func:`sgmft.inference.predictions`, which takes
    ``predict_kwargs``); ``in_process``: by the runner in this process, with no Ray (small
    splits and the tests that start none), ``batch_size`` the one keyword it takes.
    """
    from sgmft.model_dir import check_model_dir

    _check_labels(check_model_dir(model_dir)[1], model_dir, dataset_dir)
    predict = _predict_in_process if in_process else _predict_on_ray_data
    batches = list(predict(model_dir, dataset_dir, split, **predict_kwargs))
    if not batches:
        raise ValueError(f"the {split} split of {dataset_dir} has no posts")
    columns = {name: np.concatenate([batch[name] for batch in batches]) for name in PREDICTION_COLUMNS}
    cases = _cases(dataset_dir, split) or {}  # predictions carry post ids, not meta columns
    columns["case"] = np.array([cases.get(post_id) for post_id in columns["post_id"]], dtype=object)
    order = np.argsort(columns["post_id"].astype(str), kind="stable")
    return {name: column[order] for name, column in columns.items()}


def _predict_on_ray_data(model_dir: str | Path, dataset_dir: str | Path, split: str,
                         **predict_kwargs: Any) -> Iterator[dict[str, np.ndarray]]:
    from sgmft.inference import predictions

    ds, _ = predictions(model_dir, dataset_dir, split, **predict_kwargs)
    yield from ds.select_columns(list(PREDICTION_COLUMNS)).iter_batches(batch_format="numpy", batch_size=None)


def _predict_in_process(model_dir: str | Path, dataset_dir: str | Path, split: str,
                        batch_size: int = PREDICT_BATCH_SIZE) -> Iterator[dict[str, np.ndarray]]:
    import pyarrow.parquet as pq

    from sgmft.data.schema import split_files
    from sgmft.inference import InferenceRunner

    runner = InferenceRunner(model_dir)
    try:
        for path in split_files(dataset_dir, split):
            for rows in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=["post_id", "text", "image", "label"]):
                yield runner.predict_batch({name: np.asarray(rows.column(name).to_pylist(), dtype=object)
                                            for name in rows.schema.names})
    finally:
        runner.close()


def evaluate(model_dir: str | Path, dataset_dir: str | Path, split: str = "test", out_dir: str | Path | None = None,
             *, in_process: bool = False, **predict_kwargs: Any) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class P/R/F1 and the confusion matrix of ``split``.

    Written to ``out_dir`` (default: the model directory) as ``eval-{split}.json`` and
    ``confusion-{split}.png``. Rows whose image fails to decode are counted, not hidden.
    With a ``meta_case`` column in the dataset the report has ``per_case``:
    ``{case: {"accuracy", "n"}}`` over the posts that decoded. ``in_process`` and
    ``predict_kwargs``: how the split is predicted (:func:`split_predictions`).
    """
    from sgmft.model_dir import check_model_dir

    model_dir = Path(model_dir)
    labels = check_model_dir(model_dir)[1]
    report = _report(labels, split_predictions(model_dir, dataset_dir, split, in_process=in_process, **predict_kwargs), split)
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
