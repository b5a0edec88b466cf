"""The results table: one line per saved result, with the machine and commit it was measured on.

    python -m benchmarks.report            print the table
    python -m benchmarks.report --write    and write it to results/SUMMARY.md and README.md

Reads ``benchmarks/results/*.json`` only (nothing is run). Each row names the machine of its
own result file, and the commit it was measured at: the ``commit`` a result file records
(:func:`benchmarks.common.machine` writes it), or else the commit that last wrote the file.
A row whose code (``sgmft/``, ``serve_app/``, its benchmark module) has changed since that
commit says so: its figure is then that commit's, not the code's of today.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parents[1]
README_BEGIN, README_END = "<!-- results table: benchmarks/report.py --write -->", "<!-- end of results table -->"
ABLATION_BEGIN, ABLATION_END = "<!-- ablation table: benchmarks/report.py --write -->", "<!-- end of ablation table -->"
ABLATION_RUNS = ("ablation_random", "ablation_pretrained", "ablation_backbones")
"""The two ablation runs (random-init and pretrained backbone) and their comparison."""
SUMMARIES = ("summary.json", "serve_load_proxies.json")
"""Result files that gather others (each of their figures has its own row) and get none."""


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _head_cost(r: dict) -> str:
    shares = {p: v["head_flops_share"] for p, v in r.items() if isinstance(v, dict) and "head_flops_share" in v}
    return "head's share of forward FLOPs: " + ", ".join(f"{p} {_pct(s)}" for p, s in shares.items())


def _ingest(r: dict) -> str:
    return (f"Ray Data **{r['speedup']:.2f}x** a one-process loop end to end, {r['speedup_after_first_batch']:.2f}x "
            f"after the first batch (goal {r['goal']}x)")


def _train_throughput(r: dict) -> str:
    return (f"Ray Train **{r['ratio']:.2f}x** a plain loop ({r['ray_train_samples_per_s']:.1f} vs "
            f"{r['plain_loop_samples_per_s']:.1f} samples/s), data wait {_pct(r['ray_data_wait_share'])} (goal 0.9x, < 10%)")


def _tune_cache(r: dict) -> str:
    one, search, bound = r["one_trial"], r["search_8_trials"], r["compute_bound"]
    ratio = search["end_to_end"]["wall_s"] / search["cached"]["wall_s"]
    return (f"cached trial **{r['speedup']:.2f}x** end to end ({one['end_to_end']['mean_trial_s']:.1f} vs "
            f"{one['cached']['mean_trial_s']:.1f} s), 8-trial search {ratio:.2f}x; compute bound "
            f"{bound['epoch_flop_ratio']:.1f}x by FLOPs, {bound['epoch_compute_ratio']:.1f}x at measured rates (goal 5x)")


def _serve_load(r: dict) -> str:
    def app(suffix: str) -> str:
        return (f"+{r[f'overhead_p50_ms_c1{suffix}']:.1f} ms p50 at 1 client, "
                f"{r[f'serve_c32_vs_inprocess_one_thread{suffix}']:.2f}x one-thread in-process posts/s at 32 clients, "
                f"{r[f'cpu_c32_vs_inprocess{suffix}']:.2f}x its CPU a post, {r[f'serve_c512_vs_c32{suffix}']:.2f}x the "
                f"32-client posts/s at 512 (p99 {r[f'serve_c512_p99_ms{suffix}'] / 1000:.1f} s{refusals(suffix)})")

    def refusals(suffix: str) -> str:
        refusal = r.get(f"serve_c512_refusal_p99_ms{suffix}")
        return f", 503s p99 {refusal / 1000:.2f} s" if refusal is not None else ""

    apps = [app("")] + ([f"model in the ingress: {app('_colocated')}"] if "overhead_p50_ms_c1_colocated" in r else [])
    return "; ".join(apps) + " (goal <= 10 ms, 1.5x, <= 1.5x, >= 0.9x with p99 < 2 s)"


def _gpu_check(r: dict) -> str:
    step, inference = r["train_step"], r["inference"]
    return (f"bf16 train step {step['samples_per_s']:.0f} samples/s (batch {step['batch']}, "
            f"{step['max_memory_gib']:.1f} GiB); inference {inference['posts_per_s']:,.0f} posts/s at batch {inference['batch']}")


def _gpu_train(r: dict) -> str:
    def policy(name: str, v: dict) -> str:
        ratios = v.get("steady_ratio_to_bare_step") or v.get("ratio_to_bare_step", [])
        accuracy = " / ".join(f"{e['val_accuracy']:.2f}" for e in v["epochs"])
        learned = v.get("learned", v["epochs"][-1]["val_accuracy"] >= 0.3)
        return (f"{name}: val accuracy {accuracy} ({'learned' if learned else '**did not learn**'}), epochs at "
                + " / ".join(f"{x:.2f}" for x in ratios) + f"x the bare step, data wait <= {_pct(v['max_data_wait_share'])}, "
                f"resumed after a crash: {v['resumed_after_crash']}")
    return "; ".join(policy(name, v) for name, v in r["policies"].items())


def _gpu_serve(r: dict) -> str:
    def app(mode: str) -> str:
        by_c = {p["concurrency"]: p for p in r["points"] if p["mode"] == mode}
        top = by_c[max(by_c)]
        return (f"{mode}: **{top['posts_per_s']:,.0f}** posts/s at {max(by_c)} clients (p99 {top['p99_ms']:,.0f} ms), "
                f"p50 {by_c[min(by_c)]['p50_ms']:.1f} ms at {min(by_c)}")
    modes = dict.fromkeys(p["mode"] for p in r["points"] if not p["mode"].startswith("inprocess"))
    return "; ".join(app(mode) for mode in modes) + " (goal 2,000 posts/s at 512, p99 < 1 s, p50 < 15 ms at 1)"


def _model_replica_profile(r: dict) -> str:
    def size(n: str, v: dict) -> str:
        jpegs = v["jpegs"]
        return (f"{n} JPEG posts a run {jpegs['whole_run']['wall_ms']:.1f} ms (forward {jpegs['forward']['wall_ms']:.1f}, "
                f"decode to the device {jpegs['images_to_device']['wall_ms']:.1f})")
    return f"{r['preset']}: " + "; ".join(size(n, v) for n, v in r["by_batch"].items())


def _learning(r: dict) -> str:
    last = r["epochs"][-1]
    if "top1_matches" in r:  # contrastive pretraining
        m = r["top1_matches"]
        return (f"{r['preset']} pretraining: recall@1 {last['val_t2i_r@1']:.3f} text->image, {last['val_i2t_r@1']:.3f} "
                f"image->text over {r['held_out']} held-out pairs (chance {r['chance_recall@1']:.4f}, goal 0.5); top-1 "
                f"has the text's colours {_pct(m['colours'])}, shapes {_pct(m['shapes'])}")
    return (f"{r['preset']} ({r['policy']} backbone, lr {r['lr']:g}): val accuracy "
            + " / ".join(f"{e['val_accuracy']:.2f}" for e in r["epochs"])
            + f", test {r['test_accuracy']:.3f} (chance {r['chance']:.3f}): {'learned' if r['learned'] else '**did not learn**'}")


def _pretrain_throughput(r: dict) -> str:
    g = r["gather"]
    share = "not measured (one rank)" if g["all_gather_share"] is None else f"{_pct(g['all_gather_share'])} of a step"
    ranks = g.get("ranks", 2)
    figure = (f"{g['preset']} step {g['samples_per_s_gathered']:.0f} samples/s on {ranks} rank{'s' * (ranks != 1)} "
              f"({g.get('backend', 'gloo')}); the all-gather {share}")
    if "ray" in r:
        figure += f"; `sgmft pretrain` {r['ray']['epochs'][-1]['steady_samples_per_s']:.0f} samples/s"
    return figure


def _ablation(r: dict) -> str:
    rows = {s["variant"]: s for s in r["summary"]}
    full, best = rows["full"], max(r["summary"], key=lambda s: s["test_accuracy"]["mean"])
    return (f"full {_pct(full['test_accuracy']['mean'])} test accuracy over {len(full['seeds'])} seeds on "
            f"{r['test_posts']} posts; best {best['variant']} {_pct(best['test_accuracy']['mean'])}")


def _interval(d: dict | None, unit: str = "") -> str:
    """An accuracy difference with its bootstrap interval, in points (– where there is none)."""
    return f"{100 * d['diff']:+.1f}{unit} [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]" if d else "–"


def _ablation_backbones(r: dict) -> str:
    full = next(row for row in r["rows"] if row["variant"] == "full")
    return (f"full on the {r['mine']} backbone vs {r['other']}: {_interval(full['overall'], ' points')} overall, "
            f"{_interval(full['cross_modal'], ' points')} cross-modal")


HEADLINES: dict[str, Callable[[dict], str]] = {
    "head_cost": _head_cost, "ingest": _ingest, "train_throughput": _train_throughput, "tune_cache": _tune_cache,
    "serve_load": _serve_load, "gpu_check": _gpu_check, "gpu_train": _gpu_train, "ablation": _ablation,
    "ablation_backbones": _ablation_backbones,
    "learning": _learning, "pretrain_throughput": _pretrain_throughput, "gpu_pretrain_throughput": _pretrain_throughput,
    "gpu_serve": _gpu_serve, "gpu_model_replica_profile": _model_replica_profile,
    "model_replica_profile": _model_replica_profile,
}


def _family(name: str) -> str | None:
    """The benchmark a result file is of: ``serve_load_haproxy`` is a run of ``serve_load``."""
    return next((key for key in sorted(HEADLINES, key=len, reverse=True) if name.startswith(key)), None)


def headline(name: str, result: dict) -> str:
    """The figure a result file stands for, in one line."""
    if "error" in result or "skipped" in result:
        return result.get("skipped") or f"error: {result['error']}"
    family = _family(name)
    try:
        return HEADLINES[family](result) if family else "(no headline for this file)"
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        return f"(result file lacks {exc})"


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()


def _code_paths(name: str) -> list[str]:
    module = f"benchmarks/{_family(name)}.py"
    return ["sgmft", "serve_app"] + ([module] if (REPO / module).is_file() else [])


def _machine(result: dict) -> str:
    m = result.get("machine") or {}
    cpus = m.get("cpu_count") or m.get("cores")
    gpu = m.get("gpu") or result.get("gpu")
    return (f"{gpu}, " if gpu else "") + (f"{cpus} CPUs" if cpus else "not recorded")


def row(path: Path) -> dict[str, Any]:
    """One result file's line: what, the figure, the machine, the commit and whether code changed since."""
    result = json.loads(path.read_text())
    commit = (result.get("machine") or {}).get("commit") or _git("log", "-1", "--format=%h", "--", str(path))
    base = commit.removesuffix("-dirty") if commit else ""  # -dirty: measured with uncommitted changes to that code
    since = int(_git("rev-list", "--count", f"{base}..HEAD", "--", *_code_paths(path.stem)) or 0) if base else 0
    date = (result.get("machine") or {}).get("date") or _git("log", "-1", "--format=%ad", "--date=short", "--", str(path))
    return {"benchmark": path.stem, "figure": headline(path.stem, result), "machine": _machine(result),
            "commit": commit or "not committed", "date": str(date)[:10], "code_changed_since": since}


def table(results: Path = RESULTS) -> str:
    lines = ["| benchmark | measured | machine | commit, date | code |", "|---|---|---|---|---|"]
    for path in sorted(results.glob("*.json")):
        if path.name in SUMMARIES:
            continue
        r = row(path)
        since = "**changed since**" if r["code_changed_since"] else "unchanged"
        lines.append(f"| `{r['benchmark']}` | {r['figure']} | {r['machine']} | {r['commit']}, {r['date']} | {since} |")
    return "\n".join(lines) + "\n"


def ablation_table(results: Path = RESULTS) -> str | None:
    """The ablation on both backbones, one row a variant (None without the three result files)."""
    if not all((results / f"{name}.json").is_file() for name in ABLATION_RUNS):
        return None
    random_init, pretrained, backbones = (json.loads((results / f"{name}.json").read_text()) for name in ABLATION_RUNS)
    if (backbones["mine"], backbones["other"]) != ("pretrained", "random"):
        raise SystemExit(f"ablation_backbones compares {backbones['mine']} with {backbones['other']}, not pretrained with random")
    summary = {run: {s["variant"]: s for s in r["summary"]} for run, r in (("random", random_init), ("pretrained", pretrained))}
    between = {row["variant"]: row["cross_modal"] for row in backbones["rows"]}

    def accuracy(s: dict) -> str:
        return " / ".join(f"{100 * s[k]['mean']:.1f} ± {100 * s[k]['std']:.1f}" for k in ("test_accuracy", "cross_modal_accuracy"))

    lines = ["| variant | random-init: test / cross-modal | pretrained: test / cross-modal | "
             "pretrained, cross-modal vs full | cross-modal, pretrained vs random-init |", "|---|---|---|---|---|"]
    for variant, s in summary["pretrained"].items():
        lines.append(f"| {variant} | {accuracy(summary['random'][variant])} | {accuracy(s)} | "
                     f"{_interval((s.get('vs_full') or {}).get('cross_modal'))} | {_interval(between.get(variant))} |")
    posts = pretrained["test_posts"], pretrained["cross_modal_posts"], len(pretrained["seeds"])
    return ("\n".join(lines) + f"\n\nAccuracy in % on {posts[0]} synthetic test posts ({posts[1]} cross-modal), mean ± "
            f"std over {posts[2]} seeds; differences in points with a paired bootstrap 95% interval.\n")


def _replace_block(body: str, begin: str, end: str, text: str) -> str:
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(body):
        raise SystemExit(f"README.md has no markers {begin} ... {end}")
    return pattern.sub(lambda _: f"{begin}\n{text}{end}", body)


def write(text: str, results: Path = RESULTS, readme: Path = REPO / "README.md") -> None:
    """SUMMARY.md, the README's table between its two markers, and its ablation table where
    the ablation's results are there."""
    (results / "SUMMARY.md").write_text("# Benchmark results\n\nWritten by `python -m benchmarks.report --write` from "
                                        "`benchmarks/results/*.json`; each row names its own machine and commit.\n\n" + text)
    body = _replace_block(readme.read_text(), README_BEGIN, README_END, text)
    ablation = ablation_table(results)
    if ablation is not None:
        body = _replace_block(body, ABLATION_BEGIN, ABLATION_END, ablation)
    readme.write_text(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="write results/SUMMARY.md and the README's table")
    text = table()
    print(text, end="")
    if parser.parse_args().write:
        write(text)


if __name__ == "__main__":
    main()
