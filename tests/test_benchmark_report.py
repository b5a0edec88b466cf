"""The results table: one row a result file, each with the machine and commit it was measured on."""

import json
import subprocess

import pytest

from benchmarks import report

HEAD = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=report.REPO, capture_output=True, text=True).stdout.strip()


def _save(directory, name, result):
    (directory / f"{name}.json").write_text(json.dumps(result))


def test_each_row_names_its_own_machine_and_commit(tmp_path):
    if not HEAD:
        pytest.skip("not a git checkout")
    _save(tmp_path, "ingest", {"machine": {"cpu_count": 2, "gpu": None, "commit": HEAD, "date": "2026-12-01 10:00:00 UTC"},
                               "speedup": 1.33, "speedup_after_first_batch": 1.74, "goal": 1.5})
    _save(tmp_path, "gpu_check", {"machine": {"cpu_count": 16, "gpu": "NVIDIA H200", "commit": "8e41435"},
                                  "train_step": {"batch": 64, "samples_per_s": 882.7, "max_memory_gib": 5.2},
                                  "inference": {"batch": 256, "posts_per_s": 4036.8}})
    _save(tmp_path, "summary", {"results": {}})  # gathers the others: no row of its own
    rows = report.table(tmp_path).splitlines()[2:]
    assert len(rows) == 2
    gpu, ingest = rows  # sorted by file name
    assert "NVIDIA H200, 16 CPUs" in gpu and "8e41435" in gpu and "4,037 posts/s" in gpu
    assert "**changed since**" in gpu  # the product has commits since 8e41435
    assert "| 2 CPUs |" in ingest and f"{HEAD}, 2026-12-01" in ingest and "1.33x" in ingest and ingest.endswith("| unchanged |")


def test_a_result_without_its_figures_says_what_it_lacks(tmp_path):
    _save(tmp_path, "tune_cache", {"machine": {"cpu_count": 2}, "speedup": 3.0})
    assert "(result file lacks" in report.table(tmp_path)


def test_write_replaces_the_readme_table_between_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_BEGIN}\nold table\n{report.README_END}\noutro\n")
    report.write("| new |\n", results=tmp_path, readme=readme)
    assert readme.read_text() == f"intro\n{report.README_BEGIN}\n| new |\n{report.README_END}\noutro\n"
    assert (tmp_path / "SUMMARY.md").read_text().endswith("| new |\n")


def test_the_ablation_table_sets_both_backbones_side_by_side(tmp_path):
    def run(name: str, full: float, no_fine: float) -> dict:
        summary = [{"variant": v, "seeds": [0, 1], "test_accuracy": {"mean": acc, "std": 0.01},
                    "cross_modal_accuracy": {"mean": acc - 0.1, "std": 0.02}} for v, acc in (("full", full), ("no_fine", no_fine))]
        summary[1]["vs_full"] = {"cross_modal": {"diff": no_fine - full, "ci_low": -0.06, "ci_high": -0.01}}
        return {"run": name, "summary": summary, "seeds": [0, 1], "test_posts": 100, "cross_modal_posts": 30}

    readme = tmp_path / "README.md"
    readme.write_text(f"{report.README_BEGIN}\n{report.README_END}\n{report.ABLATION_BEGIN}\nold\n{report.ABLATION_END}\n")
    report.write("| table |\n", results=tmp_path, readme=readme)
    assert "old" in readme.read_text()  # without the ablation's results the table stays as it was
    _save(tmp_path, "ablation_random", run("random", 0.66, 0.67))
    _save(tmp_path, "ablation_pretrained", run("pretrained", 0.65, 0.62))
    _save(tmp_path, "ablation_backbones", {"mine": "pretrained", "other": "random", "rows": [
        {"variant": "full", "cross_modal": {"diff": 0.055, "ci_low": 0.026, "ci_high": 0.085}}]})
    report.write("| table |\n", results=tmp_path, readme=readme)
    rows = readme.read_text().split(report.ABLATION_BEGIN)[1].splitlines()
    assert rows[3] == "| full | 66.0 ± 1.0 / 56.0 ± 2.0 | 65.0 ± 1.0 / 55.0 ± 2.0 | – | +5.5 [+2.6, +8.5] |", rows
    assert rows[4] == "| no_fine | 67.0 ± 1.0 / 57.0 ± 2.0 | 62.0 ± 1.0 / 52.0 ± 2.0 | -3.0 [-6.0, -1.0] | – |", rows
    assert "100 synthetic test posts (30 cross-modal)" in rows[6] and "2 seeds" in rows[6]
