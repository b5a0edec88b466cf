"""Run every benchmark, then write the results table (results/SUMMARY.md and the README's).

    python -m benchmarks.run_all [--quick] [--only ingest train_throughput ...]
    python -m benchmarks.report [--write]      the table from the results already saved

Each benchmark measures its comparison side by side in one run and reports a ratio.
The GPU check runs only where a CUDA GPU is present.
"""

from __future__ import annotations

import argparse
import importlib
import json
import traceback

from benchmarks import report
from benchmarks.common import RESULTS, machine

BENCHMARKS = ("head_cost", "ingest", "train_throughput", "tune_cache", "pretrain_throughput", "serve_load", "gpu_check", "gpu_train")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS)
    args = parser.parse_args()
    import torch

    summary = {"machine": machine(), "results": {}}
    for name in args.only or BENCHMARKS:
        if name.startswith("gpu_") and not torch.cuda.is_available():
            summary["results"][name] = {"skipped": "no CUDA GPU on this machine"}
            continue
        print(f"== {name}", flush=True)
        try:
            summary["results"][name] = importlib.import_module(f"benchmarks.{name}").run(args.quick)
        except Exception as exc:  # one failing benchmark must not hide the others' figures
            traceback.print_exc()
            summary["results"][name] = {"error": repr(exc)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    text = report.table()  # every saved result, this run's and earlier ones, each with its machine and commit
    report.write(text)
    print(text)


if __name__ == "__main__":
    main()
