"""Time per tuning trial with the backbone feature cache against the end-to-end path.

Both trials train the same head on a frozen ``small`` backbone with the same seed; the
cached one reads token features computed once by Ray Data instead of decoding images
and re-running the ViT and text encoder every epoch. The one-off cache build is
reported too: it is amortised over every trial of a search.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.common import Timer, local_ray, main, save
from sgmft.config import load_config

REPO = Path(__file__).resolve().parents[1]


def run(quick: bool = False) -> dict:
    from sgmft.features import cache_features
    from sgmft.runs import resolve_dataset
    from sgmft.train import train

    n, epochs = (480, 2) if quick else (960, 4)
    with tempfile.TemporaryDirectory(prefix="sgmft-bench-") as tmp:
        def config(run_name: str, *extra: str):
            return load_config(REPO / "jobs" / "configs" / "demo.yaml", [
                "model.backbone.preset=small", "model.backbone.policy=frozen", "model.d_model=64", f"data.synth.n={n}",
                "data.synth.image_size=128", "data.batch_size=32", f"train.epochs={epochs}", f"train.storage_path={tmp}",
                f"train.run_name={run_name}", "train.cpus_per_worker=0.25", *extra])

        base = config("e2e")
        dataset_dir = resolve_dataset(base)
        with local_ray(num_cpus=4):
            with Timer() as e2e:
                end_to_end = train(config("e2e", f"data.path={dataset_dir}"), evaluate_test=False)
            with Timer() as build:
                cache_features(base, dataset_dir, Path(tmp) / "features", concurrency=2)
            with Timer() as cached_timer:
                cached = train(config("cached", f"data.path={dataset_dir}", f"train.features_path={Path(tmp) / 'features'}"),
                               evaluate_test=False)
    steady = lambda outcome: sum(h["samples_per_s"] for h in outcome.history[1:]) / max(1, len(outcome.history) - 1)  # noqa: E731
    result = {
        "preset": "small (frozen)", "rows": n, "epochs": epochs,
        "end_to_end_trial_s": e2e.seconds, "cached_trial_s": cached_timer.seconds, "cache_build_s": build.seconds,
        "speedup": e2e.seconds / cached_timer.seconds,
        "steady_samples_per_s": {"end_to_end": steady(end_to_end), "cached": steady(cached)},
        "steady_speedup": steady(cached) / steady(end_to_end),
        "end_to_end_best_val_accuracy": end_to_end.best["val_accuracy"], "cached_best_val_accuracy": cached.best["val_accuracy"],
        "goal": "speedup >= 5x",
    }
    print(f"tune trial ({n} posts, {epochs} epochs, frozen small backbone): end-to-end {e2e.seconds:.1f}s, "
          f"cached {cached_timer.seconds:.1f}s -> {result['speedup']:.1f}x per trial, {result['steady_speedup']:.1f}x per "
          f"steady-state epoch; cache built once in {build.seconds:.1f}s; "
          f"best val accuracy {end_to_end.best['val_accuracy']:.3f} vs {cached.best['val_accuracy']:.3f}")
    save("tune_cache", result)
    return result


if __name__ == "__main__":
    main(run, __doc__)
