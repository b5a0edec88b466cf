"""Build a dataset directory from raw inputs: a JSONL/CSV manifest, or the Weibo dump format.

Every input row ends up either in a split or in ``quarantine.jsonl`` with its reason;
``read = kept + quarantined`` is checked before anything is reported. A row is usable
when it has a post id not used before, an image file that really decodes (the same
:func:`~sgmft.data.preprocess.image_pixels` the model uses), and a label from the label
set. Splits come from the input where given, otherwise a seeded stratified split.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from sgmft.data import schema
from sgmft.data.labels import LabelError, check_labels
from sgmft.data.schema import DatasetError
from sgmft.data.weibo import BadWeiboRecord, clean_text, image_name, parse_weibo_dump

KINDS = ("manifest", "weibo")
MANIFEST_FIELDS = ("post_id", "text", "image", "label", "split")
_CHECK_IMAGE_SIZE = 32
"""Decoding at a small size proves the file decodes without paying for a large resize."""


@dataclass
class RawPost:
    """One input row before checks. ``problem`` set means it is already known unusable."""

    source: str
    post_id: str | None = None
    text: str = ""
    image: str | None = None
    """The image reference as written in the input (a path, or a Weibo image name)."""
    image_path: Path | None = None
    label: str | None = None
    split: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    problem: tuple[str, str] | None = None


def _as_str(value: Any) -> str | None:
    """Input values as strings; None and blank strings mean absent."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value
    elif isinstance(value, (dict, list)):
        text = json.dumps(value, ensure_ascii=False)
    else:
        text = str(value)
    return text if text.strip() else None


# --- manifests ------------------------------------------------------------------------

def _manifest_records(path: Path) -> Iterator[tuple[int, Mapping[str, Any] | str]]:
    """(line number, record) pairs; a record that is not an object comes as an error string."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8-sig") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield number, f"not valid JSON: {exc}"
                    continue
                yield number, record if isinstance(record, dict) else f"expected a JSON object, got {type(record).__name__}"
    elif suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"manifest {path}: not valid JSON: {exc}") from exc
        if not isinstance(records, list):
            raise DatasetError(f"manifest {path}: a .json manifest must be a list of objects")
        for number, record in enumerate(records, 1):
            yield number, record if isinstance(record, dict) else f"expected a JSON object, got {type(record).__name__}"
    elif suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            if reader.fieldnames is None:
                return
            start = reader.line_num + 1
            for record in reader:
                if None in record:  # more cells than header names
                    yield start, f"{len(record[None])} cell(s) beyond the header's {len(reader.fieldnames)} columns"
                else:
                    yield start, record
                start = reader.line_num + 1
    else:
        raise DatasetError(f"manifest {path}: unknown format {suffix!r} (use .jsonl, .json, .csv or .tsv)")


def read_manifest(path: str | Path, image_root: str | Path | None = None,
                  ignored: Counter | None = None) -> Iterator[RawPost]:
    """Rows of a manifest; image paths are relative to ``image_root`` (default: its folder).

    Fields other than :data:`MANIFEST_FIELDS` and ``meta_*`` are counted in ``ignored``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    root = Path(image_root) if image_root is not None else path.parent
    for number, record in _manifest_records(path):
        source = f"{path}:{number}"
        if isinstance(record, str):
            yield RawPost(source, problem=("bad_record", record))
            continue
        for key in record:
            if key not in MANIFEST_FIELDS and not str(key).startswith(schema.META_PREFIX) and ignored is not None:
                ignored[str(key)] += 1
        image = _as_str(record.get("image"))
        yield RawPost(
            source=source,
            # Rows without an id get one from their place in the manifest: stable across rebuilds.
            post_id=_as_str(record.get("post_id")) or f"{path.stem}-{number:06d}",
            text=_as_str(record.get("text")) or "",
            image=image,
            image_path=None if image is None else (Path(image) if Path(image).is_absolute() else root / image),
            label=_as_str(record.get("label")),
            split=_as_str(record.get("split")),
            meta={str(k): _as_str(v) for k, v in record.items() if str(k).startswith(schema.META_PREFIX)},
        )


# --- Weibo dumps ----------------------------------------------------------------------

def load_label_source(path: str | Path) -> dict[str, str]:
    """A post id -> label mapping from CSV/TSV (columns post_id,label), JSON or JSONL."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label source {path} does not exist")
    suffix = path.suffix.lower()
    pairs: list[tuple[Any, Any, str]] = []
    if suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            if not reader.fieldnames or not {"post_id", "label"} <= set(reader.fieldnames):
                raise DatasetError(f"label source {path}: needs a header with post_id and label columns, "
                                   f"got {reader.fieldnames}")
            pairs = [(r["post_id"], r["label"], f"{path}:{reader.line_num}") for r in reader]
    elif suffix in (".json", ".jsonl", ".ndjson"):
        text = path.read_text(encoding="utf-8-sig")
        try:
            data = [json.loads(x) for x in text.splitlines() if x.strip()] if suffix != ".json" else json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"label source {path}: not valid JSON: {exc}") from exc
        if isinstance(data, dict):
            pairs = [(k, v, f"{path}[{k!r}]") for k, v in data.items()]
        elif isinstance(data, list) and all(isinstance(x, dict) and {"post_id", "label"} <= set(x) for x in data):
            pairs = [(x["post_id"], x["label"], f"{path}[{i}]") for i, x in enumerate(data)]
        else:
            raise DatasetError(f"label source {path}: expected an object {{post_id: label}} or "
                               "a list of {\"post_id\": ..., \"label\": ...} objects")
    else:
        raise DatasetError(f"label source {path}: unknown format {suffix!r} (use .csv, .tsv, .json or .jsonl)")
    mapping: dict[str, str] = {}
    for post_id, label, where in pairs:
        key, value = _as_str(post_id), _as_str(label)
        if key is None or value is None:
            raise DatasetError(f"label source {where}: empty post_id or label")
        if mapping.get(key, value) != value:
            raise DatasetError(f"label source {where}: post {key} is labelled both {mapping[key]!r} and {value!r}")
        mapping[key] = value
    return mapping


def index_images(image_root: str | Path) -> dict[str, Path]:
    """File name -> path for every file under ``image_root`` (first in sorted order wins)."""
    root = Path(image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    index: dict[str, Path] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        index.setdefault(path.name, path)
    return index


def read_weibo(paths: Sequence[str | Path], image_root: str | Path, labels_by_id: Mapping[str, str]) -> Iterator[RawPost]:
    """Posts of Weibo dump files with the first listed image that exists in ``image_root``."""
    images = index_images(image_root)
    root = Path(image_root)
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"Weibo dump {path} does not exist")
        for post in parse_weibo_dump(path):
            if isinstance(post, BadWeiboRecord):
                yield RawPost(f"{path}:{post.line}", problem=("bad_record", post.detail))
                continue
            names = [image_name(u) for u in post.image_urls]
            found = next((images[n] for n in names if n in images), None)
            problem = None
            if found is None and names:
                shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
                problem = ("image_missing", f"none of its {len(names)} image(s) ({shown}) is in {root}")
            yield RawPost(
                source=f"{path}:{post.line}",
                post_id=post.post_id,
                text=clean_text(post.text),
                image=None if found is None else found.relative_to(root).as_posix(),
                image_path=found,
                label=labels_by_id.get(post.post_id),
                meta={"meta_publish_time": post.publish_time_ms},
                problem=problem,
            )


# --- checks and writing ---------------------------------------------------------------

class _Checker:
    """Decides, row by row, between kept and quarantined; remembers why."""

    def __init__(self, labels: Sequence[str] | None, unlabeled: bool, max_image_pixels: int, pairs: bool = False):
        from sgmft.data.preprocess import PreprocessSpec

        self.known = set(labels) if labels is not None else None
        self.unlabeled = unlabeled
        self.pairs = pairs
        self.spec = PreprocessSpec(image_size=_CHECK_IMAGE_SIZE, max_image_pixels=max_image_pixels)
        self.kept: list[dict[str, Any]] = []
        self.sources: dict[str, str] = {}
        self.quarantine: list[dict[str, Any]] = []
        self.read = 0

    def add(self, post: RawPost) -> None:
        self.read += 1
        problem, data = (post.problem, None) if post.problem else self._check(post)
        if problem is None:
            self.sources[post.post_id] = post.source
            self.kept.append({"post_id": post.post_id, "text": post.text, "image": data,
                              "label": None if self.pairs else post.label,
                              "split": post.split, "meta_source": post.source, "meta_image": post.image, **post.meta})
        else:
            self.quarantine.append({"source": post.source, "post_id": post.post_id,
                                    "reason": problem[0], "detail": problem[1]})

    def _check(self, post: RawPost) -> tuple[tuple[str, str] | None, bytes | None]:
        """(reason, detail) when unusable, else (None, the image bytes). Cheap checks first."""
        from sgmft.data.preprocess import ImageDecodeError, image_pixels

        if post.post_id is None:
            return ("post_id_missing", "no post_id"), None
        if not post.text and post.image is None:
            return ("empty_post", "neither text nor image"), None
        if post.image is None:
            return ("image_missing", "the post names no image"), None
        if post.split is not None and post.split not in schema.SPLITS:
            return ("split_invalid", f"split {post.split!r} is not one of {list(schema.SPLITS)}"), None
        if self.pairs:
            pass  # an image-text pair needs no label, in any split
        elif post.label is None and not (self.unlabeled and post.split in (None, "test")):
            return ("label_missing", "no label" + (" (train/val rows need one)" if self.unlabeled else "")), None
        elif post.label is not None and self.known is not None and post.label not in self.known:
            return ("label_unknown", f"label {post.label!r} is not in the label set"), None
        try:
            data = post.image_path.read_bytes()
        except FileNotFoundError:
            return ("image_missing", f"image file {post.image_path} does not exist"), None
        except OSError as exc:
            return ("image_unreadable", f"image file {post.image_path}: {exc}"), None
        try:
            image_pixels(data, self.spec)
        except ImageDecodeError as exc:
            return (exc.code, f"{post.image_path}: {exc.message}"), None
        if post.post_id in self.sources:
            return ("post_id_duplicate", f"post_id {post.post_id!r} already used at {self.sources[post.post_id]}"), None
        return None, data


def _meta_schema(rows: Sequence[Mapping[str, Any]]) -> pa.Schema:
    names = sorted({k for row in rows for k in row if k.startswith(schema.META_PREFIX)})
    fields = []
    for name in names:
        type_ = pa.array([row.get(name) for row in rows]).type
        fields.append(pa.field(name, pa.string() if pa.types.is_null(type_) else type_))
    return schema.dataset_schema(fields)


def _checked_arguments(kind: str, labels: Sequence[str] | None, val_frac: float, test_frac: float) -> list[str] | None:
    """The label order asked for, once the arguments of :func:`build_dataset` are checked."""
    if kind not in KINDS:
        raise DatasetError(f"unknown input kind {kind!r}; use one of {list(KINDS)}")
    schema.check_fractions(val_frac, test_frac)
    if labels is None:
        return None
    try:
        return check_labels(labels, "labels")
    except LabelError as exc:
        raise DatasetError(str(exc)) from exc


def build_dataset(
    source: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    kind: str = "manifest",
    *,
    image_root: str | Path | None = None,
    label_source: str | Path | None = None,
    labels: Sequence[str] | None = None,
    seed: int = 0,
    val_frac: float = 0.1,
    test_frac: float = 0.1,
    rows_per_shard: int = schema.DEFAULT_ROWS_PER_SHARD,
    max_image_pixels: int = 40_000_000,
    unlabeled: bool = False,
    pairs: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build a dataset directory from ``source``; return (and save) the build report.

    ``kind="manifest"``: ``source`` is one JSONL/JSON/CSV/TSV file with ``text``, ``image``
    (path relative to ``image_root``, default the manifest's folder, or absolute),
    ``label`` and optional ``post_id``, ``split``, ``meta_*``. ``kind="weibo"``: ``source``
    is one or more dump files, ``image_root`` the image folder and ``label_source`` the
    post id -> label mapping. ``labels`` fixes the label order; by default the sorted
    labels found. ``unlabeled`` builds a prediction set: rows need no label and go to test.
    ``pairs`` builds a pair dataset for ``sgmft pretrain``: rows need no label (any given is
    dropped, the label list is empty) and unsplit rows are split at random like labeled ones.
    """
    labels = _checked_arguments(kind, labels, val_frac, test_frac)
    sources = [source] if isinstance(source, (str, Path)) else list(source)
    ignored: Counter = Counter()
    checker = _Checker(labels, unlabeled, max_image_pixels, pairs)
    for post in _read_posts(kind, sources, image_root, label_source, unlabeled, ignored):
        checker.add(post)
    kept, quarantine = checker.kept, checker.quarantine
    if checker.read != len(kept) + len(quarantine):
        raise RuntimeError(f"build bookkeeping is off: read {checker.read} != kept {len(kept)} + quarantined {len(quarantine)}")

    out = schema.prepare_output_dir(out_dir, overwrite)
    if labels is None or pairs:
        labels = sorted({row["label"] for row in kept if row["label"] is not None})
    _assign_splits(kept, val_frac, test_frac, seed, pairs)
    _write(out, kept, quarantine, labels, rows_per_shard, unlabeled)
    report = {
        "kind": kind,
        "sources": [str(s) for s in sources],
        "image_root": None if image_root is None else str(image_root),
        "label_source": None if label_source is None else str(label_source),
        "seed": seed, "val_frac": val_frac, "test_frac": test_frac, "unlabeled": unlabeled, "pairs": pairs,
        "labels": labels,
        **_tallies(checker, ignored),
    }
    schema.write_json(out / schema.REPORT_FILE, report)
    if not kept:
        raise DatasetError(f"no usable rows among {checker.read} read: all went to {out / schema.QUARANTINE_FILE} "
                           f"({report['quarantine_reasons']})")
    return report


def _tallies(checker: _Checker, ignored: Counter) -> dict[str, Any]:
    """What was read, kept and quarantined, per reason, split and label."""
    kept, quarantine = checker.kept, checker.quarantine
    counts = {s: dict(sorted(Counter(r["label"] or "(unlabeled)" for r in kept if r["split"] == s).items()))
              for s in schema.SPLITS}
    return {
        "read": checker.read, "kept": len(kept), "quarantined": len(quarantine),
        "quarantine_reasons": dict(sorted(Counter(q["reason"] for q in quarantine).items())),
        "splits": {s: sum(c.values()) for s, c in counts.items()},
        "counts": counts,
        "ignored_fields": dict(sorted(ignored.items())),
    }


def _read_posts(kind: str, sources: list[str | Path], image_root: str | Path | None, label_source: str | Path | None,
                unlabeled: bool, ignored: Counter) -> Iterable[RawPost]:
    """The raw posts of a manifest or of Weibo dumps, checked for what each kind needs."""
    if kind == "manifest":
        if len(sources) != 1:
            raise DatasetError(f"a manifest build takes one manifest file, got {len(sources)}")
        return read_manifest(sources[0], image_root, ignored)
    if image_root is None:
        raise DatasetError("a Weibo build needs the image folder (image_root / --images)")
    if label_source is None and not unlabeled:
        raise DatasetError("a Weibo build needs a label source (post id -> label), or unlabeled=True")
    return read_weibo(sources, image_root, load_label_source(label_source) if label_source else {})


def _assign_splits(kept: list[dict[str, Any]], val_frac: float, test_frac: float, seed: int, pairs: bool = False) -> None:
    """Stratified splits for labeled rows (and pairs) the source left unsplit; unlabeled rows go to test."""
    unsplit = [i for i, row in enumerate(kept) if row["split"] is None and (pairs or row["label"] is not None)]
    for i, split in zip(unsplit, schema.stratified_split([kept[i]["label"] for i in unsplit], val_frac, test_frac, seed)):
        kept[i]["split"] = split
    for row in kept:
        row["split"] = row["split"] or "test"


def _write(out: Path, kept: list[dict[str, Any]], quarantine: list[dict[str, Any]], labels: list[str],
           rows_per_shard: int, unlabeled: bool) -> None:
    table_schema = _meta_schema(kept)
    for split in schema.SPLITS:
        rows = [{k: v for k, v in row.items() if k != "split"} for row in kept if row["split"] == split]
        if rows or not unlabeled:  # a labeled dataset always has all three splits
            schema.write_split(rows, out, split, rows_per_shard, table_schema)
    schema.write_labels(out, labels)
    schema.write_quarantine(out, quarantine)
