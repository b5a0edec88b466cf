"""CLI commands that run the pipeline: demo, train, evaluate, predict, features, tune, ablate."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sgmft.cli import add_config_args, config_from_args


def _connect() -> None:
    from sgmft.local_ray import connect

    connect()


def format_history(history: list[dict]) -> str:
    lines = [f"{'epoch':>5} {'train loss':>10} {'val acc':>8} {'val F1':>8} {'samples/s':>10} {'data wait':>9}"]
    for h in history:
        lines.append(f"{h['epoch']:>5} {h['train_loss']:>10.4f} {h['val_accuracy']:>8.3f} {h['val_macro_f1']:>8.3f} "
                     f"{h['samples_per_s']:>10.1f} {h['data_wait_share']:>9.1%}")
    return "\n".join(lines)


def _print_outcome(outcome, num_labels: int) -> None:
    print("\n" + format_history(outcome.history))
    print(f"\nbest epoch {outcome.best['epoch']}: val accuracy {outcome.best['val_accuracy']:.3f}, "
          f"macro-F1 {outcome.best['val_macro_f1']:.3f}")
    if outcome.test:
        print(f"test: accuracy {outcome.test['accuracy']:.3f}, macro-F1 {outcome.test['macro_f1']:.3f} "
              f"on {outcome.test['num_examples']} posts (chance {1 / num_labels:.3f})")
    print(f"model directory: {outcome.model_dir}")


def cmd_train(args: argparse.Namespace) -> None:
    from sgmft.train import train

    cfg = config_from_args(args)
    _connect()
    outcome = train(cfg)
    _print_outcome(outcome, cfg.model.num_labels)


def cmd_demo(args: argparse.Namespace) -> None:
    """Synthetic data -> 2-worker training of the tiny model on local Ray -> test evaluation."""
    from sgmft.train import train

    if not args.config:
        args.overrides = ["train.run_name=demo", *args.overrides]
    cfg = config_from_args(args)
    print(f"SG-MFT demo: {cfg.data.synth.n} synthetic Weibo-like posts, {cfg.model.backbone.preset} Chinese-CLIP, "
          f"{cfg.train.num_workers} Ray Train workers, {cfg.train.epochs} epochs", flush=True)
    _connect()
    outcome = train(cfg)
    _print_outcome(outcome, cfg.model.num_labels)
    print(f"\nnext: sgmft serve --model {outcome.model_dir}   |   sgmft evaluate --model {outcome.model_dir} "
          f"--data {outcome.dataset_dir}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from sgmft.evaluate import evaluate

    _connect()
    report = evaluate(args.model, args.data, split=args.split, out_dir=args.out)
    failed = f", {report['failed']} failed to decode" if report["failed"] else ""
    print(f"{args.split}: accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f} on {report['num_examples']} posts{failed}")
    width = max(len(label) for label in report["labels"])
    print(f"{'label':<{width}} {'precision':>9} {'recall':>7} {'F1':>6} {'support':>7}")
    for label, m in report["per_class"].items():
        print(f"{label:<{width}} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['f1']:>6.3f} {m['support']:>7}")
    written = Path(args.out or args.model) / f"eval-{args.split}.json"
    print(f"written: {written} and confusion-{args.split}.png")


def cmd_predict(args: argparse.Namespace) -> None:
    if args.text is not None or args.image is not None:
        from sgmft.predict import Predictor

        if args.image is None:
            raise ValueError("--image FILE is required with --text")
        image = Path(args.image)
        if not image.is_file():
            raise FileNotFoundError(f"image {image} does not exist")
        result = Predictor(args.model).predict_post(args.text or "", image.read_bytes(), top_k=args.top_k)
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return
    if not (args.data and args.out):
        raise ValueError("give --data DIR --out DIR for batch prediction, or --text/--image for one post")
    from sgmft.predict import predict_dataset

    _connect()
    report = predict_dataset(args.model, args.data, args.out, split=args.split, concurrency=args.concurrency,
                             batch_size=args.batch_size, num_gpus=args.num_gpus)
    print(json.dumps(report))


def cmd_tune(args: argparse.Namespace) -> None:
    from sgmft.tune import tune

    cfg = config_from_args(args)
    _connect()
    outcome = tune(cfg, resume=not args.fresh)
    print((outcome.experiment_dir / "trials.md").read_text())
    print(f"best: {cfg.train.metric} {outcome.best_metrics[cfg.train.metric]:.4f} at epoch {outcome.best_metrics['epoch']}")
    print(f"best model directory: {outcome.model_dir}\nall trials: {outcome.experiment_dir / 'trials.csv'}, plot: {outcome.experiment_dir / 'trials.png'}")


def cmd_features_cache(args: argparse.Namespace) -> None:
    from sgmft.features import cache_features

    cfg = config_from_args(args)
    cfg.model.backbone.policy = "frozen"
    _connect()
    manifest = cache_features(cfg, args.data, args.out, concurrency=args.concurrency, num_gpus=args.num_gpus,
                              overwrite=args.overwrite)
    print(json.dumps(manifest, indent=2))


def cmd_ablate(args: argparse.Namespace) -> None:
    from sgmft.ablate import ablate

    cfg = config_from_args(args)
    _connect()
    outcome = ablate(cfg, variants=args.variants, seeds=args.seeds)
    print(outcome.markdown)
    print(f"written: {outcome.directory / 'ablation.md'}")


def register(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="synthetic data -> distributed training -> evaluation, on local Ray")
    add_config_args(demo)
    demo.set_defaults(func=cmd_demo)

    train = commands.add_parser("train", help="train SG-MFT with Ray Train (joins RAY_ADDRESS or starts local Ray)")
    add_config_args(train)
    train.set_defaults(func=cmd_train)

    tune = commands.add_parser("tune", help="hyper-parameter search with Ray Tune (ASHA); resumes a run of the same name")
    add_config_args(tune)
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
    cache.set_defaults(func=cmd_features_cache)

    ablate = commands.add_parser("ablate", help="the ablation table: variants x seeds as a Ray Tune grid")
    add_config_args(ablate)
    ablate.add_argument("--variants", nargs="+", help="subset of variants (default: all)")
    ablate.add_argument("--seeds", nargs="+", type=int, help="seeds (default: 0 1 2)")
    ablate.set_defaults(func=cmd_ablate)

    evaluate = commands.add_parser("evaluate", help="metrics and confusion matrix of a model on a labelled split")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--out", help="where to write (default: the model directory)")
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
    predict.set_defaults(func=cmd_predict)
