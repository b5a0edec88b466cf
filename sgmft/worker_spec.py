"""What the driver hands every training worker: one typed contract between the workflows that
prepare a run (:func:`sgmft.runs.worker_spec`, :mod:`sgmft.pretrain`) and the worker loop that
runs it (:mod:`sgmft.train_loop`). Its own module, below both, so neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass

from sgmft.config import Config


@dataclass
class WorkerSpec:
    """A training run as every one of its workers sees it."""

    config: Config
    labels: list[str]
    train_rows: int
    """Rows of the train split; every worker runs ``train_rows // world // batch_size`` steps an epoch."""
    run_dir: str
    dataset_dir: str
    class_weights: list[float] | None = None
    """Per-label loss weights (``train.class_weights: balanced``), in label order."""
    head_widths: dict[str, int] | None = None
    """Cached features: the backbone's widths, so the worker builds the head alone."""
    torch_threads: int = 1
    """Intra-op threads: as many as the CPUs the worker reserved."""
