"""Validate, profile and split one uploaded CSV in a single streaming pass. No AWS here: the handler gives
this module a byte stream and a way to open the split files, and gets back the manifest (docs/contracts.md).
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import IO, Any

from common.errors import DatasetRejected

SPLITS = ("train", "validation", "test")
MISSING = frozenset({"", "na", "n/a", "nan", "null", "none"})
TARGET_NAMES = ("target", "label")
MIN_ROWS = 50
MAX_CATEGORIES = 50
MAX_TRACKED_DISTINCT = 20_000
MAX_CLASSES = 100
CLASSIFICATION_MAX_DISTINCT_NUMERIC = 20
DELIMITERS = ",;\t|"
_INTEGER = re.compile(r"^[+-]?\d+$")
_ID_NAME = re.compile(r"(^|[^a-z])(id|uuid|guid|key|index)$|^unnamed", re.IGNORECASE)


@dataclass(frozen=True)
class DatasetSpec:
    """What the user said about the dataset in `conveyor.json` (all optional)."""

    target: str | None = None
    task: str | None = None
    metric: str | None = None
    threshold: float | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, document: Any) -> DatasetSpec:
        if not isinstance(document, dict):
            raise DatasetRejected("conveyor.json must be a JSON object")
        unknown = set(document) - {"target", "task", "metric", "threshold", "hyperparameters"}
        if unknown:
            raise DatasetRejected(f"conveyor.json has unknown keys: {', '.join(sorted(unknown))}")
        task = document.get("task")
        if task not in (None, "classification", "regression"):
            raise DatasetRejected(
                f"conveyor.json: task must be 'classification' or 'regression', not {task!r}"
            )
        threshold = document.get("threshold")
        if threshold is not None and not isinstance(threshold, int | float):
            raise DatasetRejected("conveyor.json: threshold must be a number")
        hps = document.get("hyperparameters") or {}
        if not isinstance(hps, dict):
            raise DatasetRejected("conveyor.json: hyperparameters must be an object")
        return cls(
            target=document.get("target"),
            task=task,
            metric=document.get("metric"),
            threshold=None if threshold is None else float(threshold),
            hyperparameters=hps,
        )


def is_missing(value: str) -> bool:
    return value.strip().lower() in MISSING


def split_of(row: list[str]) -> str:
    """Deterministic 80/10/10 split by a hash of the row, so a re-run writes identical files and
    duplicate rows never straddle train and test."""
    digest = hashlib.blake2b("\x1f".join(row).encode("utf-8"), digest_size=8).digest()
    bucket = int.from_bytes(digest, "big") % 10
    return "train" if bucket < 8 else ("validation" if bucket == 8 else "test")


class _HashingReader(io.RawIOBase):
    """Passes bytes through while hashing them, so the content hash costs no second read."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self.sha256 = hashlib.sha256()
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._stream.read(len(buffer))
        if not chunk:
            return 0
        n = len(chunk)
        buffer[:n] = chunk
        self.sha256.update(chunk)
        self.bytes_read += n
        return n


class _Column:
    """Running profile of one column: types over all rows, statistics over the train split."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.present = 0
        self.missing = 0
        self.non_numeric = 0
        self.non_integer = 0
        self.distinct: set[str] | None = set()
        # Welford's running mean/variance over train rows.
        self.train_count = 0
        self.train_missing = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.low = math.inf
        self.high = -math.inf
        self.train_values: Counter[str] = Counter()

    def observe(self, value: str, in_train: bool) -> None:
        value = value.strip()
        if value.lower() in MISSING:
            self.missing += 1
            if in_train:
                self.train_missing += 1
            return
        self.present += 1
        if self.distinct is not None:
            self.distinct.add(value)
            if len(self.distinct) > MAX_TRACKED_DISTINCT:
                self.distinct = None
        number = _to_float(value)
        if number is None:
            self.non_numeric += 1
        elif not _INTEGER.match(value) and not number.is_integer():
            self.non_integer += 1
        if in_train:
            self.train_count += 1
            if len(self.train_values) < MAX_TRACKED_DISTINCT or value in self.train_values:
                self.train_values[value] += 1
            if number is not None:
                delta = number - self.mean
                self.mean += delta / self.train_count
                self.m2 += delta * (number - self.mean)
                self.low = min(self.low, number)
                self.high = max(self.high, number)

    @property
    def numeric(self) -> bool:
        return self.present > 0 and self.non_numeric == 0

    @property
    def distinct_count(self) -> int | None:
        return None if self.distinct is None else len(self.distinct)

    def numeric_stats(self) -> dict[str, Any]:
        std = math.sqrt(self.m2 / (self.train_count - 1)) if self.train_count > 1 else 0.0
        return {
            "count": self.train_count,
            "missing": self.train_missing,
            "mean": self.mean if self.train_count else 0.0,
            "std": std,
            "min": self.low if self.train_count else None,
            "max": self.high if self.train_count else None,
        }

    def categorical_stats(self) -> dict[str, Any]:
        ranked = sorted(self.train_values.items(), key=lambda kv: (-kv[1], kv[0]))
        return {
            "count": self.train_count,
            "missing": self.train_missing,
            "categories": [value for value, _ in ranked[:MAX_CATEGORIES]],
            "truncated": len(ranked) > MAX_CATEGORIES,
        }


def _to_float(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _sniff_delimiter(sample: str) -> str:
    try:
        return csv.Sniffer().sniff(sample, delimiters=DELIMITERS).delimiter
    except csv.Error:
        return ","


def _choose_target(header: list[str], spec: DatasetSpec, inferred: list[str]) -> int:
    if spec.target is not None:
        if spec.target not in header:
            raise DatasetRejected(
                f"conveyor.json names target column {spec.target!r}, which is not in the header",
                columns=header,
            )
        inferred.append(f"target: {spec.target!r} from conveyor.json")
        return header.index(spec.target)
    for candidate in TARGET_NAMES:
        for i, name in enumerate(header):
            if name.strip().lower() == candidate:
                inferred.append(f"target: column {name!r} (named {candidate!r})")
                return i
    inferred.append(
        f"target: last column {header[-1]!r} (no conveyor.json target, no 'target' or 'label' column)"
    )
    return len(header) - 1


def _records(text: IO[str], delimiter: str) -> Iterator[tuple[int, list[str]]]:
    reader = csv.reader(text, delimiter=delimiter)
    for row in reader:
        yield reader.line_num, row


def preprocess(
    source: IO[bytes],
    *,
    spec: DatasetSpec,
    open_split: Callable[[str], Any],
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """Stream `source` (CSV bytes) once: drop unusable rows, split, profile, and build the manifest.

    Parameters
    ----------
    source
        The uploaded file's bytes (already decompressed).
    spec
        The user's dataset spec; empty when there is none.
    open_split
        `open_split("train")` returns a context manager yielding a text file for that split. If this
        function raises, the context managers exit with the exception, so writers can discard the output.
    provenance
        `dataset`, `version`, `source` (bucket, key, version_id, etag, size): copied into the manifest.

    Returns
    -------
    dict
        The manifest (docs/contracts.md, section 2).

    Raises
    ------
    DatasetRejected
        The file cannot be used for training; the reason says why.
    """
    hashing = _HashingReader(source)
    buffered = io.BufferedReader(hashing, buffer_size=1 << 20)
    inferred: list[str] = []
    # Peek, not read: the sniffing sample stays in the stream for the CSV reader.
    sample = buffered.peek(64 * 1024)[: 64 * 1024].decode("utf-8-sig", errors="replace")
    if not sample.strip():
        raise DatasetRejected("the file is empty")
    delimiter = _sniff_delimiter(sample)
    text = io.TextIOWrapper(buffered, encoding="utf-8-sig", errors="strict", newline="")
    rows = _records(text, delimiter)

    try:
        _, header = next(rows)
    except StopIteration:
        raise DatasetRejected("the file is empty") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetRejected(f"the header line cannot be read as UTF-8 CSV: {exc}") from None
    header = [h.strip() for h in header]
    if len(header) < 2:
        raise DatasetRejected(
            "the header has fewer than two columns: a dataset needs at least one feature and a target",
            header=header,
            delimiter=delimiter,
        )
    duplicates = sorted({h for h in header if header.count(h) > 1})
    if duplicates or any(not h for h in header):
        raise DatasetRejected(
            "column names must be non-empty and unique", duplicated=duplicates, header=header
        )
    target_index = _choose_target(header, spec, inferred)
    columns = [_Column(name) for name in header]
    dropped: Counter[str] = Counter()
    dropped_samples: dict[str, list[int]] = {}
    counts = dict.fromkeys(SPLITS, 0)
    rows_read = 0

    def drop(reason: str, line: int) -> None:
        dropped[reason] += 1
        dropped_samples.setdefault(reason, [])
        if len(dropped_samples[reason]) < 5:
            dropped_samples[reason].append(line)

    with ExitStack() as stack:
        writers = {}
        for split in SPLITS:
            handle = stack.enter_context(open_split(split))
            writers[split] = csv.writer(handle, lineterminator="\n")
            writers[split].writerow(header)
        try:
            for line, row in rows:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                rows_read += 1
                if len(row) != len(header):
                    drop("wrong_number_of_fields", line)
                    continue
                if is_missing(row[target_index]):
                    drop("missing_target", line)
                    continue
                split = split_of(row)
                counts[split] += 1
                in_train = split == "train"
                for column, value in zip(columns, row, strict=True):
                    column.observe(value, in_train)
                writers[split].writerow(row)
        except UnicodeDecodeError as exc:
            raise DatasetRejected(
                "the file is not UTF-8 text", byte_offset=hashing.bytes_read, detail=str(exc)
            ) from None
        except csv.Error as exc:
            raise DatasetRejected(f"the CSV cannot be parsed: {exc}") from None

        manifest = _manifest(
            header=header,
            target_index=target_index,
            columns=columns,
            spec=spec,
            counts=counts,
            rows_read=rows_read,
            dropped=dropped,
            dropped_samples=dropped_samples,
            inferred=inferred,
            delimiter=delimiter,
            provenance=provenance,
        )
    manifest["content_sha256"] = hashing.sha256.hexdigest()
    manifest["source"]["bytes_read"] = hashing.bytes_read
    return manifest


def _manifest(
    *,
    header: list[str],
    target_index: int,
    columns: list[_Column],
    spec: DatasetSpec,
    counts: dict[str, int],
    rows_read: int,
    dropped: Counter[str],
    dropped_samples: dict[str, list[int]],
    inferred: list[str],
    delimiter: str,
    provenance: dict[str, Any],
) -> dict[str, Any]:
    used = sum(counts.values())
    if used < MIN_ROWS:
        raise DatasetRejected(
            f"only {used} usable rows (need at least {MIN_ROWS})",
            rows_read=rows_read,
            dropped=dict(dropped),
            dropped_lines=dropped_samples,
        )
    if dropped["wrong_number_of_fields"] > rows_read * 0.1:
        raise DatasetRejected(
            f"{dropped['wrong_number_of_fields']} of {rows_read} rows have a different number of fields "
            f"than the header ({len(header)}, delimiter {delimiter!r})",
            lines=dropped_samples.get("wrong_number_of_fields"),
        )
    empty = [split for split, n in counts.items() if n == 0]
    if empty:
        raise DatasetRejected(f"the {', '.join(empty)} split is empty: add more rows", counts=counts)

    target = columns[target_index]
    task = _choose_task(target, spec, inferred)
    described: list[dict[str, Any]] = []
    for index, column in enumerate(columns):
        if index == target_index:
            continue
        described.append(_describe_feature(column, rows=used))
    features = [c for c in described if c["role"] == "feature"]
    if not features:
        raise DatasetRejected(
            "no usable feature columns",
            columns={c["name"]: c.get("reason") for c in described},
        )

    target_entry: dict[str, Any] = {"name": target.name, "role": "target"}
    labels: list[Any] | None = None
    if task == "classification":
        class_counts = dict(sorted(target.train_values.items()))
        if len(class_counts) < 2:
            raise DatasetRejected(
                f"the target {target.name!r} has a single class in the training split "
                f"({next(iter(class_counts), 'none')!r}): nothing to learn",
                class_counts=class_counts,
            )
        if target.distinct_count is None or target.distinct_count > MAX_CLASSES:
            raise DatasetRejected(
                f"the target {target.name!r} has more than {MAX_CLASSES} classes; "
                'set "task": "regression" in conveyor.json if it is a number'
            )
        assert target.distinct is not None
        all_labels = sorted(target.distinct)
        if all(_INTEGER.match(v) for v in all_labels):
            labels = sorted({int(v) for v in all_labels})
        else:
            labels = all_labels
        target_entry.update(
            type="categorical", stats={"count": target.train_count, "class_counts": class_counts}
        )
    else:
        target_entry.update(type="numeric", stats=target.numeric_stats())

    manifest: dict[str, Any] = {
        "schema_version": 1,
        "dataset": provenance["dataset"],
        "version": provenance["version"],
        "source": dict(provenance["source"]),
        "format": "csv",
        "delimiter": delimiter,
        "task": task,
        "target": target.name,
    }
    if labels is not None:
        manifest["labels"] = labels
    ordered = [*described[:target_index], target_entry, *described[target_index:]]
    manifest.update(
        columns=ordered,
        counts={"rows_read": rows_read, "rows_used": used, **counts},
        dropped=dict(dropped),
        dropped_lines=dropped_samples,
        inferred=inferred,
    )
    return manifest


def _choose_task(target: _Column, spec: DatasetSpec, inferred: list[str]) -> str:
    distinct = target.distinct_count
    if spec.task:
        if spec.task == "regression" and not target.numeric:
            raise DatasetRejected(f"conveyor.json says regression, but target {target.name!r} is not numeric")
        inferred.append(f"task: {spec.task} from conveyor.json")
        return spec.task
    if not target.numeric:
        inferred.append(f"task: classification (target {target.name!r} is not numeric)")
        return "classification"
    if target.non_integer == 0 and distinct is not None and distinct <= CLASSIFICATION_MAX_DISTINCT_NUMERIC:
        inferred.append(f"task: classification ({distinct} distinct integer values)")
        return "classification"
    inferred.append("task: regression (numeric target with many distinct values)")
    return "regression"


def _describe_feature(column: _Column, rows: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": column.name}
    distinct = column.distinct_count
    if column.present == 0:
        return {**entry, "role": "ignored", "reason": "every value is missing"}
    if distinct == 1:
        return {**entry, "role": "ignored", "reason": "the same value in every row"}
    unique_per_row = distinct is not None and distinct == column.present and column.present >= 20
    if column.numeric:
        if unique_per_row and column.non_integer == 0 and _ID_NAME.search(column.name):
            return {**entry, "role": "ignored", "reason": "identifier-like: a distinct integer in every row"}
        return {**entry, "role": "feature", "type": "numeric", "stats": column.numeric_stats()}
    if unique_per_row:
        return {**entry, "role": "ignored", "reason": "identifier-like: a distinct value in every row"}
    if distinct is None or distinct > max(MAX_CATEGORIES * 4, rows // 2):
        return {
            **entry,
            "role": "ignored",
            "reason": f"free text or high-cardinality ({distinct or 'many'} values)",
        }
    return {**entry, "role": "feature", "type": "categorical", "stats": column.categorical_stats()}
