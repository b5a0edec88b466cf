"""The ablation on two backbones side by side: what pretraining the backbone changes, variant
by variant.

    python -m benchmarks.ablation_compare pretrained=runs/ablate-pretrained random=runs/ablate-random

Each argument names an ``sgmft ablate`` run directory made on the same dataset and seeds.
Nothing is trained: each run's ``ablation-predictions.npz`` holds every trial's test
probabilities. For every variant (late fusion rebuilt from its two parts), the first run
against the second: the accuracy difference with :func:`sgmft.ablate.paired_bootstrap`'s 95%
interval, paired by test post and seed, overall, on the cross-modal posts and on each
cross-modal case. Writes ``results/ablation_<name>.json`` per run (its ``ablation.json`` with
the machine and commit) and ``results/ablation_backbones.json``, and prints the table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import save
from sgmft.ablate import (CROSS_MODAL_CASES, TABLE_ORDER, Predictions, add_late_fusion, cross_modal, load_predictions,
                          paired_bootstrap)


def compare(mine: dict[tuple[str, int], Predictions], other: dict[tuple[str, int], Predictions]) -> list[dict[str, Any]]:
    """Per variant: ``mine`` against ``other`` over the seeds both ran, on the same posts."""
    rows = []
    for variant in [v for v in TABLE_ORDER if any(k[0] == v for k in mine)]:
        seeds = sorted(s for v, s in mine if v == variant and (v, s) in other)
        if not seeds:
            continue
        first, second = mine[variant, seeds[0]], other[variant, seeds[0]]
        if not np.array_equal(first.post_ids, second.post_ids):
            raise ValueError(f"{variant}: the two runs predicted different test posts; were they made on one dataset?")
        a = np.stack([mine[variant, s].correct for s in seeds])
        b = np.stack([other[variant, s].correct for s in seeds])
        scopes = {"overall": np.ones(a.shape[1], dtype=bool), "cross_modal": cross_modal(first.cases)}
        scopes.update({case: first.cases == case for case in CROSS_MODAL_CASES})
        rows.append({"variant": variant, "seeds": seeds, **{
            scope: {**paired_bootstrap(a[:, m], b[:, m]), "mine": float(a[:, m].mean()), "other": float(b[:, m].mean())}
            for scope, m in scopes.items() if m.any()}})
    return rows


def markdown(rows: list[dict[str, Any]], mine: str, other: str) -> str:
    scopes = ["overall", "cross_modal", *CROSS_MODAL_CASES]
    lines = [f"| variant | {' | '.join(scopes)} |", "|---|" + "---|" * len(scopes)]
    for row in rows:
        cells = [f"{100 * row[s]['mine']:.1f} vs {100 * row[s]['other']:.1f}: {100 * row[s]['diff']:+.1f} "
                 f"[{100 * row[s]['ci_low']:+.1f}, {100 * row[s]['ci_high']:+.1f}]" if s in row else "–" for s in scopes]
        lines.append(f"| {row['variant']} | {' | '.join(cells)} |")
    return "\n".join(lines) + (f"\n\nTest accuracy in %, {mine} vs {other} backbone, and the difference with its paired "
                               "bootstrap 95% interval (by test post and seed).\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs=2, metavar="NAME=RUN_DIR", help="two ablate run directories, the first compared to the second")
    args = parser.parse_args(argv)
    named = [(name, Path(path)) for name, path in (arg.split("=", 1) for arg in args.runs)]
    for name, run in named:
        save(f"ablation_{name}", {**json.loads((run / "ablation.json").read_text()), "run": name})
    (mine, mine_run), (other, other_run) = named
    rows = compare(*(add_late_fusion(load_predictions(run / "ablation-predictions.npz")) for run in (mine_run, other_run)))
    table = markdown(rows, mine, other)
    print(table)
    result = {"mine": mine, "other": other, "rows": rows, "markdown": table}
    save("ablation_backbones", result)
    return result


if __name__ == "__main__":
    main()
