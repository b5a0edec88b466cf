"""``sgmft data synth | build | inspect | validate``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sgmft.config import SynthConfig


def _summary(report: dict[str, Any], out: str) -> str:
    splits = ", ".join(f"{k} {v}" for k, v in report["splits"].items())
    line = f"wrote {out}: {report['kept']} posts ({splits}), {len(report['labels'])} labels"
    if report["quarantined"]:
        reasons = ", ".join(f"{k} {v}" for k, v in report["quarantine_reasons"].items())
        line += f"\nquarantined {report['quarantined']} of {report['read']} rows ({reasons}): see {Path(out) / 'quarantine.jsonl'}"
    return line


def _synth(args: argparse.Namespace) -> None:
    from sgmft.data.synth import synthesize

    labels = _labels_arg(args.labels)
    report = synthesize(args.out, n=args.n, seed=args.seed, text_noise=args.text_noise, image_noise=args.image_noise,
                        image_swap=args.image_swap, image_size=args.image_size, two_object_share=args.two_object_share,
                        misleading_share=args.misleading_share, val_frac=args.val_frac, test_frac=args.test_frac,
                        **({"labels": labels} if labels else {}), overwrite=args.overwrite)
    print(_summary(report, args.out))
    realized = ", ".join(f"{k} {v:.3f}" for k, v in report["realized_noise"].items())
    print(f"noise: {realized}; chatter from {report['noise_text']['source']}")


def _build(args: argparse.Namespace) -> None:
    from sgmft.data.build import build_dataset

    kind, source = ("manifest", args.manifest) if args.manifest else ("weibo", args.weibo)
    report = build_dataset(source, args.out, kind, image_root=args.images, label_source=args.label_source,
                           labels=_labels_arg(args.labels), seed=args.seed, val_frac=args.val_frac,
                           test_frac=args.test_frac, rows_per_shard=args.rows_per_shard,
                           max_image_pixels=args.max_image_pixels, unlabeled=args.unlabeled, pairs=args.pairs,
                           overwrite=args.overwrite)
    print(_summary(report, args.out))
    if report["ignored_fields"]:
        print("ignored manifest fields (not text/image/label/post_id/split/meta_*): "
              + ", ".join(f"{k} ({v} rows)" for k, v in report["ignored_fields"].items()))


def _inspect(args: argparse.Namespace) -> None:
    from sgmft.data.inspect import format_inspection, inspect_dataset, plot_label_histogram

    info = inspect_dataset(args.dir)
    print(json.dumps(info, ensure_ascii=False, indent=2) if args.json else format_inspection(info))
    if args.plot:
        plot_label_histogram(info, args.plot)
        print(f"label histogram written to {args.plot}")


def _validate(args: argparse.Namespace) -> None:
    from sgmft.data.schema import available_splits, validate_dataset

    validate_dataset(args.dir)
    print(f"{args.dir}: valid ({', '.join(available_splits(args.dir))})")


def _labels_arg(value: str | None) -> list[str] | None:
    """``--labels a,b,c`` or ``--labels FILE.json`` (a JSON list)."""
    if not value:
        return None
    if value.endswith(".json"):
        path = Path(value)
        if not path.is_file():
            raise FileNotFoundError(f"labels file {path} does not exist")
        return json.loads(path.read_text(encoding="utf-8"))
    return [x.strip() for x in value.split(",") if x.strip()]


def register(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="synthesise, build, inspect and validate datasets")
    sub = data.add_subparsers(dest="data_command", required=True)
    defaults = SynthConfig()

    synth = sub.add_parser("synth", help="write the deterministic synthetic Weibo-like dataset")
    synth.add_argument("--out", required=True, help="output dataset directory")
    synth.add_argument("--n", type=int, default=defaults.n, help="number of posts")
    synth.add_argument("--seed", type=int, default=defaults.seed)
    synth.add_argument("--text-noise", type=float, default=defaults.text_noise, help="share of posts whose text has no location cue")
    synth.add_argument("--image-noise", type=float, default=defaults.image_noise, help="share of posts whose image has no cue")
    synth.add_argument("--image-swap", type=float, default=defaults.image_swap, help="share of posts with another category's image")
    synth.add_argument("--image-size", type=int, default=defaults.image_size, help="side of the drawn images in pixels")
    synth.add_argument("--two-object-share", type=float, default=defaults.two_object_share,
                       help="share of posts with two category pictures and a text that says which one counts")
    synth.add_argument("--misleading-share", type=float, default=defaults.misleading_share,
                       help="share of posts whose text names another category's place as where the poster is not")
    synth.add_argument("--val-frac", type=float, default=0.1, help="share of posts in the val split")
    synth.add_argument("--test-frac", type=float, default=0.1, help="share of posts in the test split")
    synth.add_argument("--labels", help="comma-separated labels or a JSON list file (default: the 10 location labels)")
    synth.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    synth.set_defaults(func=_synth)

    build = sub.add_parser("build", help="build a dataset from a manifest or Weibo dump files")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="JSONL/JSON/CSV/TSV with text, image, label[, post_id, split, meta_*]")
    source.add_argument("--weibo", nargs="+", metavar="FILE", help="Weibo dump files (three lines per post)")
    build.add_argument("--out", required=True, help="output dataset directory")
    build.add_argument("--images", help="image folder (Weibo) or base of relative manifest image paths")
    build.add_argument("--label-source", help="post id -> label mapping for --weibo (CSV post_id,label or JSON)")
    build.add_argument("--labels", help="label order: comma-separated or a JSON list file (default: sorted found)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--val-frac", type=float, default=0.1)
    build.add_argument("--test-frac", type=float, default=0.1)
    build.add_argument("--rows-per-shard", type=int, default=256)
    build.add_argument("--max-image-pixels", type=int, default=40_000_000)
    build.add_argument("--unlabeled", action="store_true", help="a prediction set: labels optional, rows go to test")
    build.add_argument("--pairs", action="store_true", help="image-text pairs for sgmft pretrain: no labels, split at random")
    build.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    build.set_defaults(func=_build)

    inspect = sub.add_parser("inspect", help="counts, size distributions and quarantine of a dataset")
    inspect.add_argument("dir")
    inspect.add_argument("--plot", metavar="PNG", help="also write a label histogram")
    inspect.add_argument("--json", action="store_true", help="print the full result as JSON")
    inspect.set_defaults(func=_inspect)

    validate = sub.add_parser("validate", help="check a dataset directory's layout, schema, ids and labels")
    validate.add_argument("dir")
    validate.set_defaults(func=_validate)
