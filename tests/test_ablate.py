"""The ablation table: the bootstrap, late fusion and the summary on made-up predictions (no Ray),
the synth flags for the case shares, and one small ablation grid end to end on the session's Ray."""

import json
from pathlib import Path

import numpy as np
import pytest

from sgmft.ablate import (CROSS_MODAL_CASES, LATE_FUSION, Predictions, ablation_table, build_report, late_fusion,
                          paired_bootstrap, trained_variants)

REPO = Path(__file__).resolve().parents[1]
CASES = np.array(["both_cues", "no_cue", *CROSS_MODAL_CASES] * 40, dtype=object)  # 120 of 200 posts cross-modal


def bernoulli(p: float, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(shape) < p


def predictions(correct: np.ndarray, num_labels: int = 3, seed: int = 0) -> Predictions:
    """Made-up predictions that are right exactly where ``correct`` says (true class 0)."""
    n = len(correct)
    probs = np.full((n, num_labels), 0.1, dtype=np.float32)
    wrong = 1 + np.random.default_rng(seed).integers(0, num_labels - 1, n)
    probs[np.arange(n), np.where(correct, 0, wrong)] = 0.8
    return Predictions(np.array([f"p{i:04d}" for i in range(n)], dtype=object), np.zeros(n, dtype=np.int64), probs,
                       np.ones(n, dtype=bool), CASES[:n].copy())


def test_identical_variants_differ_by_zero_with_an_interval_holding_zero():
    full = bernoulli(0.7, (5, 1000), seed=1)
    boot = paired_bootstrap(full, full.copy())
    assert boot["diff"] == 0.0 and boot["ci_low"] <= 0.0 <= boot["ci_high"]
    assert boot["posts"] == 1000 and boot["seeds"] == 5 and boot["resamples"] >= 1000


def test_a_variant_right_wherever_full_is_wrong_has_an_interval_above_zero():
    full = bernoulli(0.7, (5, 1000), seed=2)
    boot = paired_bootstrap(np.ones_like(full), full)
    assert boot["diff"] == pytest.approx(1 - full.mean())
    assert 0.0 < boot["ci_low"] <= boot["diff"] <= boot["ci_high"]


def test_the_bootstrap_pairs_by_post_and_is_reproducible():
    """Twenty posts fixed out of 1,000 at every seed: +2 points, significant only when paired."""
    full = np.tile(bernoulli(0.7, (1, 1000), seed=3), (5, 1))
    better = full.copy()
    better[:, np.flatnonzero(~full[0])[:20]] = True
    boot = paired_bootstrap(better, full)
    assert boot["diff"] == pytest.approx(0.02) and 0.0 < boot["ci_low"] < 0.02 < boot["ci_high"] < 0.04
    assert paired_bootstrap(better, full) == boot
    with pytest.raises(ValueError):
        paired_bootstrap(better[:, :10], full)


def test_late_fusion_averages_logits_and_follows_the_confident_modality():
    text_logits = np.array([[1.0, 0.8, 0.5], [0.2, 0.1, 3.0]])
    image_logits = np.array([[-2.0, 4.0, -2.0], [0.0, 0.3, 0.1]])
    def softmax(x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    ids, labels, ok, cases = np.array(["a", "b"], dtype=object), np.array([1, 2]), np.ones(2, bool), np.array([None, None])
    text = Predictions(ids, labels, softmax(text_logits).astype(np.float32), ok, cases)
    image = Predictions(ids, labels, softmax(image_logits).astype(np.float32), ok, cases)
    fused = late_fusion(text, image)
    # the uncertain text says class 0, the confident image class 1: fused follows the image; and vice versa
    assert text.probs[0].argmax() == 0 and fused.probs[0].argmax() == 1 and fused.probs[1].argmax() == 2
    np.testing.assert_allclose(fused.probs, softmax((text_logits + image_logits) / 2), atol=1e-6)
    assert fused.correct.tolist() == [True, True]
    with pytest.raises(ValueError):
        late_fusion(text, Predictions(ids[::-1].copy(), labels, image.probs, ok, cases))


def test_the_report_has_rows_per_case_late_fusion_and_intervals():
    trials = {}
    for seed in (0, 1):
        full = bernoulli(0.7, (200,), seed=10 + seed)
        trials["full", seed] = predictions(full, seed=seed)
        trials["no_sim", seed] = predictions(full & bernoulli(0.9, (200,), seed=20 + seed), seed=seed)
        trials["text_only", seed] = predictions(bernoulli(0.5, (200,), seed=30 + seed), seed=seed)
        trials["image_only", seed] = predictions(bernoulli(0.5, (200,), seed=40 + seed), seed=seed)
    order = ["full", "no_sim", LATE_FUSION, "text_only", "image_only"]
    report = build_report(trials, {k: 0.5 for k in trials}, ["a", "b", "c"], order)
    json.dumps(report)  # what ablation.json holds
    assert [(r["variant"], r["seed"]) for r in report["rows"]] == [(v, s) for v in order for s in (0, 1)]
    assert all(r["val_accuracy"] is None for r in report["rows"] if r["variant"] == LATE_FUSION)
    assert report["test_posts"] == 200 and report["cross_modal_posts"] == 120
    summary = {s["variant"]: s for s in report["summary"]}
    accs = [r["test_accuracy"] for r in report["rows"] if r["variant"] == "no_sim"]
    assert summary["no_sim"]["test_accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
    assert summary["full"]["vs_full"] is None
    no_sim = summary["no_sim"]["vs_full"]
    assert no_sim["overall"]["ci_high"] < 0 and no_sim["cross_modal"]["posts"] == 120
    assert set(CROSS_MODAL_CASES) <= set(summary[LATE_FUSION]["per_case"])
    markdown = ablation_table(report)
    assert markdown.startswith("| variant | seeds |") and "| late_fusion | 2 |" in markdown
    assert "two_objects_by_colour (40)" in markdown and "paired bootstrap" in markdown


def test_a_post_that_failed_to_decode_is_counted_as_failed_not_as_wrong():
    """The same rule as evaluate's report: accuracy, overall and per case, is over the posts that decoded."""
    from sgmft.ablate import trial_row

    correct = np.array([True, True, False, True])
    preds = predictions(correct)
    preds.ok = np.array([True, True, True, False])  # the fourth post's image did not decode
    preds.cases = np.array(["both_cues", "both_cues", "no_cue", "no_cue"], dtype=object)
    row = trial_row("full", 0, preds, num_labels=3)
    assert row["test_accuracy"] == pytest.approx(2 / 3) and (row["test_posts"], row["failed_posts"]) == (3, 1)
    assert row["per_case"] == {"both_cues": {"accuracy": 1.0, "n": 2}, "no_cue": {"accuracy": 0.0, "n": 1}}


def test_late_fusion_trains_its_two_parts_and_unknown_variants_are_refused():
    assert trained_variants(["full", LATE_FUSION]) == ["full", "text_only", "image_only"]
    assert trained_variants(["text_only", LATE_FUSION]) == ["text_only", "image_only"]
    with pytest.raises(ValueError, match="unknown ablation variants"):
        trained_variants(["full", "no_such"])


def test_evaluate_prints_accuracy_per_case():
    from sgmft.evaluate import format_per_case

    lines = format_per_case({"both_cues": {"accuracy": 0.99, "n": 277}, "misleading_text": {"accuracy": 0.5, "n": 99}}).splitlines()
    assert lines[0].split() == ["case", "accuracy", "posts"]
    assert lines[2].split() == ["misleading_text", "0.500", "99"] and len({len(line) for line in lines}) == 1


def test_synth_takes_the_case_shares_and_split_fractions(tmp_path, capsys):
    from sgmft.cli import main

    out = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(out), "--n", "100", "--two-object-share", "0.3", "--misleading-share", "0.2",
                 "--test-frac", "0.5", "--image-size", "32"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["noise"]["two_object_share"] == 0.3 and report["noise"]["misleading_share"] == 0.2
    assert report["splits"]["test"] == 50 and report["cases"]["misleading_text"] > 0


def test_a_small_ablation_writes_intervals_and_per_case_rows(ray_cluster, tmp_path):
    from sgmft.ablate import ablate
    from sgmft.config import load_config
    from sgmft.data.synth import synthesize

    dataset = tmp_path / "data"
    synthesize(dataset, n=120, seed=0, text_noise=0.1, image_noise=0.1, image_swap=0.0, two_object_share=0.2,
               misleading_share=0.1, test_frac=0.4, image_size=32)
    cfg = load_config(REPO / "jobs" / "configs" / "demo.yaml", [
        f"train.storage_path={tmp_path}", "train.run_name=ablate", f"data.path={dataset}", "data.batch_size=16",
        "train.num_workers=1", "tune.cpus_per_worker=0.25", "train.epochs=1"])
    outcome = ablate(cfg, variants=["full", LATE_FUSION], seeds=[0, 1], resamples=1000, in_process=True)
    report = json.loads((outcome.directory / "ablation.json").read_text())
    variants = ["full", LATE_FUSION, "text_only", "image_only"]
    assert [(r["variant"], r["seed"]) for r in report["rows"]] == [(v, s) for v in variants for s in (0, 1)]
    test_posts = json.loads((dataset / "report.json").read_text())["splits"]["test"]
    assert report["test_posts"] == test_posts and all(r["per_case"] for r in report["rows"])
    for s in report["summary"][1:]:
        for scope in ("overall", "cross_modal"):
            boot = s["vs_full"][scope]
            assert boot["seeds"] == 2 and boot["ci_low"] <= boot["diff"] <= boot["ci_high"]
    assert (outcome.directory / "ablation.md").read_text() == outcome.markdown
    lines = outcome.markdown.splitlines()
    assert lines[0].startswith("| variant") and any(line.startswith("| full | 2 |") for line in lines), lines[:4]
    assert len(np.load(outcome.directory / "ablation-predictions.npz").files) == 4 + 3 * 2  # ids, labels, ok, cases + trials


def test_two_backbones_compare_variant_by_variant_on_the_same_posts():
    from benchmarks.ablation_compare import compare

    n = 200
    better = {(v, s): predictions(bernoulli(0.9, (n,), seed=s), seed=s) for v in ("full", "text_only") for s in (0, 1)}
    worse = {(v, s): predictions(bernoulli(0.5, (n,), seed=10 + s), seed=s) for v in ("full", "text_only") for s in (0, 1)}
    rows = {r["variant"]: r for r in compare(better, worse)}
    assert list(rows) == ["full", "text_only"] and rows["full"]["seeds"] == [0, 1]
    full = rows["full"]["overall"]
    expected = np.mean([better["full", s].correct.mean() - worse["full", s].correct.mean() for s in (0, 1)])
    assert full["diff"] == pytest.approx(expected) and full["ci_low"] > 0
    assert rows["full"]["cross_modal"]["posts"] == int(np.isin(CASES[:n], CROSS_MODAL_CASES).sum())
    shifted = {k: Predictions(np.roll(p.post_ids, 1), p.labels, p.probs, p.ok, p.cases) for k, p in worse.items()}
    with pytest.raises(ValueError, match="different test posts"):
        compare(better, shifted)


def test_saved_predictions_load_back_as_they_were(tmp_path):
    from sgmft.ablate import _save_predictions, load_predictions

    trials = {(v, s): predictions(bernoulli(0.7, (200,), seed=s), seed=s) for v in ("full", "no_sim") for s in (0, 3)}
    _save_predictions(trials, tmp_path / "p.npz")
    loaded = load_predictions(tmp_path / "p.npz")
    assert set(loaded) == set(trials)
    for key, p in trials.items():
        assert np.array_equal(loaded[key].probs, p.probs) and np.array_equal(loaded[key].correct, p.correct)
        assert list(loaded[key].post_ids) == list(p.post_ids) and list(loaded[key].cases) == list(p.cases)
