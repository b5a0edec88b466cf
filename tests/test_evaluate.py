"""The evaluation report: totals as before, and accuracy per synthetic case beside them."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from sgmft.model_dir import save_model_dir
from sgmft.config import Config, model_config_for
from sgmft.data.labels import DEFAULT_LABELS
from sgmft.data.schema import split_files
from sgmft.data.synth import CASES, synthesize
from sgmft.evaluate import _report, evaluate, per_case_accuracy
from sgmft.models.model import build_model

REPORT_KEYS = {"accuracy", "macro_f1", "per_class", "confusion_matrix", "num_examples", "split", "labels",
               "failed", "failed_examples"}
"""Keys the report had before per-case accuracy; they stay as they were."""


def _row(label: str, predicted: str | None, case: str | None, error: str = "") -> dict:
    return {"label": label, "predicted_label": predicted, "error": error, "case": case}


def _columns(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows as the columns split_predictions gives (post ids and probabilities left out: _report reads neither)."""
    return {name: np.array([r[name] for r in rows], dtype=object) for name in ("label", "predicted_label", "error", "case")}


def evaluate_in_process(model_dir, dataset, split, tmp_path):
    return evaluate(model_dir, dataset, split, out_dir=tmp_path / f"eval-{dataset.name}", in_process=True)


def test_per_case_accuracy_of_hand_made_rows():
    labels = ["home", "school", "gym"]
    rows = [
        _row("home", "home", "no_cue"), _row("school", "home", "no_cue"), _row("gym", "gym", "no_cue"),
        _row("home", "school", "both_cues"), _row("gym", "school", "both_cues"),
        _row("school", None, "both_cues", error="image_truncated: p7"),  # failed rows count only as failed
        _row("gym", "gym", "my_own_case"),
    ]
    report = _report(labels, _columns(rows), "test")
    assert REPORT_KEYS <= set(report)
    assert report["failed"] == 1 and report["num_examples"] == 6
    assert report["accuracy"] == pytest.approx(3 / 6)
    # synth's case order first (both_cues before no_cue), then cases it does not know, by name
    assert list(report["per_case"]) == ["both_cues", "no_cue", "my_own_case"]
    assert report["per_case"]["both_cues"] == {"accuracy": 0.0, "n": 2}
    assert report["per_case"]["no_cue"] == {"accuracy": pytest.approx(2 / 3), "n": 3}
    assert report["per_case"]["my_own_case"] == {"accuracy": 1.0, "n": 1}
    # the per-case figures add up to the total
    per_case = report["per_case"].values()
    assert sum(c["n"] for c in per_case) == report["num_examples"]
    assert sum(c["accuracy"] * c["n"] for c in per_case) == pytest.approx(report["accuracy"] * report["num_examples"])


def test_rows_without_cases_give_the_report_of_before():
    labels = ["home", "school"]
    columns = _columns([_row("home", "home", None), _row("school", "home", None)])
    plain = _report(labels, columns, "val")
    assert "per_case" not in plain and set(plain) == REPORT_KEYS
    assert per_case_accuracy(np.array([True, False]), np.array([True, True]), columns["case"]) == {}


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory) -> tuple[Path, Path]:
    import torch

    root = tmp_path_factory.mktemp("evaluate")
    synthesize(root / "ds", n=200, seed=4, image_size=32, two_object_share=0.2, misleading_share=0.1, test_frac=0.3)
    torch.manual_seed(0)
    cfg = Config(model=model_config_for("tiny", num_labels=len(DEFAULT_LABELS)))
    model_dir = save_model_dir(root / "model", build_model(cfg.model, load_pretrained=False), cfg, DEFAULT_LABELS, {"version": "e1"})
    return model_dir, root / "ds"


def _expected_per_case(model_dir: Path, dataset: Path, split: str) -> dict:
    """Per-case accuracy recomputed here: the model's predictions joined to meta_case by post id."""
    from sgmft.inference import InferenceRunner

    runner = InferenceRunner(model_dir)
    table = pq.read_table(split_files(dataset, split))
    batch = {name: np.asarray(table.column(name).to_pylist(), dtype=object) for name in ("post_id", "text", "image", "label")}
    out = runner.predict_batch(batch)
    predicted = dict(zip(out["post_id"], out["predicted_label"]))
    hits = defaultdict(list)
    for post_id, label, case in zip(table.column("post_id").to_pylist(), table.column("label").to_pylist(),
                                    table.column("meta_case").to_pylist()):
        hits[case].append(predicted[post_id] == label)
    return {case: {"accuracy": float(np.mean(h)), "n": len(h)} for case, h in hits.items()}


def test_evaluate_in_process_reports_accuracy_per_case(model_and_data, tmp_path):
    model_dir, dataset = model_and_data
    report = evaluate_in_process(model_dir, dataset, "test", tmp_path)
    assert REPORT_KEYS <= set(report)
    expected = _expected_per_case(model_dir, dataset, "test")
    assert report["per_case"] == {case: expected[case] for case in CASES if case in expected}
    assert {"two_objects_by_position", "two_objects_by_colour", "misleading_text"} <= set(report["per_case"])
    assert sum(c["n"] for c in report["per_case"].values()) == report["num_examples"] == 60


def test_a_dataset_without_meta_case_has_no_per_case(model_and_data, tmp_path):
    model_dir, dataset = model_and_data
    plain = tmp_path / "plain"
    for path in Path(dataset).rglob("*"):
        target = plain / path.relative_to(dataset)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.suffix == ".parquet":
            target.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pq.read_table(path).drop_columns(["meta_case"]), target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    with_cases, without = evaluate_in_process(model_dir, dataset, "test", tmp_path), evaluate_in_process(model_dir, plain, "test", tmp_path)
    assert "per_case" not in without
    assert {k: v for k, v in with_cases.items() if k != "per_case"} == without


def test_evaluate_on_ray_data_reports_the_same_per_case(ray_cluster, model_and_data, tmp_path):
    """``evaluate`` predicts through Ray Data, whose rows carry post ids and no meta columns:
    its per-case figures must still be the local ones, in the written JSON too."""
    import json

    from sgmft.evaluate import evaluate

    model_dir, dataset = model_and_data
    report = evaluate(model_dir, dataset, "test", out_dir=tmp_path / "eval", batch_size=16)
    local = evaluate_in_process(model_dir, dataset, "test", tmp_path)
    assert report["per_case"] == local["per_case"]
    assert report["accuracy"] == pytest.approx(local["accuracy"])
    assert json.loads((tmp_path / "eval" / "eval-test.json").read_text())["per_case"] == local["per_case"]


def test_a_dataset_with_another_label_order_is_refused(model_and_data, tmp_path):
    """Labels are indices: the same names in another order would score every prediction wrong."""
    import json
    import shutil

    model_dir, dataset = model_and_data
    reordered = tmp_path / "reordered"
    shutil.copytree(dataset, reordered)
    labels = json.loads((reordered / "labels.json").read_text())
    (reordered / "labels.json").write_text(json.dumps(labels[::-1]))
    with pytest.raises(ValueError, match="different label set from the model"):
        evaluate_in_process(model_dir, reordered, "test", tmp_path)
