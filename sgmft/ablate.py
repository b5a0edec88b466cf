"""The paper's ablation table on any dataset: each variant x seed is a Ray Tune grid trial.

Every trial's best checkpoint predicts the test split post by post. Besides the trained
variants, ``late_fusion`` is the classic baseline built from the ``text_only`` and
``image_only`` trials of the same seed: their logits averaged, nothing trained of its own.
The table gives per variant the mean and sample standard deviation over seeds of test
accuracy and macro-F1, the accuracy of each synthetic case (``meta_case``), and a paired
bootstrap 95% interval of the accuracy difference to ``full``, over all test posts and over
the cross-modal cases (:data:`CROSS_MODAL_CASES`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sgmft.commands import (add_config_args, add_verbose_arg, cluster_name, config_from_args, data_source, print_where,
                            progress_bars, ray_for_command, show_path)
from sgmft.config import Config
from sgmft.evaluate import per_case_accuracy

# Each variant is a set of config overrides on top of the full model (the switches of docs/DESIGN.md).
VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "no_coarse": {"model.coarse_guidance": False},
    "no_fine": {"model.fine_guidance": False},
    "no_sim": {"model.use_sim": False},
    "concat_fusion": {"model.fusion": "concat"},
    "text_only": {"model.modalities": "text"},
    "image_only": {"model.modalities": "image"},
    "linear_probe": {"model.linear_probe": True},
}

LATE_FUSION = "late_fusion"
LATE_FUSION_PARTS = ("text_only", "image_only")
"""The trials late fusion is computed from (same seed, same test posts)."""
TABLE_ORDER = ("full", "no_coarse", "no_fine", "no_sim", "concat_fusion", LATE_FUSION, "text_only", "image_only",
               "linear_probe")
CROSS_MODAL_CASES = ("two_objects_by_position", "two_objects_by_colour", "misleading_text")
"""The cases of :data:`sgmft.data.synth.CASES` that need the text's words matched to image patches."""
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
RESAMPLES = 2000
BOOTSTRAP_SEED = 0
REFERENCE = "full"


@dataclass
class Predictions:
    """One model's predictions on a split, rows sorted by post id so that trials pair up post by post."""

    post_ids: np.ndarray
    labels: np.ndarray
    """True class index per post."""
    probs: np.ndarray
    """(posts, classes) probabilities."""
    ok: np.ndarray
    """False where the post's image failed to decode: counted as failed, in no accuracy (as evaluate counts it)."""
    cases: np.ndarray
    """``meta_case`` per post (object), None where the dataset has no such column."""

    @property
    def correct(self) -> np.ndarray:
        return (self.probs.argmax(1) == self.labels) & self.ok


@dataclass
class AblationOutcome:
    rows: list[dict[str, Any]]
    """One per variant x seed: accuracy overall, cross-modal and per case."""
    markdown: str
    directory: Path
    report: dict[str, Any]
    """What ``ablation.json`` holds: the rows, the summary with its intervals, how it was computed."""


def predict_split(model_dir: str | Path, dataset_dir: str | Path, split: str = "test", in_process: bool = False) -> Predictions:
    """Probabilities of every post of ``split`` from a model directory (:func:`sgmft.evaluate.split_predictions`)."""
    from sgmft.data.schema import load_labels
    from sgmft.evaluate import split_predictions

    index = {label: i for i, label in enumerate(load_labels(dataset_dir))}  # the model's order: checked equal
    columns = split_predictions(model_dir, dataset_dir, split, in_process=in_process)
    return Predictions(columns["post_id"], np.array([index[label] for label in columns["label"]], dtype=np.int64),
                       columns["probabilities"], columns["error"] == "", columns["case"])


def late_fusion(text: Predictions, image: Predictions) -> Predictions:
    """The two unimodal models' averaged logits, as probabilities.

    The runner gives softmax probabilities. The mean of two models' log-probabilities differs
    from the mean of their logits by a constant per post, so its softmax is exactly the
    softmax of the averaged logits: this is logit averaging, not probability averaging.
    """
    if not np.array_equal(text.post_ids, image.post_ids):
        raise ValueError("late fusion needs both models' predictions on the same test posts")
    tiny = np.finfo(np.float32).tiny  # a probability that underflowed to 0 stays finite in log space
    mean_log = (np.log(np.maximum(text.probs, tiny)) + np.log(np.maximum(image.probs, tiny))) / 2
    fused = np.exp(mean_log - mean_log.max(axis=1, keepdims=True))
    fused /= fused.sum(axis=1, keepdims=True)
    return Predictions(text.post_ids, text.labels, fused.astype(np.float32), text.ok & image.ok, text.cases)


def cross_modal(cases: np.ndarray) -> np.ndarray:
    """Per post: whether its case is one of :data:`CROSS_MODAL_CASES`."""
    return np.array([c in CROSS_MODAL_CASES for c in cases], dtype=bool)


def trial_row(variant: str, seed: int, preds: Predictions, num_labels: int, val_accuracy: float | None = None) -> dict[str, Any]:
    """One table row: a variant's test accuracy, macro-F1, cross-modal and per-case accuracy at one seed."""
    from sgmft.classification import classification_report, confusion_matrix

    ok = preds.ok  # a post that failed to decode is counted as failed, as evaluate counts it
    matrix = confusion_matrix(preds.labels[ok], preds.probs[ok].argmax(1), num_labels)
    correct, cross = preds.correct, cross_modal(preds.cases) & ok
    return {"variant": variant, "seed": seed, "val_accuracy": val_accuracy, "test_accuracy": float(correct[ok].mean()),
            "test_macro_f1": classification_report(matrix, [str(i) for i in range(num_labels)])["macro_f1"],
            "cross_modal_accuracy": float(correct[cross].mean()) if cross.any() else None,
            "test_posts": int(ok.sum()), "failed_posts": int((~ok).sum()),
            "per_case": per_case_accuracy(correct, ok, preds.cases)}


def paired_bootstrap(correct: np.ndarray, reference: np.ndarray, resamples: int = RESAMPLES,
                     rng_seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Accuracy difference ``correct - reference`` and its paired bootstrap 95% interval.

    Both are (seeds, posts) arrays of 0/1, paired by seed (row) and test post (column). Each
    resample draws the test posts with replacement, the same posts for every seed and both
    variants, so what the two models got right on the same post is compared, not two
    independent samples. Percentile interval; a fixed RNG seed makes it reproducible.
    """
    correct, reference = np.asarray(correct, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if correct.shape != reference.shape or correct.ndim != 2 or correct.shape[1] == 0:
        raise ValueError(f"paired arrays of shape (seeds, posts) expected, got {correct.shape} and {reference.shape}")
    per_post = (correct - reference).mean(axis=0)  # paired by seed, then averaged over seeds
    n = len(per_post)
    draws = per_post[np.random.default_rng(rng_seed).integers(0, n, size=(resamples, n))].mean(axis=1)
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"diff": float(per_post.mean()), "ci_low": float(low), "ci_high": float(high), "posts": n,
            "seeds": int(correct.shape[0]), "resamples": resamples}


def _mean_std(values: list[float | None]) -> dict[str, float | None]:
    """Mean and sample standard deviation (ddof=1; None for a single seed)."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else None}


def _versus_reference(trials: dict[tuple[str, int], Predictions], variant: str, seeds: list[int],
                      resamples: int, rng_seed: int) -> dict[str, Any] | None:
    """Paired bootstrap of ``variant`` against :data:`REFERENCE` over the seeds both have."""
    paired = [s for s in seeds if (REFERENCE, s) in trials]
    if variant == REFERENCE or not paired:
        return None
    mine = np.stack([trials[variant, s].correct for s in paired])
    full = np.stack([trials[REFERENCE, s].correct for s in paired])
    cross = cross_modal(trials[REFERENCE, paired[0]].cases)
    return {"seeds": paired, "overall": paired_bootstrap(mine, full, resamples, rng_seed),
            "cross_modal": paired_bootstrap(mine[:, cross], full[:, cross], resamples, rng_seed) if cross.any() else None}


def summarize(trials: dict[tuple[str, int], Predictions], rows: list[dict[str, Any]], order: list[str],
              resamples: int = RESAMPLES, rng_seed: int = BOOTSTRAP_SEED) -> list[dict[str, Any]]:
    """Per variant: mean and sample std over seeds, mean accuracy per case, the bootstrap against full."""
    summary = []
    for variant in order:
        mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["seed"])
        if not mine:
            continue
        cases = list(dict.fromkeys(c for r in mine for c in r["per_case"]))
        summary.append({
            "variant": variant, "seeds": [r["seed"] for r in mine],
            **{key: _mean_std([r[key] for r in mine]) for key in ("test_accuracy", "test_macro_f1", "cross_modal_accuracy")},
            "per_case": {c: _mean_std([r["per_case"][c]["accuracy"] for r in mine if c in r["per_case"]]) for c in cases},
            "vs_full": _versus_reference(trials, variant, [r["seed"] for r in mine], resamples, rng_seed),
        })
    return summary


def add_late_fusion(trials: dict[tuple[str, int], Predictions]) -> dict[tuple[str, int], Predictions]:
    """``trials`` plus ``late_fusion`` at every seed that has both :data:`LATE_FUSION_PARTS`."""
    text, image = LATE_FUSION_PARTS
    seeds = sorted({s for v, s in trials if v == text} & {s for v, s in trials if v == image})
    return {**trials, **{(LATE_FUSION, s): late_fusion(trials[text, s], trials[image, s]) for s in seeds}}


def build_report(trials: dict[tuple[str, int], Predictions], val_accuracy: dict[tuple[str, int], float],
                 labels: list[str], order: list[str], resamples: int = RESAMPLES,
                 rng_seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Everything ``ablation.json`` holds, from each trained trial's test predictions (no Ray)."""
    trials = add_late_fusion(trials) if LATE_FUSION in order else trials
    rows = [trial_row(v, s, trials[v, s], len(labels), val_accuracy.get((v, s)))
            for v in order for s in sorted(s for w, s in trials if w == v)]
    any_preds = next(iter(trials.values()))
    if any(not np.array_equal(p.post_ids, any_preds.post_ids) for p in trials.values()):
        raise ValueError("the trials predicted different test posts: the pairing by post needs the same test split")
    cases = per_case_accuracy(any_preds.ok, any_preds.ok, any_preds.cases)  # only its counts are used
    return {
        "variants": order, "seeds": sorted({s for _, s in trials}), "test_posts": len(any_preds.post_ids),
        "case_posts": {c: v["n"] for c, v in cases.items()}, "cross_modal_cases": list(CROSS_MODAL_CASES),
        "cross_modal_posts": int(cross_modal(any_preds.cases).sum()),
        "bootstrap": {"reference": REFERENCE, "resamples": resamples, "rng_seed": rng_seed, "interval": "percentile 95%",
                      "paired_by": "test post and seed: each resample draws test posts with replacement, the same for all seeds"},
        "late_fusion": "text_only and image_only of the same seed, logits averaged (as the softmax of their mean log-probabilities)",
        "std": "sample standard deviation over seeds (ddof=1)",
        "rows": rows, "summary": summarize(trials, rows, order, resamples, rng_seed),
    }


def _pct(stat: dict[str, float | None]) -> str:
    if stat["mean"] is None:
        return "–"
    return f"{100 * stat['mean']:.2f}" + (f" ± {100 * stat['std']:.2f}" if stat["std"] is not None else "")


def _diff(boot: dict[str, Any] | None) -> str:
    if boot is None:
        return "–"
    return f"{100 * boot['diff']:+.2f} [{100 * boot['ci_low']:+.2f}, {100 * boot['ci_high']:+.2f}]"


def ablation_table(report: dict[str, Any]) -> str:
    """Markdown: the totals with the intervals against full, then accuracy per case, then how."""
    lines = ["| variant | seeds | test accuracy | Δ vs full [95% CI] | cross-modal accuracy | Δ cross-modal [95% CI] | test macro-F1 |",
             "|---|---|---|---|---|---|---|"]
    for s in report["summary"]:
        vs = s["vs_full"] or {}
        lines.append(f"| {s['variant']} | {len(s['seeds'])} | {_pct(s['test_accuracy'])} | {_diff(vs.get('overall'))} | "
                     f"{_pct(s['cross_modal_accuracy'])} | {_diff(vs.get('cross_modal'))} | {_pct(s['test_macro_f1'])} |")
    cases = report["case_posts"]
    if cases:
        lines += ["", "| variant | " + " | ".join(f"{c} ({n})" for c, n in cases.items()) + " | all |",
                  "|---|" + "---|" * (len(cases) + 1)]
        for s in report["summary"]:
            lines.append(f"| {s['variant']} | " + " | ".join(_pct(s["per_case"].get(c, {"mean": None})) for c in cases)
                         + f" | {_pct(s['test_accuracy'])} |")
    b = report["bootstrap"]
    lines += ["", (f"Test accuracy in % on {report['test_posts']} posts ({report['cross_modal_posts']} cross-modal: "
                   f"{', '.join(report['cross_modal_cases'])}): mean ± sample std over seeds. Δ: difference to full in "
                   f"percentage points with a paired bootstrap 95% interval ({b['resamples']} resamples of the test posts, "
                   f"paired by post and seed, RNG seed {b['rng_seed']}). late_fusion: {report['late_fusion']}.")]
    return "\n".join(lines) + "\n"


def trained_variants(variants: list[str]) -> list[str]:
    """The variants to train: those asked for, with late fusion's parts in its place."""
    unknown = [v for v in variants if v not in VARIANTS and v != LATE_FUSION]
    if unknown:
        raise ValueError(f"unknown ablation variants {unknown}; known: {list(TABLE_ORDER)}")
    wanted = [v for v in variants if v != LATE_FUSION] + (list(LATE_FUSION_PARTS) if LATE_FUSION in variants else [])
    return list(dict.fromkeys(wanted))


def _trial_predictions(result: Any, setup: Any, dataset_dir: Path, directory: Path,
                       in_process: bool) -> tuple[Predictions, float]:
    """A finished trial's best checkpoint, read where it lies, on the test split; and its val accuracy."""
    from sgmft.runs import best_checkpoint, export_best, trial_result

    if result.error or result.metrics is None:
        raise RuntimeError(f"ablation trial {result.config.get('variant')} seed {result.config.get('train.seed')} failed: {result.error}")
    trial_cfg = setup.config(result.config, result.metrics["trial_id"])
    trained = trial_result(result, trial_cfg)
    checkpoint, best = best_checkpoint(trained, trial_cfg)
    if trial_cfg.train.features_path:  # a head on cached features: completed with its backbone to read posts
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            model_dir = export_best(trained, trial_cfg, Path(tmp) / "model")[0]
            return predict_split(model_dir, dataset_dir, in_process=in_process), best["val_accuracy"]
    with checkpoint.as_directory() as model_dir:
        return predict_split(model_dir, dataset_dir, in_process=in_process), best["val_accuracy"]


def _run_grid(cfg: Config, variants: list[str], seeds: list[int]) -> tuple[Any, Any, Path]:
    """Every variant x seed as a Tune grid on data prepared once; the results, the setup, the dataset."""
    from ray import tune as ray_tune

    from sgmft.runs import resolve_dataset
    from sgmft.trials import concurrency, fit_search, in_process, run_config, search_setup, trainable

    dataset_dir = resolve_dataset(cfg)  # the posts every trial is tested on
    cfg.data.path = str(dataset_dir)
    setup = search_setup(cfg, groups={"variant": VARIANTS})  # every variant sees the same data, prepared once
    tuner = ray_tune.Tuner(
        trainable(cfg, setup), param_space={"variant": ray_tune.grid_search(variants), "train.seed": ray_tune.grid_search(seeds)},
        tune_config=ray_tune.TuneConfig(metric=cfg.train.metric, mode=cfg.train.metric_mode, max_concurrent_trials=concurrency(cfg),
                                        reuse_actors=in_process(cfg)),
        run_config=run_config(cfg, "ablate"),
    )
    return fit_search(tuner, setup), setup, dataset_dir


def ablate(cfg: Config, variants: list[str] | None = None, seeds: list[int] | None = None,
           resamples: int = RESAMPLES, in_process: bool = False) -> AblationOutcome:
    """Train every variant with every seed on the same data, predict the test split with each.

    Each (variant, seed) is a :func:`sgmft.trials.run_trial` trial whose ``variant`` parameter
    names one of :data:`VARIANTS`; ``late_fusion`` trains ``text_only`` and ``image_only``
    instead. Writes ``ablation.json`` (rows, summary, intervals), ``ablation.md`` and
    ``ablation-predictions.npz`` (every trial's test probabilities) to the run directory.
    Each trial's test split is predicted on Ray Data; ``in_process`` predicts it in this
    process instead (a tiny model on a small split, where an actor pool's start costs more
    than the predictions: ~7 s against 0.2 s for 50 posts of the tiny model on 2 cores).
    """
    from sgmft.data.schema import load_labels

    variants = list(variants or TABLE_ORDER)
    trained = trained_variants(variants)
    seeds = list(seeds or DEFAULT_SEEDS)
    results, setup, dataset_dir = _run_grid(cfg, trained, seeds)
    directory = Path(setup.search_dir)
    trials: dict[tuple[str, int], Predictions] = {}
    val_accuracy: dict[tuple[str, int], float] = {}
    for result in results:
        key = (result.config.get("variant"), result.config.get("train.seed"))
        trials[key], val_accuracy[key] = _trial_predictions(result, setup, dataset_dir, directory, in_process)
    order = [v for v in TABLE_ORDER if v in variants or v in trained]
    report = build_report(trials, val_accuracy, load_labels(dataset_dir), order, resamples)
    markdown = ablation_table(report)
    (directory / "ablation.md").write_text(markdown)
    (directory / "ablation.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    _save_predictions(trials, directory / "ablation-predictions.npz")
    return AblationOutcome(report["rows"], markdown, directory, report)


def _save_predictions(trials: dict[tuple[str, int], Predictions], path: Path) -> None:
    """Every trained trial's test probabilities, so the table can be recomputed without training."""
    first = next(iter(trials.values()))
    np.savez_compressed(path, post_ids=first.post_ids.astype(str), labels=first.labels, ok=first.ok,
                        cases=np.array(["" if c is None else c for c in first.cases], dtype=str),
                        **{f"{v}-seed{s}": p.probs for (v, s), p in trials.items()})


def load_predictions(path: Path) -> dict[tuple[str, int], Predictions]:
    """The trained trials :func:`_save_predictions` wrote, by (variant, seed)."""
    saved = np.load(path)
    cases = np.array([c or None for c in saved["cases"]], dtype=object)
    return {(variant, int(seed)): Predictions(saved["post_ids"], saved["labels"], saved[key], saved["ok"], cases)
            for key in saved.files if "-seed" in key for variant, seed in [key.rsplit("-seed", 1)]}


# --- the command line ----------------------------------------------------------------------

def cmd_ablate(args: argparse.Namespace) -> None:
    from sgmft.runs import run_dir

    cfg = config_from_args(args)
    directory = run_dir(cfg)
    variants, seeds = args.variants or list(TABLE_ORDER), args.seeds or list(DEFAULT_SEEDS)
    trained = trained_variants(variants)  # late_fusion is computed from text_only and image_only, not trained
    print(f"SG-MFT ablation: {len(variants)} variants, {len(trained)} trained x {len(seeds)} seeds as a Ray Tune grid, "
          f"{cfg.train.epochs} epochs each, {data_source(cfg)}, on {cluster_name()}", flush=True)
    print_where("directory", directory, directory / "logs", args.verbose)
    with ray_for_command(args, directory / "logs") as console, progress_bars(console, per_run=False):
        outcome = ablate(cfg, variants=variants, seeds=seeds)
    print(outcome.markdown)
    print(f"written: {show_path(outcome.directory / 'ablation.md')}, {show_path(outcome.directory / 'ablation.json')}")


def add_commands(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("ablate", help="the ablation table: variants x seeds as a Ray Tune grid")
    add_config_args(parser)
    add_verbose_arg(parser)
    parser.add_argument("--variants", nargs="+", help="subset of variants (default: all; late_fusion trains text_only "
                        "and image_only)")
    parser.add_argument("--seeds", nargs="+", type=int, help="seeds (default: 0 1 2 3 4)")
    parser.set_defaults(func=cmd_ablate)
