"""Model directories: ``model.safetensors`` + ``config.json`` + ``labels.json`` (+ ``metrics.json``).

A model directory is written to a temporary sibling and renamed into place
(:func:`staged_model_dir`, the one way every writer places one), so a reader never sees a
half-written one. This module names the files, writes, checks and fetches them (a remote
directory, ``s3://`` and the like, is copied locally first); loading the model they hold is
:func:`sgmft.models.model.load_model_dir` (safetensors and JSON only: no pickle is ever
loaded from a model directory), so that nothing here needs the model's code.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors.torch import save_model

from sgmft.config import Config, config_from_dict, config_to_dict

WEIGHTS, CONFIG, LABELS, METRICS = "model.safetensors", "config.json", "labels.json", "metrics.json"
TRAIN_FILES = (WEIGHTS, CONFIG, LABELS, METRICS)
REQUIRED_FILES, OPTIONAL_FILES = (WEIGHTS, CONFIG, LABELS), (METRICS,)
TRAIN_STATE = "train_state.pt"
"""Optimizer, schedule, epoch, RNG and history, beside the model files of a training checkpoint."""


class ModelDirError(ValueError):
    """A model directory is missing a file or its files disagree."""


def write_model_files(directory: Path, model: torch.nn.Module, config: Config, labels: list[str], metrics: dict | None) -> None:
    """Write the model files into an existing directory (no atomicity; see save_model_dir)."""
    unwrapped = getattr(model, "module", model)
    save_model(unwrapped, str(directory / WEIGHTS))
    (directory / CONFIG).write_text(json.dumps(config_to_dict(config), indent=2, ensure_ascii=False))
    (directory / LABELS).write_text(json.dumps(list(labels), ensure_ascii=False, indent=2))
    (directory / METRICS).write_text(json.dumps(metrics or {}, indent=2, ensure_ascii=False))


@contextlib.contextmanager
def staged_model_dir(path: str | Path) -> Iterator[Path]:
    """An empty temporary sibling of ``path`` to write a model directory into. When the block
    ends without an error it replaces ``path`` (renamed into place; a previous directory there
    is moved aside first and removed after); on an error it is removed and ``path`` is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield staging
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            staging.rename(path)
            shutil.rmtree(old)
        else:
            staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_model_dir(path: str | Path, model: torch.nn.Module, config: Config, labels: list[str], metrics: dict | None = None) -> Path:
    """Atomically (re)place ``path`` with a model directory."""
    if len(labels) != config.model.num_labels:
        raise ModelDirError(f"{len(labels)} labels but model.num_labels={config.model.num_labels}")
    with staged_model_dir(path) as staging:
        write_model_files(staging, model, config, labels, metrics)
    return Path(path)


def read_json(path: Path, default: Any = None) -> Any:
    if not path.is_file():
        if default is not None:
            return default
        raise ModelDirError(f"{path.parent} is not a model directory: {path.name} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelDirError(f"{path}: invalid JSON ({exc})") from exc


def check_model_dir(path: str | Path) -> tuple[Config, list[str]]:
    """Config and labels of a model directory, after checking its files agree (cheap: no weights read)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"model directory {path} does not exist")
    config = config_from_dict(read_json(path / CONFIG))
    labels = read_json(path / LABELS)
    if not isinstance(labels, list) or len(labels) != config.model.num_labels:
        raise ModelDirError(f"{path / LABELS}: expected a list of {config.model.num_labels} labels")
    if not (path / WEIGHTS).is_file():
        raise ModelDirError(f"{path} is not a model directory: {WEIGHTS} is missing")
    return config, [str(x) for x in labels]


def is_uri(source: str) -> bool:
    return "://" in str(source)


def resolve_source(source: str) -> str:
    """A URI as is; a local path made absolute (replicas and actors do not share the caller's cwd)."""
    if not source:
        raise ModelDirError("no model directory given (serve.model_dir is empty)")
    return source if is_uri(source) else str(Path(source).expanduser().resolve())


def fetch_model_dir(uri: str, destination: Path) -> Path:
    """Copy the model files of ``uri`` into ``destination/<basename>``; return that directory.

    The copy keeps the directory's name, so a model's version (its ``metrics.json``
    ``version``, or else its directory name) is the same whether loaded locally or remotely.
    """
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # pyarrow raises several types for unknown schemes and bad URIs
        raise ModelDirError(f"cannot open model URI {uri!r}: {exc}") from exc
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise ModelDirError(f"model URI {uri!r} is not a directory")
    path = path.rstrip("/")
    local = destination / (PurePosixPath(path).name or "model")
    local.mkdir(parents=True)
    # Only the model files: a training run's directory may also hold optimizer state and logs.
    for name in (*REQUIRED_FILES, *OPTIONAL_FILES):
        remote = f"{path}/{name}"
        if fs.get_file_info(remote).type != pafs.FileType.File:
            if name in REQUIRED_FILES:
                raise ModelDirError(f"model URI {uri!r} is not a model directory: {name} is missing")
            continue
        pafs.copy_files(remote, str(local / name), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local
