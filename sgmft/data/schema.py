"""What a dataset is: the Arrow schema of a post and the directory layout.

A dataset directory holds ``{split}/part-NNNNN.parquet`` shards for the splits in
:data:`SPLITS`, ``labels.json`` (the ordered label list), ``report.json`` (how it was
built) and ``quarantine.jsonl`` (one JSON object per input row that could not be used).
Writers here are deterministic: the same rows give byte-identical shards.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sgmft.data.labels import LabelError, check_labels

SPLITS: tuple[str, ...] = ("train", "val", "test")
LABELED_SPLITS: tuple[str, ...] = ("train", "val")
"""Splits whose rows must all carry a label (``test`` may be an unlabeled prediction set)."""
LABELS_FILE = "labels.json"
REPORT_FILE = "report.json"
QUARANTINE_FILE = "quarantine.jsonl"
META_PREFIX = "meta_"
DEFAULT_ROWS_PER_SHARD = 256
"""Small enough that Ray Data gets several blocks to preprocess in parallel."""

POST_SCHEMA = pa.schema([
    pa.field("post_id", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),
    pa.field("label", pa.string(), nullable=True),
])
_ACCEPTED_TYPES = {
    "post_id": (pa.string(), pa.large_string()),
    "text": (pa.string(), pa.large_string()),
    "image": (pa.binary(), pa.large_binary()),
    "label": (pa.string(), pa.large_string()),
}


class DatasetError(ValueError):
    """A dataset directory or a dataset input is missing, malformed or inconsistent."""


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; splits are {list(SPLITS)}")
    return split


def load_labels(dataset_dir: str | Path) -> list[str]:
    """The dataset's ordered label list from ``labels.json``."""
    path = Path(dataset_dir) / LABELS_FILE
    if not path.is_file():
        raise DatasetError(f"{dataset_dir}: no {LABELS_FILE} (a dataset directory needs its ordered label list)")
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(labels, list):
        raise DatasetError(f"{path}: expected a JSON list of label strings, got {type(labels).__name__}")
    try:
        return check_labels(labels, str(path), allow_empty=True)
    except LabelError as exc:
        raise DatasetError(str(exc)) from exc


def split_files(dataset_dir: str | Path, split: str) -> list[str]:
    """Sorted Parquet shard paths of one split."""
    check_split(split)
    folder = Path(dataset_dir) / split
    files = sorted(str(p) for p in folder.glob("part-*.parquet"))
    if not files:
        where = "does not exist" if not folder.is_dir() else "holds no part-*.parquet shards"
        raise DatasetError(f"split {split!r} of dataset {dataset_dir}: {folder} {where}")
    return files


# A feature cache (``sgmft features cache``) is the second dataset layout: backbone features
# instead of posts, partitioned by split (``split=train/...``), with its manifest.
FEATURE_MANIFEST = "features.json"


def is_feature_cache(directory: str | Path) -> bool:
    return (Path(directory) / FEATURE_MANIFEST).is_file()


def feature_split_dir(features_dir: str | Path, split: str) -> Path:
    return Path(features_dir) / f"split={check_split(split)}"


def shard_files(directory: str | Path, split: str) -> list[str]:
    """A split's Parquet files, in a post dataset or in a feature cache."""
    if not is_feature_cache(directory):
        return split_files(directory, split)
    files = sorted(str(p) for p in feature_split_dir(directory, split).glob("*.parquet"))
    if not files:
        raise DatasetError(f"feature cache {directory} has no {split!r} split")
    return files


def split_rows(directory: str | Path, split: str) -> int:
    """Rows of one split, from the Parquet footers (nothing is read)."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in shard_files(directory, split))


def label_counts(directory: str | Path, labels: Sequence[str]) -> list[int]:
    """How many training rows carry each label, in ``labels`` order."""
    counts = Counter(v for f in shard_files(directory, "train") for v in pq.read_table(f, columns=["label"]).column("label").to_pylist())
    return [counts[label] for label in labels]


def available_splits(dataset_dir: str | Path) -> list[str]:
    """The splits that have at least one shard, in :data:`SPLITS` order."""
    return [s for s in SPLITS if any((Path(dataset_dir) / s).glob("part-*.parquet"))]


def dataset_schema(meta_fields: Iterable[pa.Field] = ()) -> pa.Schema:
    """:data:`POST_SCHEMA` followed by the ``meta_*`` fields in name order."""
    meta = sorted(meta_fields, key=lambda f: f.name)
    bad = [f.name for f in meta if not f.name.startswith(META_PREFIX)]
    if bad:
        raise DatasetError(f"extra columns must be named {META_PREFIX}*, got {bad}")
    return pa.schema([*POST_SCHEMA, *meta])


def to_table(rows: pa.Table | Sequence[Mapping[str, Any]], schema: pa.Schema | None = None) -> pa.Table:
    """Rows (a table or a list of dicts) as a table of the dataset schema.

    Missing ``label`` becomes null; ``meta_*`` columns are kept (types inferred unless
    ``schema`` gives them); any other extra column is an error rather than silently lost.
    """
    if isinstance(rows, pa.Table):
        columns = {name: rows.column(name) for name in rows.column_names}
        num_rows = rows.num_rows
    else:
        rows = list(rows)
        # An empty split still needs every column of the schema.
        names = sorted({key for row in rows for key in row} | set((schema or POST_SCHEMA).names))
        columns = {name: [row.get(name) for row in rows] for name in names}
        num_rows = len(rows)
    if "label" not in columns:
        columns["label"] = pa.nulls(num_rows, pa.string())
    missing = [f.name for f in POST_SCHEMA if f.name not in columns]
    if missing:
        raise DatasetError(f"rows lack the required columns {missing} (required: {POST_SCHEMA.names})")
    extra = [n for n in columns if n not in POST_SCHEMA.names and not n.startswith(META_PREFIX)]
    if extra:
        raise DatasetError(f"unexpected columns {extra}: extra columns must be named {META_PREFIX}*")
    if schema is None:
        meta = [pa.field(n, _as_array(columns[n], None, n).type) for n in columns if n.startswith(META_PREFIX)]
        schema = dataset_schema(meta)
    arrays = []
    for field in schema:
        if field.name not in columns:
            raise DatasetError(f"rows lack the column {field.name!r} that the schema requires")
        arrays.append(_as_array(columns[field.name], field.type, field.name))
        if not field.nullable and arrays[-1].null_count:
            raise DatasetError(f"column {field.name!r} holds {arrays[-1].null_count} null value(s); it must not")
    return pa.Table.from_arrays(arrays, schema=schema)


def _as_array(values: Any, type_: pa.DataType | None, name: str) -> pa.Array | pa.ChunkedArray:
    try:
        if isinstance(values, (pa.Array, pa.ChunkedArray)):
            return values if type_ is None or values.type == type_ else values.cast(type_)
        return pa.array(values, type=type_)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise DatasetError(f"column {name!r} cannot be stored as {type_ or 'one Arrow type'}: {exc}") from exc


def write_split(
    rows: pa.Table | Sequence[Mapping[str, Any]],
    dataset_dir: str | Path,
    split: str,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    schema: pa.Schema | None = None,
) -> list[str]:
    """Write one split as ``part-NNNNN.parquet`` shards, replacing that split's old shards.

    An empty split still gets one (empty) shard, so the layout does not depend on luck.
    """
    check_split(split)
    if rows_per_shard < 1:
        raise DatasetError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    table = to_table(rows, schema)
    folder = Path(dataset_dir) / split
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("part-*.parquet"):
        old.unlink()
    paths = []
    for index, start in enumerate(range(0, max(table.num_rows, 1), rows_per_shard)):
        path = folder / f"part-{index:05d}.parquet"
        # Fixed writer options: the same rows must give the same bytes.
        pq.write_table(table.slice(start, rows_per_shard), path, row_group_size=rows_per_shard,
                       compression="snappy", write_statistics=True)
        paths.append(str(path))
    return paths


def write_json(path: str | Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def write_labels(dataset_dir: str | Path, labels: Sequence[str]) -> None:
    write_json(Path(dataset_dir) / LABELS_FILE, check_labels(labels, "labels", allow_empty=True))


def write_quarantine(dataset_dir: str | Path, records: Iterable[Mapping[str, Any]]) -> None:
    with open(Path(dataset_dir) / QUARANTINE_FILE, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(dict(record), ensure_ascii=False, sort_keys=True) + "\n")


def read_quarantine(dataset_dir: str | Path) -> list[dict[str, Any]]:
    """The quarantined rows; an absent file means none."""
    path = Path(dataset_dir) / QUARANTINE_FILE
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{number}: not valid JSON: {exc}") from exc
    return records


def read_report(dataset_dir: str | Path) -> dict[str, Any] | None:
    path = Path(dataset_dir) / REPORT_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def prepare_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Create ``out_dir``; refuse to mix with an existing dataset unless ``overwrite``.

    With ``overwrite`` only the dataset's own entries are removed, never other files.
    """
    out = Path(out_dir)
    owned = [out / n for n in (*SPLITS, LABELS_FILE, REPORT_FILE, QUARANTINE_FILE)]
    present = [p for p in owned if p.exists()]
    if present and not overwrite:
        raise DatasetError(f"{out} already holds a dataset ({', '.join(p.name for p in present)}); "
                           "choose another directory or overwrite it (overwrite=True, --overwrite)")
    for path in present:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_fractions(val_frac: float, test_frac: float) -> None:
    if not (0.0 <= val_frac < 1.0 and 0.0 <= test_frac < 1.0 and val_frac + test_frac < 1.0):
        raise DatasetError(f"val_frac={val_frac} and test_frac={test_frac} must be >= 0 and sum to < 1")


def stratified_split(labels: Sequence[str | None], val_frac: float, test_frac: float, seed: int) -> list[str]:
    """A split name per row: per label, a seeded shuffle cut into train/val/test shares.

    Each label's shuffle depends only on the seed and that label's rows, so adding rows of
    one label does not reshuffle the others. Unlabeled rows (None) form their own group.
    """
    check_fractions(val_frac, test_frac)
    groups: dict[str | None, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(label, []).append(index)
    result = [""] * len(labels)
    for label, indices in groups.items():
        random.Random(f"{seed}:{label}").shuffle(indices)
        n_val, n_test = round(len(indices) * val_frac), round(len(indices) * test_frac)
        for rank, index in enumerate(indices):
            result[index] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    return result


def validate_dataset(dataset_dir: str | Path) -> None:
    """Check a dataset directory; raise :class:`DatasetError` naming the first problem found."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DatasetError(f"dataset directory {root} does not exist")
    labels = load_labels(root)
    known = set(labels)
    splits = available_splits(root)
    if not splits:
        raise DatasetError(f"{root}: no split holds Parquet shards (expected {{{','.join(SPLITS)}}}/part-*.parquet)")
    seen: dict[str, str] = {}
    for split in splits:
        for path in split_files(root, split):
            _check_shard_schema(path)
            table = pq.read_table(path, columns=["post_id", "label"])
            for column in ("text", "image", "post_id"):
                nulls = _null_count(path, column)
                if nulls:
                    raise DatasetError(f"{path}: column {column!r} holds {nulls} null value(s)")
            for post_id in table.column("post_id").to_pylist():
                if post_id in seen:
                    raise DatasetError(f"duplicate post_id {post_id!r}: in {seen[post_id]} and {path}")
                seen[post_id] = path
            counts = Counter(table.column("label").to_pylist())
            if None in counts and split in LABELED_SPLITS and labels:  # no label list: a pair dataset
                raise DatasetError(f"{path}: {counts[None]} row(s) of the {split!r} split have no label")
            unknown = sorted(k for k in counts if k is not None and k not in known)
            if unknown:
                raise DatasetError(f"{path}: labels {unknown[:5]} are not in {LABELS_FILE} ({labels})")


def _check_shard_schema(path: str) -> None:
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetError(f"{path}: not a readable Parquet file: {exc}") from exc
    for name, accepted in _ACCEPTED_TYPES.items():
        if name not in schema.names:
            raise DatasetError(f"{path}: missing column {name!r} (schema: {POST_SCHEMA.names} + {META_PREFIX}*)")
        if schema.field(name).type not in accepted:
            raise DatasetError(f"{path}: column {name!r} has type {schema.field(name).type}, expected {accepted[0]}")
    extra = [n for n in schema.names if n not in _ACCEPTED_TYPES and not n.startswith(META_PREFIX)]
    if extra:
        raise DatasetError(f"{path}: unexpected columns {extra} (extra columns must be named {META_PREFIX}*)")


def _null_count(path: str, column: str) -> int:
    """Nulls in one column, from the Parquet statistics when written, else by reading it."""
    meta = pq.ParquetFile(path).metadata
    index = meta.schema.to_arrow_schema().get_field_index(column)
    total = 0
    for group in range(meta.num_row_groups):
        stats = meta.row_group(group).column(index).statistics
        if stats is None or not stats.has_null_count:
            return pq.read_table(path, columns=[column]).column(column).null_count
        total += stats.null_count
    return total
