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
