"""Batch prediction over a Parquet set on Ray Data.

``predict_dataset`` runs :class:`sgmft.inference.InferenceRunner` in a Ray Data actor
pool (:func:`sgmft.inference.predictions`, which evaluation reads too) and writes every
input row out, failed rows with their error, so the row counts reconcile.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sgmft.commands import (add_verbose_arg, check_inputs, log_dir_beside, print_where, progress_bars, ray_for_command,
                            show_path)
from sgmft.config import PREDICT_BATCH_SIZE
from sgmft.inference import predictions


def predict_dataset(model_dir: str | Path, data: str | Path, out_dir: str | Path, split: str | None = None,
                    **kwargs: Any) -> dict[str, Any]:
    """Write predictions as Parquet under ``out_dir``; returns the reconciled counts."""
    import pyarrow.parquet as pq

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"output directory {out_dir} is not empty; choose a new one")
    ds, posts = predictions(model_dir, data, split, **kwargs)
    read = posts.count()
    ds.write_parquet(str(out_dir))
    table = pq.read_table(out_dir, columns=["error"])
    errors = [e for e in table.column("error").to_pylist() if e]
    report = {"read": read, "written": table.num_rows, "predicted": table.num_rows - len(errors), "failed": len(errors)}
    if report["written"] != read:
        raise RuntimeError(f"row counts do not reconcile: read {read}, wrote {report['written']}")
    (out_dir / "_report.json").write_text(json.dumps(report, indent=2))
    return report


# --- the command line ----------------------------------------------------------------------

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

    check_inputs(args.model, args.data)
    log_dir = log_dir_beside(args.out)
    print(f"SG-MFT predict: {show_path(args.model)} on {show_path(args.data)}{f' ({args.split} split)' if args.split else ''}, "
          f"{args.concurrency} model replica{'s' if args.concurrency != 1 else ''}", flush=True)
    print_where("predictions to", args.out, log_dir, args.verbose)
    with ray_for_command(args, log_dir) as console, progress_bars(console):
        report = predict_dataset(args.model, args.data, args.out, split=args.split, concurrency=args.concurrency,
                                 batch_size=args.batch_size, num_gpus=args.num_gpus)
    print(json.dumps(report))


def add_commands(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("predict", help="predict one post, or a Parquet set with Ray Data")
    parser.add_argument("--model", required=True)
    parser.add_argument("--text")
    parser.add_argument("--image")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--data")
    parser.add_argument("--split")
    parser.add_argument("--out")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=PREDICT_BATCH_SIZE)
    parser.add_argument("--num-gpus", type=float, default=0.0)
    add_verbose_arg(parser)
    parser.set_defaults(func=cmd_predict)
