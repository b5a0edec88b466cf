"""Real TorchTrainer runs on the session's local Ray: crash-and-resume, re-run resume, job submit."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sgmft.config import load_config

REPO = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, *overrides: str):
    return load_config(REPO / "jobs" / "configs" / "demo.yaml", [
        f"train.storage_path={tmp_path}", "data.synth.n=160", "data.batch_size=16", "train.epochs=3",
        "data.synth.text_noise=0.1", "data.synth.image_noise=0.1", "data.synth.image_swap=0.0", *overrides,
    ])


def test_a_run_crashed_mid_epoch_resumes_exactly_and_a_rerun_continues_it(ray_cluster, tmp_path):
    """A worker killed in the middle of epoch 2 costs no epoch, and resume is exact: weights,
    optimizer, schedule and RNG come back as saved and the epoch replays the same batches with
    the same dropout, so the run ends with the losses of an uninterrupted one. One worker: with
    two, the streaming split may deal the blocks to the ranks in another order on the rerun
    (each epoch then sees the same posts, but not in the same batches)."""
    from sgmft.train import train

    one = ("train.num_workers=1", "train.cpus_per_worker=1", "train.epochs=2")
    steady = train(tiny_config(tmp_path, "train.run_name=steady", *one), evaluate_test=False)
    steps = steady.best["global_step"] // 2
    cfg = tiny_config(tmp_path, "train.run_name=crash", *one, f"train.fail_once_at_step={steps + steps // 2}", "train.max_failures=1")
    crashed = train(cfg, evaluate_test=False)  # the test split's evaluation is the next test's
    assert (tmp_path / "crash" / ".fail_once_done").read_text().startswith(f"crashed at step {steps + steps // 2}")
    assert [h["epoch"] for h in crashed.history] == [1, 2]
    for key in ("train_loss", "val_accuracy", "grad_norm", "lr"):
        assert [h[key] for h in crashed.history] == pytest.approx([h[key] for h in steady.history], rel=1e-5), key
    metrics = json.loads((crashed.model_dir / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["version"].startswith("crash-epoch")
    assert {p.name for p in crashed.model_dir.iterdir()} >= {"config.json", "labels.json", "metrics.json", "model.safetensors"}
    assert not (crashed.model_dir / "train_state.pt").exists()

    # the same run name again, with one more epoch, continues from the last checkpoint
    again = train(tiny_config(tmp_path, "train.run_name=crash", "train.num_workers=1", "train.cpus_per_worker=1", "train.epochs=3"),
                  evaluate_test=False)
    assert [h["epoch"] for h in again.history] == [1, 2, 3]
    assert again.best["global_step"] in (steps, 2 * steps, 3 * steps)


def test_ray_job_submit_trains_a_model_that_learns(ray_head, tmp_path):
    """``ray job submit`` of the train job on the low-noise synthetic set: it learns, and its
    test-split evaluation lands in metrics.json and the model directory."""
    from sgmft.data.schema import split_rows

    overrides = [f"train.storage_path={tmp_path}", "train.run_name=job", "data.synth.n=600", "train.epochs=6",
                 "data.batch_size=32", "train.lr=2e-3", "train.class_weights=balanced", "train.grad_accum_steps=2",
                 "data.synth.text_noise=0.1", "data.synth.image_noise=0.1", "data.synth.image_swap=0.0"]
    env = {**ray_head.client_env(), "RAY_ADDRESS": ray_head.dashboard_url}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", ray_head.dashboard_url,
           "--working-dir", str(REPO), "--", sys.executable, "-m", "jobs.train", "--config", "jobs/configs/demo.yaml",
           *[arg for override in overrides for arg in ("--set", override)]]
    # The dashboard accepts jobs only once its agent on the head has registered; on a busy
    # machine that can lag the dashboard's own start by tens of seconds. Refused submissions
    # are retried for 120 s; the job itself gets 300 s (it takes ~60), within the test's 600.
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        if "No available agent" not in done.stdout + done.stderr or time.monotonic() + 10 > deadline:
            break
        time.sleep(10)
    refused = "No available agent" in done.stdout + done.stderr
    agent_logs = ray_head.log_tail("dashboard_JobHead.log", "dashboard_agent.log") if refused else ""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + agent_logs
    assert "epoch 6/6" in done.stdout and "samples/s" in done.stdout and "ETA" in done.stdout, done.stdout[-3000:]
    model_dir = tmp_path / "job" / "model"
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.5, metrics["history"]  # chance is 0.1
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]
    (dataset_dir,) = (tmp_path / "job").glob("synthetic-*")
    assert metrics["test"]["num_examples"] == split_rows(dataset_dir, "test")
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "eval-test.json").is_file()
    assert (model_dir / "confusion-test.png").is_file()


def test_bad_training_config_is_refused_before_any_worker_starts(tmp_path):
    from sgmft.cli import main

    assert main(["train", "--config", str(REPO / "jobs/configs/demo.yaml"), "--set", "train.epochs=0"]) == 2
