"""What a user sees: ``sgmft demo`` run as a user runs it, its console read line by line."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# Ray's own output, which belongs in the run's log files, not on the console
RAY_INTERNALS = re.compile(
    r"core_worker|TrainingReport\(|Checkpoint\(|\(raylet\)|pid=|[Pp]arquet|Progress bars|Dataset .* execution"
    r"|\bINFO\b|\bWARNING\b|\bERROR\b|Warning:|Deprecat|Traceback|autoscaler|TrainController|RayTrainWorker"
)


def _user_env() -> dict[str, str]:
    """The environment of a user's shell: no cluster to join, so the command starts its own Ray."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}


@pytest.mark.slow
def test_demo_console_shows_progress_epochs_and_summary_and_nothing_of_rays(tmp_path):
    sgmft = str(Path(sys.executable).with_name("sgmft"))
    cmd = [sgmft, "demo", "--set", f"train.storage_path={tmp_path}", "--set", "data.synth.n=160",
           "--set", "data.batch_size=16", "--set", "train.epochs=2"]
    local_rays = set(Path("/tmp").glob("sgmft-ray-*"))  # where a local Ray keeps its sockets and session
    # stdout and stderr are pipes, not a terminal: no progress bars, only the lines
    done = subprocess.run(cmd, env=_user_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert set(Path("/tmp").glob("sgmft-ray-*")) <= local_rays, "the demo's local Ray left its files in /tmp"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    console = "\n".join(lines + done.stderr.splitlines())

    assert done.stderr.strip() == "", done.stderr[-3000:]
    assert not [line for line in lines if RAY_INTERNALS.search(line)], console
    repeated = {line for line in lines if lines.count(line) > 1}
    assert not repeated, console
    assert len(lines) <= 16, console

    assert lines[0].startswith("SG-MFT demo: 160 synthetic"), console
    assert lines[1].startswith("run directory: ") and "Ray's logs: " in lines[1], console
    epochs = [line for line in lines if re.match(r"epoch \d/2  loss", line)]
    assert [line.split()[1] for line in epochs] == ["1/2", "2/2"], console
    assert all("samples/s" in line and "ETA" in line for line in epochs), console
    assert any(line.startswith("epoch train loss") for line in lines), console
    assert sum(bool(re.match(r"\s+[12]\s+\d", line)) for line in lines) == 2, console  # the table's rows
    for start in ("best epoch ", "test: accuracy ", "model directory: ", "next: sgmft serve --model "):
        assert sum(line.startswith(start) for line in lines) == 1, (start, console)

    # Ray's output went to the run's log directory instead of being dropped
    logs = tmp_path / "demo" / "logs"
    assert "TrainingReport(" in (logs / "workers.log").read_text(errors="replace")
    assert "execution finished" in (logs / "driver.log").read_text(errors="replace")
    assert (tmp_path / "demo" / "model" / "model.safetensors").is_file()
