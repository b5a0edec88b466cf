"""The worker loop in this process (no cluster): what a checkpoint restores, divergence, collapse."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sgmft.config import Config
from sgmft.model_dir import TRAIN_STATE, write_model_files
from sgmft.train_loop import (LossWatch, RayTrainSession, TrainingDiverged, _autocast, collapsed_to, epoch_line,
                              setup_worker, train_state, train_step)
from sgmft.worker_spec import WorkerSpec

LABELS = [f"place{i}" for i in range(4)]


class DirectorySession(RayTrainSession):
    """The loop's session interface for one process on the CPU, resuming from a checkpoint
    directory when given one (what Ray Train hands a restarted worker)."""

    def __init__(self, checkpoint_dir: Path | None = None):
        self.checkpoint_dir = checkpoint_dir

    def rank_world(self):
        return 0, 1

    def device(self):
        return torch.device("cpu")

    def prepare_model(self, model):
        return model

    def checkpoint(self):
        from ray.train import Checkpoint

        return Checkpoint.from_directory(str(self.checkpoint_dir)) if self.checkpoint_dir else None


def _spec(tmp_path: Path) -> WorkerSpec:
    cfg = Config()
    cfg.model.num_labels = len(LABELS)
    cfg.train.epochs, cfg.data.batch_size = 3, 4
    return WorkerSpec(config=cfg, labels=LABELS, train_rows=40, run_dir=str(tmp_path), dataset_dir=str(tmp_path))


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 2000, (4, 12), generator=g),
            "pixel_values": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g),
            "label_id": torch.randint(0, len(LABELS), (4,), generator=g)}


def _steps(run, seeds) -> list[float]:
    losses = []
    for seed in seeds:
        loss, _ = train_step(run.model, _batch(seed), run.loss_fn, run.optimizer, run.scheduler,
                             autocast=_autocast(run.cfg, run.device), max_grad_norm=run.cfg.train.max_grad_norm)
        run.global_step += 1
        losses.append(float(loss))
    return losses


def _checkpoint(run, directory: Path, epoch: int) -> Path:
    directory.mkdir()
    write_model_files(directory, run.model, run.cfg, run.labels, {})
    torch.save(train_state(run, epoch), directory / TRAIN_STATE)
    return directory


def test_a_restored_worker_holds_the_saved_weights_optimizer_schedule_and_rng(tmp_path):
    run = setup_worker(_spec(tmp_path), DirectorySession())
    _steps(run, range(3))
    run.history = [{"epoch": 1, "train_loss": 1.0}]
    torch.manual_seed(123)
    ckpt = _checkpoint(run, tmp_path / "ckpt", epoch=0)

    resumed = setup_worker(_spec(tmp_path), DirectorySession(ckpt))
    saved, restored = run.model.state_dict(), resumed.model.state_dict()
    assert saved.keys() == restored.keys()
    for name in saved:
        assert torch.equal(saved[name], restored[name]), name
    for before, after in zip(run.optimizer.param_groups, resumed.optimizer.param_groups, strict=True):
        assert before["lr"] == after["lr"]
        for p, q in zip(before["params"], after["params"], strict=True):
            state, state_after = run.optimizer.state[p], resumed.optimizer.state[q]
            assert set(state) == {"step", "exp_avg", "exp_avg_sq"} == set(state_after)
            for key in state:
                assert torch.equal(state[key].cpu(), state_after[key].cpu()), key
    assert resumed.scheduler.state_dict() == run.scheduler.state_dict()
    assert resumed.scheduler.get_last_lr() == run.scheduler.get_last_lr()
    assert torch.equal(torch.get_rng_state(), torch.load(ckpt / TRAIN_STATE, weights_only=True)["rng"])
    assert (resumed.start_epoch, resumed.global_step, resumed.history) == (1, 3, run.history)

    # and both go on identically: the same next steps give the same losses
    torch.manual_seed(7)
    expected = _steps(run, range(3, 6))
    torch.manual_seed(7)
    assert _steps(resumed, range(3, 6)) == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_a_non_finite_loss_stops_with_the_step_and_the_last_finite_loss():
    watch = LossWatch(torch.device("cpu"))
    watch.observe(0, torch.tensor(2.5), torch.tensor(1.0))
    watch.observe(1, torch.tensor(2.25), torch.tensor(1.0))
    watch.check(epoch=0, lr=1e-3)  # all finite: nothing happens
    watch.observe(2, torch.tensor(float("nan")), torch.tensor(1.0))
    watch.observe(3, torch.tensor(3.0), torch.tensor(float("inf")))  # later steps do not move the first bad one
    with pytest.raises(TrainingDiverged) as caught:
        watch.check(epoch=1, lr=2e-3)
    message = str(caught.value)
    assert "epoch 2" in message and "at step 2" in message and "last finite loss 2.25 at step 1" in message
    assert "train.lr" in message


def test_an_infinite_gradient_norm_counts_as_divergence():
    watch = LossWatch(torch.device("cpu"))
    watch.observe(5, torch.tensor(1.0), torch.tensor(float("inf")))
    with pytest.raises(TrainingDiverged, match="at step 5"):
        watch.check(epoch=0, lr=1e-3)


def test_a_step_reports_the_gradient_norm_before_clipping(tmp_path):
    run = setup_worker(_spec(tmp_path), DirectorySession())
    batch = _batch(0)
    loss, norm = train_step(run.model, batch, run.loss_fn, run.optimizer, run.scheduler,
                            autocast=_autocast(run.cfg, run.device), max_grad_norm=1e-6)
    assert math.isfinite(float(loss)) and float(norm) > 1e-6  # the norm measured, not the clipped one
    _, none = train_step(run.model, batch, run.loss_fn, run.optimizer, run.scheduler,
                         autocast=_autocast(run.cfg, run.device), max_grad_norm=1.0, update=False)
    assert none is None


def test_an_epoch_whose_predictions_are_all_one_class_is_flagged():
    one_class = np.array([[0, 3, 0], [0, 5, 0], [0, 2, 0]])
    assert collapsed_to(one_class, ["a", "b", "c"]) == "b"
    assert collapsed_to(np.array([[3, 1, 0], [0, 5, 0], [0, 2, 0]]), ["a", "b", "c"]) is None
    metrics = {"epoch": 2, "train_loss": 2.3, "val_accuracy": 0.1, "val_macro_f1": 0.02, "grad_norm": 0.5,
               "lr": 1e-3, "samples_per_s": 10.0, "data_wait_share": 0.01, "collapsed": "b"}
    line = epoch_line(metrics, epochs=3, eta_s=5)
    assert "grad norm 0.5" in line and "lr 1.00e-03" in line
    assert "every validation post was predicted as 'b'" in line
    assert "predicted as" not in epoch_line({**metrics, "collapsed": None}, epochs=3, eta_s=5)
    json.dumps(metrics)  # what the history and metrics.json hold must be plain JSON
