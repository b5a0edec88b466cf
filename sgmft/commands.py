"""CLI commands that run the pipeline: demo, train, evaluate, predict, features, tune, ablate.

Each prints what is about to run and where its files go, a progress bar while Ray works
(on a terminal: posts done, posts/s, ETA), one line per epoch, and a summary. Ray's own
output goes to the log directory the banner names (see :mod:`sgmft.console`); ``--verbose``
shows it here instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from sgmft.cli_args import add_config_args, add_verbose_arg, config_from_args

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "demo.yaml"

if TYPE_CHECKING:
    from sgmft.console import Console


def _show(path: str | Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _where(label: str, directory: str | Path, log_dir: Path, verbose: bool) -> None:
    """The banner's second line: where the outputs go, and where Ray's logs go unless --verbose."""
    logs = "" if verbose else f" (Ray's logs: {_show(log_dir)})"
    print(f"{label}: {_show(directory)}{logs}", flush=True)


def _cluster() -> str:
    return "the Ray cluster at RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "local Ray"


def _data(cfg) -> str:
    if cfg.train.features_path:
        return f"cached features {cfg.train.features_path}"
    if cfg.data.path:
        return f"data {cfg.data.path}"
    return f"{cfg.data.synth.n} synthetic Weibo-like posts"


@contextlib.contextmanager
def _ray(args: argparse.Namespace, log_dir: Path) -> Iterator["Console"]:
    """Ray for one command: joined or started quietly (Ray's output to ``log_dir``) unless
    --verbose. Yields the user's console. A Ray this command started is shut down on the way
    out, still inside the quiet console, so its last words are logged too: print the summary
    after the block."""
    import ray

    from sgmft.console import WORKERS_LOG, quiet_console
    from sgmft.local_ray import connect

    verbose = getattr(args, "verbose", False)
    try:
        with quiet_console(None if verbose else log_dir) as console:
            started = connect(worker_log=None if verbose else log_dir / WORKERS_LOG)
            try:
                yield console
            finally:
                if started:
                    ray.shutdown()
    except Exception as exc:
        if not verbose and not isinstance(exc, (FileNotFoundError, ValueError)):  # those are the user's, one line
            print(f"sgmft: Ray's logs are in {_show(log_dir)}", file=sys.stderr)
        raise


def _progress(console: "Console", per_run: bool = True):
    from sgmft.progress import Progress

    return Progress(out=console.out, term=console.term, per_run=per_run)


def format_history(history: list[dict]) -> str:
    lines = [f"{'epoch':>5} {'train loss':>10} {'val acc':>8} {'val F1':>8} {'samples/s':>10} {'data wait':>9}"]
    for h in history:
        lines.append(f"{h['epoch']:>5} {h['train_loss']:>10.4f} {h['val_accuracy']:>8.3f} {h['val_macro_f1']:>8.3f} "
                     f"{h['samples_per_s']:>10.1f} {h['data_wait_share']:>9.1%}")
    return "\n".join(lines)


def _print_outcome(outcome, num_labels: int) -> None:
    print("\n" + format_history(outcome.history))
    print(f"best epoch {outcome.best['epoch']}: val accuracy {outcome.best['val_accuracy']:.3f}, "
          f"macro-F1 {outcome.best['val_macro_f1']:.3f}")
    if outcome.test:
        print(f"test: accuracy {outcome.test['accuracy']:.3f}, macro-F1 {outcome.test['macro_f1']:.3f} "
              f"on {outcome.test['num_examples']} posts (chance {1 / num_labels:.3f})")
    print(f"model directory: {_show(outcome.model_dir)}", flush=True)


def _train(args: argparse.Namespace, cfg, title: str):
    """Banner, the training run with its progress, the summary; returns the outcome."""
    from sgmft.runs import run_dir
    from sgmft.train import train

    directory = run_dir(cfg)
    log_dir = directory / "logs"
    print(title, flush=True)
    _where("run directory", directory, log_dir, args.verbose)
    with _ray(args, log_dir) as console, _progress(console):
        outcome = train(cfg)
    _print_outcome(outcome, cfg.model.num_labels)
    return outcome


def cmd_train(args: argparse.Namespace) -> None:
    cfg = config_from_args(args)
    t, b = cfg.train, cfg.model.backbone
    _train(args, cfg, f"SG-MFT train: {_data(cfg)}, {b.preset} Chinese-CLIP ({b.policy} backbone), {t.num_workers} Ray Train "
                      f"workers{' on GPUs' if t.use_gpu else ''} on {_cluster()}, {t.epochs} epochs")


def cmd_demo(args: argparse.Namespace) -> None:
    """Synthetic data -> 2-worker training of the tiny model on local Ray -> test evaluation."""
    if not args.config:  # the embedded default, written out in the package's jobs/configs/demo.yaml
        args.config = str(DEMO_CONFIG)
    cfg = config_from_args(args)
    outcome = _train(args, cfg, f"SG-MFT demo: {cfg.data.synth.n} synthetic Weibo-like posts, {cfg.model.backbone.preset} "
                                f"Chinese-CLIP, {cfg.train.num_workers} Ray Train workers, {cfg.train.epochs} epochs")
    print(f"next: sgmft serve --model {_show(outcome.model_dir)}   |   sgmft evaluate --model {_show(outcome.model_dir)} "
          f"--data {_show(outcome.dataset_dir)}", flush=True)


def _check_inputs(model: str, data: str) -> None:
    """The user's typos, refused before any Ray starts or any log directory is made."""
    from sgmft.checkpoint import check_model_dir

    check_model_dir(model)
    if not Path(data).exists():
        raise FileNotFoundError(f"{data} does not exist")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from sgmft.evaluate import evaluate, format_per_case

    _check_inputs(args.model, args.data)
    log_dir = Path(args.out or args.model) / "logs"
    print(f"SG-MFT evaluate: {_show(args.model)} on the {args.split} split of {_show(args.data)}", flush=True)
    _where("written to", args.out or args.model, log_dir, args.verbose)
    with _ray(args, log_dir) as console, _progress(console):
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


def cmd_predict(args: argparse.Namespace) -> None:
    if args.text is not None or args.image is not None:
        from sgmft.inference import InferenceRunner

        if args.image is None:
            raise ValueError("--image FILE is required with --text")
        image = Path(args.image)
        if not image.is_file():
            raise FileNotFoundError(f"image {image} does not exist")
        result = InferenceRunner(args.model).predict_post(args.text or "", image.read_bytes(), top_k=args.top_k)
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return
    if not (args.data and args.out):
        raise ValueError("give --data DIR --out DIR for batch prediction, or --text/--image for one post")
    from sgmft.predict import predict_dataset

    _check_inputs(args.model, args.data)
    log_dir = _beside(args.out)
    print(f"SG-MFT predict: {_show(args.model)} on {_show(args.data)}{f' ({args.split} split)' if args.split else ''}, "
          f"{args.concurrency} model replica{'s' if args.concurrency != 1 else ''}", flush=True)
    _where("predictions to", args.out, log_dir, args.verbose)
    with _ray(args, log_dir) as console, _progress(console):
        report = predict_dataset(args.model, args.data, args.out, split=args.split, concurrency=args.concurrency,
                                 batch_size=args.batch_size, num_gpus=args.num_gpus)
    print(json.dumps(report))


def _beside(out: str | Path) -> Path:
    """The log directory of a command whose output directory must start empty: next to it."""
    out = Path(out).resolve()
    return out.with_name(out.name + ".logs")


def cmd_tune(args: argparse.Namespace) -> None:
    from sgmft.runs import run_dir
    from sgmft.tune import tune

    cfg = config_from_args(args)
    directory = run_dir(cfg)
    t = cfg.tune
    print(f"SG-MFT tune: {t.num_samples} trials ({t.searcher} search, ASHA) of up to {cfg.train.epochs} epochs over "
          f"{len(t.search_space)} settings, {_data(cfg)}, on {_cluster()}", flush=True)
    _where("experiment directory", directory, directory / "logs", args.verbose)
    with _ray(args, directory / "logs") as console, _progress(console, per_run=False):
        outcome = tune(cfg, resume=not args.fresh)
    print((outcome.experiment_dir / "trials.md").read_text())
    print(f"best: {cfg.train.metric} {outcome.best_metrics[cfg.train.metric]:.4f} at epoch {outcome.best_metrics['epoch']}")
    print(f"best model directory: {_show(outcome.model_dir)}\nall trials: {_show(outcome.experiment_dir / 'trials.csv')}, "
          f"plot: {_show(outcome.experiment_dir / 'trials.png')}")


def cmd_features_cache(args: argparse.Namespace) -> None:
    from sgmft.features import cache_features

    cfg = config_from_args(args)
    cfg.model.backbone.policy = "frozen"
    log_dir = _beside(args.out)
    print(f"SG-MFT features: the frozen {cfg.model.backbone.preset} Chinese-CLIP backbone on {_show(args.data)}, "
          f"{args.concurrency} replica{'s' if args.concurrency != 1 else ''}", flush=True)
    _where("feature cache", args.out, log_dir, args.verbose)
    with _ray(args, log_dir) as console, _progress(console):
        manifest = cache_features(cfg, args.data, args.out, concurrency=args.concurrency, num_gpus=args.num_gpus,
                                  overwrite=args.overwrite)
    print(json.dumps(manifest, indent=2))


def cmd_ablate(args: argparse.Namespace) -> None:
    from sgmft.ablate import DEFAULT_SEEDS, TABLE_ORDER, ablate, trained_variants
    from sgmft.runs import run_dir

    cfg = config_from_args(args)
    directory = run_dir(cfg)
    variants, seeds = args.variants or list(TABLE_ORDER), args.seeds or list(DEFAULT_SEEDS)
    trained = trained_variants(variants)  # late_fusion is computed from text_only and image_only, not trained
    print(f"SG-MFT ablation: {len(variants)} variants, {len(trained)} trained x {len(seeds)} seeds as a Ray Tune grid, "
          f"{cfg.train.epochs} epochs each, {_data(cfg)}, on {_cluster()}", flush=True)
    _where("directory", directory, directory / "logs", args.verbose)
    with _ray(args, directory / "logs") as console, _progress(console, per_run=False):
        outcome = ablate(cfg, variants=variants, seeds=seeds)
    print(outcome.markdown)
    print(f"written: {_show(outcome.directory / 'ablation.md')}, {_show(outcome.directory / 'ablation.json')}")


def register(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="synthetic data -> distributed training -> evaluation, on local Ray")
    add_config_args(demo)
    add_verbose_arg(demo)
    demo.set_defaults(func=cmd_demo)

    train = commands.add_parser("train", help="train SG-MFT with Ray Train (joins RAY_ADDRESS or starts local Ray)")
    add_config_args(train)
    add_verbose_arg(train)
    train.set_defaults(func=cmd_train)

    tune = commands.add_parser("tune", help="hyper-parameter search with Ray Tune (ASHA); resumes a run of the same name")
    add_config_args(tune)
    add_verbose_arg(tune)
    tune.add_argument("--fresh", action="store_true", help="start over instead of resuming train.run_name")
    tune.set_defaults(func=cmd_tune)

    features = commands.add_parser("features", help="backbone feature cache").add_subparsers(dest="features_command", required=True)
    cache = features.add_parser("cache", help="compute frozen-backbone features once with Ray Data")
    cache.add_argument("--model-config", dest="config", help="YAML config whose model.backbone is cached")
    cache.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    cache.add_argument("--data", required=True, help="dataset directory")
    cache.add_argument("--out", required=True, help="feature cache directory")
    cache.add_argument("--concurrency", type=int, default=1)
    cache.add_argument("--num-gpus", type=float, default=0.0)
    cache.add_argument("--overwrite", action="store_true")
    add_verbose_arg(cache)
    cache.set_defaults(func=cmd_features_cache)

    ablate = commands.add_parser("ablate", help="the ablation table: variants x seeds as a Ray Tune grid")
    add_config_args(ablate)
    add_verbose_arg(ablate)
    ablate.add_argument("--variants", nargs="+", help="subset of variants (default: all; late_fusion trains text_only "
                        "and image_only)")
    ablate.add_argument("--seeds", nargs="+", type=int, help="seeds (default: 0 1 2 3 4)")
    ablate.set_defaults(func=cmd_ablate)

    evaluate = commands.add_parser("evaluate", help="metrics and confusion matrix of a model on a labelled split")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--out", help="where to write (default: the model directory)")
    add_verbose_arg(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    predict = commands.add_parser("predict", help="predict one post, or a Parquet set with Ray Data")
    predict.add_argument("--model", required=True)
    predict.add_argument("--text")
    predict.add_argument("--image")
    predict.add_argument("--top-k", type=int, default=3)
    predict.add_argument("--data")
    predict.add_argument("--split")
    predict.add_argument("--out")
    predict.add_argument("--concurrency", type=int, default=1)
    predict.add_argument("--batch-size", type=int, default=64)
    predict.add_argument("--num-gpus", type=float, default=0.0)
    add_verbose_arg(predict)
    predict.set_defaults(func=cmd_predict)
