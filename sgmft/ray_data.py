"""Ray Data pipelines over dataset directories: the data layer's only contact with Ray.

``read_split`` reads a split's Parquet shards; ``preprocessed`` runs THE preprocessing
(:func:`sgmft.data.preprocess.preprocess_batch`) in parallel CPU tasks. By default the
output holds only tensor columns, so ``ds.iter_torch_batches(batch_size=...)`` works as is
in Ray Train workers (Ray cannot turn string columns into tensors):

    input_ids     int64   (L,)        per row
    pixel_values  uint8   (3, S, S)   normalised on the model's device
    label_id      int64               when ``labels`` is given
    ok            bool                with ``on_error="record"``: False where decoding failed

``keep_ids=True`` adds the string columns ``post_id`` (and ``label``, and ``error`` with
``on_error="record"``) for batch prediction and error reports; consume those with
``iter_batches`` or ``map_batches``.

``read_posts`` reads what batch prediction runs on; ``feature_split`` reads a split of a
feature cache (:mod:`sgmft.feature_cache`) the way ``split_dataset`` reads posts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray

from sgmft.data.preprocess import ON_ERROR_CHOICES, PreprocessSpec, encode_labels, preprocess_batch
from sgmft.data.schema import shard_files, split_files

STRING_COLUMNS = ("post_id", "label", "error")


def read_parquet_files(files: list[str], *, rows_per_block: int | None = None, num_cpus: float = 1.0,
                       **read_kwargs: Any) -> ray.data.Dataset:
    """``ray.data.read_parquet`` with one read task per file, on Ray's first reader, each task
    asking for ``num_cpus``.

    With ``rows_per_block``, each read task cuts its file into blocks of about that many rows
    (Ray's split of a read task's output): one big block would go to a single preprocessing
    task, and blocks of one batch leave tasks idle between Ray Data's scheduling rounds.
    Cutting at the read, not with ``repartition``, keeps every task of the pipeline at
    ``num_cpus``: a repartition task asks for a whole CPU, and rebuilding a lost block
    re-runs its tasks where the train workers left less (a stall seen on a 3-node cluster).

    Ray 2.60's default Parquet reader (datasource V2) lists files in an extra task and
    bin-packs up to 128 MiB into one block; measured on 2 cores that put 2-12 s before the
    first batch of every epoch of a post split (against 0.7-1.5 s here) and took 17-40 s to
    read a 40 MB split of cached features (1.6 s here). The switch is scoped to this call:
    the Dataset keeps a copy of the context.
    """
    import pyarrow.parquet as pq

    blocks = len(files)
    if rows_per_block:
        blocks = max(blocks, -(-sum(pq.ParquetFile(f).metadata.num_rows for f in files) // rows_per_block))
    ctx = ray.data.DataContext.get_current()
    previous = getattr(ctx, "use_datasource_v2", False)
    ctx.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(files, override_num_blocks=blocks, num_cpus=num_cpus, **read_kwargs)
    finally:
        ctx.use_datasource_v2 = previous


def read_split(dataset_dir: str | Path, split: str, **read_kwargs: Any) -> ray.data.Dataset:
    """The raw posts of one split (``post_id``, ``text``, ``image``, ``label``, ``meta_*``);
    ``read_kwargs`` as :func:`read_parquet_files` takes them."""
    return read_parquet_files(split_files(dataset_dir, split), **read_kwargs)


def read_posts(data: str | Path, split: str | None):
    """A dataset directory's split, or every Parquet file under ``data``."""
    data = Path(data)
    if split:
        return read_split(data, split)
    files = sorted(str(p) for p in data.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet files under {data}")
    return ray.data.read_parquet(files)


def _preprocess(batch: dict[str, np.ndarray], spec: PreprocessSpec, labels: list[str] | None,
                on_error: str, keep_ids: bool) -> dict[str, np.ndarray]:
    out = preprocess_batch(batch, spec, on_error=on_error)
    if labels is not None:
        if "label" not in out:
            raise ValueError("labels were given but the dataset has no 'label' column (an unlabeled set?)")
        out["label_id"] = encode_labels(out["label"], labels)
    if on_error == "record":
        out["ok"] = np.array([not e for e in out["error"]], dtype=bool)
    if not keep_ids:
        for column in STRING_COLUMNS:
            out.pop(column, None)
    return out


def preprocessed(
    ds: ray.data.Dataset,
    spec: PreprocessSpec,
    labels: Sequence[str] | None,
    *,
    batch_size: int = 64,
    concurrency: int = 2,
    on_error: str = "raise",
    num_cpus: float = 1.0,
    keep_ids: bool = False,
) -> ray.data.Dataset:
    """Model inputs from raw posts, decoded and tokenised by up to ``concurrency`` parallel
    tasks of ``num_cpus`` each, one task per input block (:func:`split_dataset` reads blocks
    of a few batches).

    Tasks rather than an actor pool: a task holds its CPU only while it works, so Ray
    Train workers and Parquet reads on a small cluster are never starved (an actor pool
    that cannot get its CPUs waits for ever; the tokenizer is cached per worker process
    anyway). The output dataset shares the input's DataContext.
    """
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    if min(concurrency, batch_size) < 1 or num_cpus <= 0:
        raise ValueError(f"concurrency and batch_size must be >= 1 and num_cpus > 0, "
                         f"got {concurrency}, {batch_size} and {num_cpus}")
    out = ds.map_batches(
        _preprocess,
        fn_kwargs={"spec": spec, "labels": None if labels is None else list(labels),
                   "on_error": on_error, "keep_ids": keep_ids},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=concurrency),
        num_cpus=num_cpus,
    )
    # Per-operator resource reservation splits a small cluster's CPUs between the read
    # and the preprocessing: on 2 CPUs one preprocessing task ran at a time (0.8 busy on
    # average, 1.3-1.45 with it off). A dataset's context is its own copy, not the
    # global one, and this pipeline is linear, so nothing else is starved by it.
    out.context.op_resource_reservation_enabled = False
    # Blocks in input order, not in the order parallel tasks finish: a config and its seed
    # then give the same batches on every run, and a run resumed after a crash replays its
    # epoch exactly (a materialized split keeps this order; streaming waits for a slow task).
    out.context.execution_options.preserve_order = True
    return out


def split_dataset(dataset_dir: str | Path, split: str, spec: PreprocessSpec, labels: Sequence[str] | None, *,
                  batch_size: int = 64, num_cpus: float = 1.0, **kwargs: Any) -> ray.data.Dataset:
    """A split's model inputs: read in blocks of four preprocessing batches, then
    :func:`preprocessed` (``kwargs`` as it takes them), every task at ``num_cpus``."""
    posts = read_split(dataset_dir, split, rows_per_block=4 * batch_size, num_cpus=num_cpus)
    return preprocessed(posts, spec, labels, batch_size=batch_size, num_cpus=num_cpus, **kwargs)


def _encode_labels(batch: dict[str, np.ndarray], labels: list[str]) -> dict[str, np.ndarray]:
    batch["label_id"] = encode_labels(batch.pop("label"), labels)
    batch.pop("post_id")
    batch.pop("split", None)
    return batch


def feature_split(features_dir: str | Path, split: str, labels: list[str], num_cpus: float = 1.0):
    """A Ray dataset of cached features with integer labels, ready for iter_torch_batches;
    every task at ``num_cpus``."""
    return read_parquet_files(shard_files(features_dir, split), num_cpus=num_cpus).map_batches(
        _encode_labels, fn_kwargs={"labels": labels}, batch_format="numpy", num_cpus=num_cpus)
