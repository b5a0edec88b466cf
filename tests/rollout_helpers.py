"""Model directories and app configs shared by the rollout and node-loss serving tests."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

from sgmft.config import Config


def tiny_model_dir(path: Path, version: str, like: Path | None = None) -> Path:
    """A tiny random-init model directory of ``version``; ``like``: the same weights as that one."""
    from sgmft.config import model_config_for
    from sgmft.model_dir import save_model_dir
    from sgmft.models.model import build_model

    if like is not None:
        shutil.copytree(like, path)
        metrics = json.loads((path / "metrics.json").read_text())
        (path / "metrics.json").write_text(json.dumps({**metrics, "version": version}))
        return path
    cfg = Config()
    cfg.model = model_config_for("tiny", num_labels=10)
    labels = [f"place{i}" for i in range(10)]
    return save_model_dir(path, build_model(cfg.model, load_pretrained=False), cfg, labels,
                          {"version": version, "val_accuracy": 0.1})


def app_config(model_dir: Path, replicas: int = 2) -> Config:
    """The app on ``model_dir`` with ``replicas`` replicas of each deployment. Serve replaces a
    deployment's replicas a fifth (at least one) at a time: with one replica of each, requests
    wait while the only one restarts."""
    cfg = Config()
    cfg.serve.model_dir = str(model_dir)
    cfg.serve.num_cpus_per_replica = 0.25
    cfg.serve.ingress_replicas = replicas
    cfg.serve.min_replicas = cfg.serve.max_replicas = replicas
    return cfg


def jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 120, 40)).save(buf, "JPEG")
    return buf.getvalue()
