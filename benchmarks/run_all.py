"""Run every benchmark and write results/summary.json + results/SUMMARY.md.

    python -m benchmarks.run_all [--quick] [--only ingest train_throughput ...]

Each benchmark measures its comparison side by side in one run and reports a ratio.
The GPU check runs only where a CUDA GPU is present.
"""

from __future__ import annotations

import argparse
import importlib
import json
import traceback

from benchmarks.common import RESULTS, machine

BENCHMARKS = ("head_cost", "ingest", "train_throughput", "tune_cache", "serve_load", "gpu_check", "gpu_train")


def headline(name: str, r: dict) -> str:
    if name == "head_cost":
        return "; ".join(f"{p}: head {v['head_flops_share']:.1%} of forward FLOPs" for p, v in r.items() if isinstance(v, dict) and "head_flops_share" in v)
    keys = {"ingest": "speedup", "train_throughput": "ratio", "tune_cache": "speedup"}
    if name == "serve_load":
        return ", ".join(f"{k} {v:.2f}" for k, v in r.items() if k.startswith(("overhead_p50_ms_c1", "serve_c32_vs")))
    if name in keys and keys[name] in r:
        return f"{keys[name]} {r[keys[name]]:.2f}x"
    if name == "gpu_check" and "inference" in r:
        return f"{r['gpu']}: {r['inference']['posts_per_s']:.0f} posts/s at batch 256 (bf16)"
    if name == "gpu_train" and "policies" in r:
        return "; ".join(f"{r['gpu']} {p}: x bare step by epoch " + " / ".join(f"{x:.2f}" for x in v.get("ratio_to_bare_step", []))
                         + f", max data wait {v['max_data_wait_share']:.1%}, resumed {v['resumed_after_crash']}"
                         for p, v in r["policies"].items())
    return ", ".join(f"{k}={v}" for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool))[:200]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS)
    parser.add_argument("--summarize-only", action="store_true",
                        help="rebuild the summary from the results already saved, running nothing")
    args = parser.parse_args()
    import torch

    summary = {"machine": machine(), "results": {}}
    for name in args.only or BENCHMARKS:
        if args.summarize_only:
            saved = RESULTS / f"{name}.json"
            summary["results"][name] = json.loads(saved.read_text()) if saved.is_file() else {"skipped": "no saved result"}
            continue
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
    m = summary["results"].get("train_throughput", {}).get("machine", summary["machine"]) if args.summarize_only else summary["machine"]
    lines = ["# Benchmark summary\n", f"{m['date']} on {m['cpu_count']} CPUs ({m['processor']}), GPU: {m['gpu']}, "
             f"Python {m['python']}, torch {m['torch']}, Ray {m['ray']}\n", "| benchmark | headline |", "|---|---|"]
    for name, r in summary["results"].items():
        text = r.get("skipped") or (f"error: {r['error']}" if "error" in r else headline(name, r))
        lines.append(f"| {name} | {text} |")
    (RESULTS / "SUMMARY.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
