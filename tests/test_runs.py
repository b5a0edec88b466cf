"""A run directory resumed only by the configuration that trained it."""

from __future__ import annotations

import json

import pytest

from sgmft.config import config_to_dict, load_config
from sgmft.runs import RunConfigChanged, check_resume, run_dir


def _checkpointed(tmp_path, *overrides: str):
    """The demo config on ``tmp_path`` with an epoch's checkpoint of it in its run directory."""
    cfg = load_config("jobs/configs/demo.yaml", [f"train.storage_path={tmp_path}", *overrides])
    checkpoint = run_dir(cfg) / "epoch-0002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    return cfg


def test_a_run_resumes_with_more_epochs_or_other_resources(tmp_path):
    _checkpointed(tmp_path, "train.epochs=2")
    check_resume(load_config("jobs/configs/demo.yaml", [f"train.storage_path={tmp_path}", "train.epochs=5",
                                                        "train.num_workers=1", "train.max_failures=0",
                                                        "serve.port=9000", "model.num_labels=7"]))
    check_resume(load_config("jobs/configs/demo.yaml", [f"train.storage_path={tmp_path}", "train.run_name=other",
                                                        "train.lr=1"]))  # another run: nothing to resume


def test_a_run_is_not_resumed_with_what_it_trains_changed(tmp_path):
    _checkpointed(tmp_path)
    changed = load_config("jobs/configs/demo.yaml", [f"train.storage_path={tmp_path}", "train.lr=0.01",
                                                     "data.synth.n=99", "model.backbone.preset=small"])
    with pytest.raises(RunConfigChanged) as caught:
        check_resume(changed)
    message = str(caught.value)
    for change in ("train.lr 0.002 -> 0.01", "data.synth.n 1200 -> 99", "model.backbone.preset 'tiny' -> 'small'"):
        assert change in message, message
    assert "epoch-0002" in message and "train.run_name" in message


def test_a_checkpoint_config_that_cannot_be_read_is_not_resumed(tmp_path):
    cfg = _checkpointed(tmp_path)
    (run_dir(cfg) / "epoch-0002" / "config.json").write_text(json.dumps({"train": {"no_such_key": 1}}))
    with pytest.raises(RunConfigChanged, match="the saved config"):
        check_resume(cfg)
