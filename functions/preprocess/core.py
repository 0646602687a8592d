"""Validate, clean, profile and split one uploaded dataset (CSV or JSON Lines) in a single streaming pass.

No AWS here: the caller gives this module a byte stream and a way to open the split files, and gets back
the manifest (docs/contracts.md, section 2). The cleaning rules are written down in docs/preprocessing.md;
this module is their implementation. Zips of images are preprocessed by `preprocess.images`, which shares
this module's spec, limits, splitting and class checks.

Memory stays flat as the file grows: rows are read one line at a time (with a length limit), handled in
chunks, written straight to the split writers, and profiled with bounded state per column.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import operator
import re
import typing
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from gzip import BadGzipFile
from typing import IO, Any

from common.errors import DatasetRejected
from preprocess.spec import DatasetSpec

SPLITS = ("train", "validation", "test")
FORMATS = ("csv", "jsonl")
MISSING = frozenset({"", "na", "n/a", "nan", "null", "none"})
# Every letter-case spelling of the missing markers, so a marker is found by one set lookup.
_MISSING_ANY_CASE = frozenset(
    "".join(chars)
    for marker in MISSING
    for chars in itertools.product(*({c.lower(), c.upper()} for c in marker))
)
TARGET_NAMES = ("target", "label")
MIN_ROWS = 50
MIN_ROWS_PER_CLASS = 5
MAX_CATEGORIES = 50
MAX_CLASSES = 100
MAX_VOCABULARY = 20_000
CLASSIFICATION_MAX_DISTINCT_NUMERIC = 20
# A column counts as numeric when at most this share of its present values fail to parse; those values
# are treated as missing (counted in the column's stats as `invalid`).
MAX_INVALID_NUMERIC_SHARE = 0.01
# Above this share of unusable rows (wrong field count, broken JSON), the file is rejected, not cleaned.
MAX_BROKEN_ROW_SHARE = 0.1
DELIMITERS = ",;\t|"
# Text read and handled at a time: large enough for C-level maps to pay off, small enough that a block of
# tiny rows (4 bytes of text become ~150 bytes of Python objects) stays a few tens of MB.
BLOCK_CHARS = 256 << 10
SAMPLE_LIMIT = 5
FORMULA_PREFIXES = ("=", "+", "-", "@")
_INTEGER = re.compile(r"^[+-]?\d+$")
_ID_NAME = re.compile(r"(^|[^a-z])(id|uuid|guid|key|index)$|^unnamed", re.IGNORECASE)
_TOKEN = re.compile(r"\w+")
# Text columns are recognised on the first chunk: non-numeric values with this many words on average.
TEXT_MIN_MEAN_TOKENS = 3.0
# A column with this many non-numeric values, more than half of those seen, is not numeric.
SETTLE_NON_NUMERIC = 10_000


# File name endings conveyor takes, and the format each one is read as ("zip": images, preprocess.images).
SUFFIXES = {".csv": "csv", ".csv.gz": "csv", ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".zip": "zip"}
COMPRESSED_SUFFIXES = (".gz", ".zip")
# A compressed upload may inflate to this many times its size (at least MIN_INFLATED_BYTES); more is
# treated as a decompression bomb. CSV and JSON Lines typically compress 5-20x, images hardly at all.
MAX_COMPRESSION_RATIO = 100
MIN_INFLATED_BYTES = 256 << 20


def format_of(key: str) -> str | None:
    """`"csv"`, `"jsonl"` or `"zip"` from the object key's ending; None for a file type conveyor does not
    take."""
    lowered = key.lower()
    return next((fmt for suffix, fmt in SUFFIXES.items() if lowered.endswith(suffix)), None)


@dataclass(frozen=True)
class Limits:
    """What one file may be; anything beyond is quarantined with the limit named (docs/preprocessing.md)."""

    max_columns: int = 2_000
    max_line_chars: int = 1 << 20
    max_bytes: int | None = None  # decompressed bytes (a zip: of its images); set from the object's size
    max_tracked_distinct: int = 2_000_000  # distinct values tracked over all columns together
    max_dedup_rows: int = 1_000_000  # rows whose fingerprints are kept for duplicate detection

    @classmethod
    def for_object(cls, key: str, size: int | None) -> Limits:
        """Limits for one uploaded object: a compressed one (gzip, zip) may inflate only so far."""
        if size is None or not key.lower().endswith(COMPRESSED_SUFFIXES):
            return cls()
        return cls(max_bytes=max(MIN_INFLATED_BYTES, size * MAX_COMPRESSION_RATIO))


def is_missing(value: str) -> bool:
    return value.strip() in _MISSING_ANY_CASE


def tokenize(text: str) -> list[str]:
    """Words of a text value, as training and inference split them (docs/contracts.md, section 2)."""
    return _TOKEN.findall(text.lower())


# A row's cells joined by a separator that CSV and JSON values do not hold unescaped in practice. Its CRC-32
# decides the split (stable across runs and machines); Python's 64-bit hash of it finds duplicates within
# one run (randomised per process, which duplicate detection does not mind).
_JOIN = "\x1f".join
_SPLIT_OF_BUCKET = ("train",) * 8 + ("validation", "test")


def split_of(row: list[str]) -> str:
    """Deterministic 80/10/10 split by a hash of the row, so a re-run writes identical files and
    duplicate rows never straddle train and test."""
    return split_of_bytes(_JOIN(row).encode("utf-8"))


def split_of_bytes(data: bytes) -> str:
    """The split of a record by the CRC-32 of its bytes (a row's joined cells, an image file's bytes)."""
    return _SPLIT_OF_BUCKET[zlib.crc32(data) % 10]


def _sample(row: Iterable[str] | str, limit: int = 200) -> str:
    """A row as it may appear in a report: shortened, and defused so no spreadsheet runs it as a formula."""
    text = row if isinstance(row, str) else ",".join(row)
    text = text[:limit] + ("…" if len(text) > limit else "")
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


class _Source(io.RawIOBase):
    """Passes bytes through while hashing and counting them (the content hash costs no second read),
    enforces the size limit, and turns a broken compressed stream into a rejection."""

    def __init__(self, stream: IO[bytes], max_bytes: int | None) -> None:
        self._stream = stream
        self._max_bytes = max_bytes
        self.sha256 = hashlib.sha256()
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            chunk = self._stream.read(len(buffer))
        except (EOFError, BadGzipFile, zlib.error) as exc:
            raise DatasetRejected(
                f"the compressed file is truncated or corrupt after {self.bytes_read:,} bytes: {exc}",
                bytes_read=self.bytes_read,
            ) from None
        if not chunk:
            return 0
        n = len(chunk)
        buffer[:n] = chunk
        self.sha256.update(chunk)
        self.bytes_read += n
        if self._max_bytes is not None and self.bytes_read > self._max_bytes:
            raise DatasetRejected(
                f"the file is larger than {self._max_bytes:,} bytes once decompressed (a decompression "
                "bomb, or too big for this preprocessing step)",
                limit_bytes=self._max_bytes,
            )
        return n


class _Lines:
    """Complete text lines, a block (about 1 MiB) at a time, with a length limit so one endless line cannot
    fill memory. Line breaks are already normalised to "\n" by the text layer."""

    def __init__(self, text: IO[str], max_chars: int) -> None:
        self._text = text
        self.max_chars = max_chars
        self.number = 0  # lines handed out so far
        self._carry = ""
        self._done = False

    def block(self) -> list[str]:
        """The next complete lines without their line break; [] at the end of the file."""
        while not self._done:
            try:
                data = self._text.read(BLOCK_CHARS)
            except UnicodeDecodeError as exc:
                raise DatasetRejected(
                    f"the file is not UTF-8 text (after line {self.number}): save it as UTF-8",
                    after_line=self.number,
                    detail=str(exc),
                ) from None
            if not data:
                self._done = True
                if not self._carry:
                    return []
                last, self._carry = self._carry, ""
                self.number += 1
                return [last]
            data = self._carry + data
            cut = data.rfind("\n")
            if cut < 0:
                self._carry = data
                self._check(len(data), self.number + 1, data)
                continue
            lines = data[:cut].split("\n")
            self._carry = data[cut + 1 :]
            self._check(len(self._carry), self.number + len(lines) + 1, self._carry)
            if max(map(len, lines)) > self.max_chars:
                index = next(i for i, line in enumerate(lines) if len(line) > self.max_chars)
                self._check(len(lines[index]), self.number + index + 1, lines[index])
            self.number += len(lines)
            return lines
        return []

    def _check(self, length: int, line: int, text: str) -> None:
        if length > self.max_chars:
            raise DatasetRejected(
                f"line {line} is longer than {self.max_chars:,} characters",
                line=line,
                limit_chars=self.max_chars,
                sample=_sample(text),
            )


class _Broken:
    """A record that cannot become a row (e.g. a line that is not JSON), with the reason it is dropped."""

    __slots__ = ("reason", "text")

    def __init__(self, reason: str, text: str) -> None:
        self.reason = reason
        self.text = text


@dataclass
class _Chunk:
    """Consecutive records of the file: rows (or why a record is unusable), the lines to write unchanged
    when the rows came straight from them, and each record's line number."""

    rows: list[list[str] | _Broken]
    lines: list[str | None] | None  # None where a row must be re-serialised
    numbers: list[int] | None  # None: consecutive from `first`
    first: int

    def line(self, index: int) -> int:
        return self.numbers[index] if self.numbers is not None else self.first + index


@dataclass
class _Table:
    header: list[str]
    chunks: Iterator[_Chunk]


def _csv_table(lines: _Lines, delimiter: str) -> _Table:
    """CSV, a block at a time. A block without quotes is split at C speed and, for comma files, its lines
    are written out as they came (the common case, several times faster than parsing and re-serialising);
    a block with quotes is parsed line by line, the csv module taking the quoted lines, together with the
    following ones when a quoted field spans lines."""
    split = operator.methodcaller("split", delimiter)
    passthrough = delimiter == ","

    def parse(block: list[str], first: int) -> _Chunk:
        quoted = list(
            itertools.compress(itertools.count(), map(operator.contains, block, itertools.repeat('"')))
        )
        rows: list[list[str] | _Broken] = list(map(split, block))
        if not quoted:
            return _Chunk(rows, typing.cast(list[str | None], block) if passthrough else None, None, first)
        # Lines with quotes go to the csv module (with the lines a quoted field spans); the others stay split.
        out_rows: list[list[str] | _Broken] = []
        out_lines: list[str | None] = []
        numbers: list[int] = []
        position = 0
        for start in quoted:
            if start < position:
                continue  # already taken by the previous quoted field
            out_rows.extend(rows[position:start])
            out_lines.extend(block[position:start])
            numbers.extend(range(first + position, first + start))
            end = _quoted_group_end(block, start, lines)
            group = [text + "\n" for text in block[start:end]]
            if sum(text.count('"') for text in group) % 2 and _unclosed(group, delimiter):
                raise DatasetRejected(
                    f"a quoted field opened on line {first + start} never closes "
                    f"(checked up to line {first + end - 1})",
                    line=first + start,
                    sample=_sample(block[start]),
                )
            reader = csv.reader(group, delimiter=delimiter)
            for row in reader:
                out_rows.append(row)
                out_lines.append(None)
                numbers.append(first + start + reader.line_num - 1)
            position = end
        if len(rows) < len(block):  # the last quoted field pulled in lines of the next block
            rows.extend(map(split, block[len(rows) :]))
        out_rows.extend(rows[position:])
        out_lines.extend(block[position:])
        numbers.extend(range(first + position, first + len(block)))
        return _Chunk(out_rows, out_lines if passthrough else None, numbers, first)

    first_block = lines.block()
    if not first_block:
        raise DatasetRejected("the file is empty")
    chunk = parse(first_block, 1)
    header = chunk.rows[0]
    assert isinstance(header, list)
    rest = _Chunk(
        chunk.rows[1:],
        None if chunk.lines is None else chunk.lines[1:],
        None if chunk.numbers is None else chunk.numbers[1:],
        chunk.first + 1,
    )

    def chunks() -> Iterator[_Chunk]:
        yield rest
        while True:
            first = lines.number + 1
            block = lines.block()
            if not block:
                return
            yield parse(block, first)

    return _Table([h.strip() for h in header], chunks())


def _quoted_group_end(block: list[str], start: int, lines: _Lines) -> int:
    """The end (exclusive) of the lines a quoted field starting on `block[start]` spans: until its quotes
    balance, at most `max_chars` characters; reads on into the next block when it must."""
    quotes, size, end = block[start].count('"'), len(block[start]), start + 1
    while quotes % 2 and size <= lines.max_chars:
        if end == len(block):
            more = lines.block()
            if not more:
                break
            block.extend(more)
        quotes += block[end].count('"')
        size += len(block[end])
        end += 1
    return end


def _unclosed(group: list[str], delimiter: str) -> bool:
    """Whether the csv module, reading these lines strictly, finds a quoted field still open at the end."""
    try:
        for _ in csv.reader(group, delimiter=delimiter, strict=True):
            pass
    except csv.Error:
        return True
    return False


def _one_newline(text: str) -> str:
    """Line breaks as "\n", as CSV input reads them: the csv writer does not quote a lone "\r", which a
    reader would then take for the end of the row."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _json_cell(value: Any) -> str:
    if value is None:
        return ""
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, str):
        return _one_newline(value)
    if isinstance(value, int | float):
        return json.dumps(value)
    return _one_newline(json.dumps(value, ensure_ascii=False, sort_keys=True))


def _jsonl_table(lines: _Lines, extra_keys: Counter[str]) -> _Table:
    """JSON Lines: the first object's keys are the columns; a key missing later is a missing value, a key
    not in the first object is counted in `extra_keys` (and reported), broken lines are dropped rows."""
    first_block = lines.block()
    if not any(map(str.strip, first_block)):
        raise DatasetRejected("the file is empty")
    records = [_json_record(line) if line.strip() else None for line in first_block]
    start = next((i for i, r in enumerate(records) if isinstance(r, dict)), None)
    if start is None:
        raise DatasetRejected(
            "no line in the first MiB is a JSON object: JSON Lines needs one object per line",
            samples=[_sample(line) for line in first_block if line.strip()][:SAMPLE_LIMIT],
        )
    first_record = records[start]
    assert isinstance(first_record, dict)
    header = list(first_record)
    known = frozenset(header)

    def row(record: dict[str, Any] | str | None, line: str) -> list[str] | _Broken:
        if record is None:
            return []  # a blank line
        if isinstance(record, str):
            return _Broken(record, _sample(line))
        if not known.issuperset(record):
            extra_keys.update(k for k in record if k not in known)
        return [_json_cell(record.get(k)) for k in header]

    def chunks() -> Iterator[_Chunk]:
        yield _Chunk(list(map(row, records, first_block)), None, None, 1)
        while True:
            first = lines.number + 1
            block = lines.block()
            if not block:
                return
            parsed = [_json_record(line) if line.strip() else None for line in block]
            yield _Chunk(list(map(row, parsed, block)), None, None, first)

    return _Table([_one_newline(key) for key in header], chunks())


def _json_record(line: str) -> dict[str, Any] | str:
    try:
        value = json.loads(line)
    except ValueError:
        return "invalid_json"
    return value if isinstance(value, dict) else "not_a_json_object"


class _Column:
    """Profile of one column, fed a chunk of values at a time: type facts over every split, statistics over
    the train split. Every piece of state is bounded.

    While a column has few distinct values (at most `max_distinct`), it only counts them, and its type
    facts and statistics are computed once from the counts (`settle`): each distinct value is parsed once,
    not once per row. A column with more distinct values (a measurement, an identifier, text) folds its
    counts into running totals and from then on parses every chunk.
    """

    def __init__(self, name: str, max_distinct: int) -> None:
        self.name = name
        self.max_distinct = max_distinct
        self.present = 0
        self.missing = 0
        self.non_numeric = 0
        self.non_numeric_examples: list[str] = []
        self.non_integer = 0
        self.formula_like = 0
        self.copy_of_target = True  # equal to the target in every row so far
        # Counts of each present value over every split and over train; None once there are too many.
        # Counts of each present value in train and in the other splits; None once there are too many.
        # (`values`, every split together, is their sum, made at the end.)
        self.train_values: Counter[str] | None = Counter()
        self.other_values: Counter[str] | None = Counter()
        self.values: Counter[str] | None = None
        self.text = False
        # Read as text because a base model is named (not declared, not inferred from words per value): a
        # category after all when it has few distinct values (`_describe_feature`).
        self.text_unless_category = False
        # Set once a column has shown many non-numbers, mostly: it stops parsing values as numbers.
        self.settled_non_numeric = False
        # Train-split statistics: Chan/Welford running mean and sum of squared deviations.
        self.train_count = 0
        self.train_missing = 0
        self.train_numbers = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.low = math.inf
        self.high = -math.inf
        self.vocabulary: Counter[str] = Counter()
        self.vocabulary_pruned = False
        self.token_total = 0
        self.token_max = 0
        self._settled = False

    def observe(self, values: tuple[str, ...], in_train: bool) -> None:
        stripped = list(map(str.strip, values))
        if _MISSING_ANY_CASE.isdisjoint(stripped):
            present = stripped
        else:
            present = [v for v in stripped if v not in _MISSING_ANY_CASE]
        missing = len(stripped) - len(present)
        self.missing += missing
        self.present += len(present)
        if in_train:
            self.train_missing += missing
            self.train_count += len(present)
            if self.text:
                self._add_text(present)
        if self.train_values is not None and self.other_values is not None:
            (self.train_values if in_train else self.other_values).update(present)
            if len(self.train_values) + len(self.other_values) > self.max_distinct:
                self._fold(self.train_values + self.other_values, self.train_values)
                self.train_values = self.other_values = None
            return
        if not present or self.settled_non_numeric:
            return
        try:  # The common case, all at C speed: every present value is a finite number.
            numbers = list(map(float, present))
            if not math.isfinite(sum(numbers)):
                raise ValueError
        except ValueError:
            numbers = self._sort_out(Counter(present))
        else:
            if self.non_integer == 0 and not all(map(float.is_integer, numbers)):
                self.non_integer += 1
        if in_train and numbers:
            self._add_numbers(numbers)
        if self.non_numeric >= SETTLE_NON_NUMERIC and self.non_numeric * 2 > self.present:
            self.settled_non_numeric = True

    def settle(self) -> None:
        """At the end of the pass: type facts and statistics from the counts, if the column still has them."""
        if self.train_values is not None and self.other_values is not None and not self._settled:
            self.values = self.train_values + self.other_values
            self.other_values = None
            self._fold(self.values, self.train_values)
        self._settled = True

    def _fold(self, values: Counter[str], train_values: Counter[str] | None) -> None:
        """Type facts from every split's counted values, train statistics from train's."""
        self._sort_out(values, collect=False)
        if train_values:
            numbers = {v: n for v in train_values if (n := _to_float(v)) is not None}
            if numbers:
                self._add_weighted(list(numbers.values()), [train_values[v] for v in numbers])

    def _sort_out(self, counts: Counter[str], collect: bool = True) -> list[float]:
        """Numbers and non-numbers among counted values, one parse per distinct value; the numbers (each as
        often as counted) when `collect`."""
        numbers: list[float] = []
        for value, count in counts.items():
            number = _to_float(value)
            if number is None:
                self.non_numeric += count
                if len(self.non_numeric_examples) < 3 and value not in self.non_numeric_examples:
                    self.non_numeric_examples.append(_sample(value, 40))
                if value.startswith(FORMULA_PREFIXES):
                    self.formula_like += count
            else:
                if self.non_integer == 0 and not number.is_integer():
                    self.non_integer += 1
                if collect:
                    numbers.extend([number] * count)
        return numbers

    def _add_weighted(self, numbers: list[float], counts: list[int]) -> None:
        n = sum(counts)
        shift = numbers[0]
        deltas = list(map(operator.sub, numbers, itertools.repeat(shift)))
        weighted = list(map(operator.mul, deltas, counts))
        total = sum(weighted)
        batch_m2 = max(sum(map(operator.mul, weighted, deltas)) - total * total / n, 0.0)
        self._merge(n, shift + total / n, batch_m2, min(numbers), max(numbers))

    def _add_numbers(self, numbers: list[float]) -> None:
        n = len(numbers)
        shift = numbers[0]
        deltas = list(map(operator.sub, numbers, itertools.repeat(shift)))
        total = sum(deltas)
        batch_m2 = max(sum(map(operator.mul, deltas, deltas)) - total * total / n, 0.0)
        self._merge(n, shift + total / n, batch_m2, min(numbers), max(numbers))

    def _merge(self, n: int, batch_mean: float, batch_m2: float, low: float, high: float) -> None:
        """Chan et al.'s combination of running and batch mean / sum of squared deviations."""
        seen = self.train_numbers
        combined = seen + n
        delta = batch_mean - self.mean
        self.mean += delta * n / combined
        self.m2 += batch_m2 + delta * delta * seen * n / combined
        self.train_numbers = combined
        self.low = min(self.low, low)
        self.high = max(self.high, high)

    def _add_text(self, present: list[str]) -> None:
        if not present:
            return
        # One regex pass over the chunk: tokens never span the separator.
        tokens = _TOKEN.findall(" \n ".join(present).lower())
        self.token_total += len(tokens)
        self.token_max = max(self.token_max, len(tokenize(max(present, key=len))))
        self.vocabulary.update(tokens)
        if len(self.vocabulary) > 10 * MAX_VOCABULARY:
            # Keep the most frequent tokens; the rare tail cannot make the final vocabulary anyway.
            self.vocabulary = Counter(dict(self.vocabulary.most_common(2 * MAX_VOCABULARY)))
            self.vocabulary_pruned = True

    @staticmethod
    def looks_like_strings(values: tuple[str, ...]) -> bool:
        """Mostly non-numeric values (judged on the first chunk of rows)."""
        present = [v for v in values if not is_missing(v)]
        return bool(present) and sum(_to_float(v) is None for v in present) * 2 >= len(present)

    @staticmethod
    def looks_like_text(values: tuple[str, ...]) -> bool:
        """Mostly non-numeric values with several words each (judged on the first chunk of rows)."""
        present = [v for v in values if not is_missing(v)]
        if not present or sum(_to_float(v) is None for v in present) * 2 < len(present):
            return False
        return sum(len(v.split()) for v in present) / len(present) >= TEXT_MIN_MEAN_TOKENS

    @property
    def numeric(self) -> bool:
        """Numeric, tolerating a few unparseable values (they count as missing)."""
        numbers = self.present - self.non_numeric
        return (
            not self.settled_non_numeric
            and numbers > 0
            and self.non_numeric <= MAX_INVALID_NUMERIC_SHARE * self.present
        )

    @property
    def strictly_numeric(self) -> bool:
        return self.present > 0 and self.non_numeric == 0 and not self.settled_non_numeric

    @property
    def distinct_count(self) -> int | None:
        return None if self.values is None else len(self.values)

    def numeric_stats(self) -> dict[str, Any]:
        n = self.train_numbers
        stats: dict[str, Any] = {
            "count": n,
            "missing": self.train_missing + (self.train_count - n),
            "mean": self.mean if n else 0.0,
            "std": math.sqrt(self.m2 / (n - 1)) if n > 1 else 0.0,
            "min": self.low if n else None,
            "max": self.high if n else None,
        }
        if self.non_numeric:
            stats["invalid"] = self.non_numeric
            stats["invalid_examples"] = self.non_numeric_examples
        return stats

    def categorical_stats(self) -> dict[str, Any]:
        assert self.train_values is not None
        ranked = sorted(self.train_values.items(), key=lambda kv: (-kv[1], kv[0]))
        return {
            "count": self.train_count,
            "missing": self.train_missing,
            "categories": [value for value, _ in ranked[:MAX_CATEGORIES]],
            "truncated": len(ranked) > MAX_CATEGORIES,
        }

    def text_stats(self) -> dict[str, Any]:
        ranked = sorted(self.vocabulary.items(), key=lambda kv: (-kv[1], kv[0]))
        return {
            "count": self.train_count,
            "missing": self.train_missing,
            "mean_tokens": round(self.token_total / self.train_count, 2) if self.train_count else 0.0,
            "max_tokens": self.token_max,  # of the longest value by characters
            "vocabulary": [token for token, _ in ranked[:MAX_VOCABULARY]],
            "truncated": self.vocabulary_pruned or len(ranked) > MAX_VOCABULARY,
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
                columns=header[:100],
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


def _check_header(header: list[str], limits: Limits, delimiter: str | None) -> None:
    if len(header) > limits.max_columns:
        raise DatasetRejected(
            f"the file has {len(header):,} columns; conveyor takes at most {limits.max_columns:,}",
            limit_columns=limits.max_columns,
        )
    if len(header) < 2:
        hint = f" (delimiter detected: {delimiter!r})" if delimiter else ""
        raise DatasetRejected(
            "the header has fewer than two columns: a dataset needs at least one feature and a target" + hint,
            header=[_sample(h, 80) for h in header],
        )
    duplicates = sorted({h for h in header if header.count(h) > 1})
    if duplicates or any(not h for h in header):
        raise DatasetRejected(
            "column names must be non-empty and unique",
            duplicated=duplicates[:20],
            empty_positions=[i + 1 for i, h in enumerate(header) if not h][:20],
        )


def preprocess(
    source: IO[bytes],
    *,
    spec: DatasetSpec,
    open_split: Callable[[str], Any],
    provenance: dict[str, Any],
    fmt: str = "csv",
    limits: Limits | None = None,
) -> dict[str, Any]:
    """Stream `source` once: drop unusable rows, split, profile, and build the manifest.

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
    fmt
        `"csv"` (delimiter sniffed) or `"jsonl"` (one JSON object per line).
    limits
        Size limits; defaults to `Limits()`.

    Returns
    -------
    dict
        The manifest (docs/contracts.md, section 2).

    Raises
    ------
    DatasetRejected
        The file cannot be used for training; the reason says why.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, not {fmt!r}")
    if spec.recipe == "image":
        raise DatasetRejected(
            "conveyor.json says recipe 'image', which trains on a zip of class folders (<class>/<image>), "
            "but this upload is CSV or JSON Lines: upload a .zip, or set recipe to 'tabular' or 'text' "
            "(or remove it)"
        )
    limits = limits or Limits()
    hashing = _Source(source, limits.max_bytes)
    buffered = io.BufferedReader(hashing, buffer_size=1 << 20)
    inferred: list[str] = []
    # Peek, not read: the sniffing sample stays in the stream for the parser.
    head = buffered.peek(64 * 1024)[: 64 * 1024]
    if not head.strip():
        raise DatasetRejected("the file is empty")
    if b"\x00" in head:
        raise DatasetRejected(
            "the file is binary (it contains NUL bytes), or UTF-16 text: upload UTF-8 CSV or JSON Lines",
            first_bytes=head[:16].hex(" "),
        )
    # Universal newlines: LF, CRLF and CR files all read as "\n"-terminated lines.
    text = io.TextIOWrapper(buffered, encoding="utf-8-sig", errors="strict", newline=None)
    lines = _Lines(text, limits.max_line_chars)
    extra_keys: Counter[str] = Counter()
    delimiter: str | None = None
    if fmt == "csv":
        delimiter = _sniff_delimiter(head.decode("utf-8-sig", errors="replace"))
        csv.field_size_limit(max(csv.field_size_limit(), limits.max_line_chars))
        table = _csv_table(lines, delimiter)
    else:
        table = _jsonl_table(lines, extra_keys)
    header = table.header
    _check_header(header, limits, delimiter)
    target_index = _choose_target(header, spec, inferred)
    _check_declared_columns(header, spec)
    max_distinct = max(1_000, min(20_000, limits.max_tracked_distinct // len(header)))
    columns = [_Column(name, max_distinct) for name in header]

    state = _PassState(columns=columns, target_index=target_index, spec=spec, limits=limits)
    with ExitStack() as stack:
        writers, handles = {}, {}
        for split in SPLITS:
            handles[split] = handle = stack.enter_context(open_split(split))
            writers[split] = csv.writer(handle, lineterminator="\n")
            writers[split].writerow(header)
        first = True
        for chunk in table.chunks:
            kept = state.clean(chunk)
            if first:
                _mark_text_columns(columns, kept, target_index, inferred, spec)
                first = False
            for split, part in kept.items():
                if part.lines:
                    handles[split].write("\n".join(part.lines))
                    handles[split].write("\n")
                if part.serialise:
                    writers[split].writerows(part.serialise)
                if part.rows:
                    state.profile(part.rows, in_train=split == "train")

        for column in columns:
            column.settle()
        manifest = _manifest(
            header=header,
            state=state,
            spec=spec,
            inferred=inferred,
            fmt=fmt,
            delimiter=delimiter,
            extra_keys=extra_keys,
            provenance=provenance,
        )
    manifest["content_sha256"] = hashing.sha256.hexdigest()
    manifest["source"]["bytes_read"] = hashing.bytes_read
    manifest["source"]["lines"] = lines.number
    return manifest


@dataclass
class _Kept:
    """The rows of one split in a chunk: all of them (for profiling), as lines to write unchanged, and as
    rows to serialise."""

    rows: list[list[str]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    serialise: list[list[str]] = field(default_factory=list)


@dataclass
class _PassState:
    """Row-level cleaning during the pass: what is kept, what is dropped and why."""

    columns: list[_Column]
    target_index: int
    spec: DatasetSpec
    limits: Limits
    rows_read: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    dropped: Counter[str] = field(default_factory=Counter)
    dropped_lines: dict[str, list[int]] = field(default_factory=dict)
    dropped_samples: dict[str, list[str]] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)
    dedup_complete: bool = True

    def drop(self, reason: str, line: int, sample: list[str] | str) -> None:
        self.dropped[reason] += 1
        lines = self.dropped_lines.setdefault(reason, [])
        if len(lines) < SAMPLE_LIMIT:
            lines.append(line)
            self.dropped_samples.setdefault(reason, []).append(_sample(sample))

    def clean(self, chunk: _Chunk) -> dict[str, _Kept]:
        """Keep or drop each record of a chunk; the kept rows by split."""
        rows = chunk.rows
        if (
            rows
            and set(map(type, rows)) == {list}
            and set(map(len, typing.cast(list[list[str]], rows))) == {len(self.columns)}
        ):
            kept = self._clean_fast(chunk)
            if kept is not None:
                return kept
        return self._clean_each(chunk)

    def _clean_fast(self, chunk: _Chunk) -> dict[str, _Kept] | None:
        """The whole chunk at C speed, for the common case: no missing target, no duplicate, nothing over
        the duplicate-detection cap. None when the chunk is not that case (then each row is looked at)."""
        rows = typing.cast(list[list[str]], chunk.rows)
        labels = list(map(str.strip, map(operator.itemgetter(self.target_index), rows)))
        if not _MISSING_ANY_CASE.isdisjoint(labels):
            return None
        joined = list(map(_JOIN, rows))
        try:
            encoded = list(map(str.encode, joined))
        except UnicodeEncodeError:
            return None
        if self.spec.drop_duplicates:
            keys = list(map(hash, joined))
            if (
                len(self.seen) + len(keys) > self.limits.max_dedup_rows
                or len(set(keys)) != len(keys)
                or not self.seen.isdisjoint(keys)
            ):
                return None
            self.seen.update(keys)
        buckets = list(map(operator.mod, map(zlib.crc32, encoded), itertools.repeat(10)))
        masks = {
            "train": list(map(operator.gt, itertools.repeat(8), buckets)),
            "validation": list(map(operator.eq, buckets, itertools.repeat(8))),
            "test": list(map(operator.eq, buckets, itertools.repeat(9))),
        }
        self.rows_read += len(rows)
        kept = {}
        for split, mask in masks.items():
            part = _Kept(rows=list(itertools.compress(rows, mask)))
            if chunk.lines is None:
                part.serialise = part.rows
            else:
                lines = list(itertools.compress(chunk.lines, mask))
                if None in lines:
                    part.serialise = [row for row, line in zip(part.rows, lines, strict=True) if line is None]
                    part.lines = [line for line in lines if line is not None]
                else:
                    part.lines = typing.cast(list[str], lines)
            self.counts[split] += len(part.rows)
            kept[split] = part
        return kept

    def _clean_each(self, chunk: _Chunk) -> dict[str, _Kept]:
        width, target_index = len(self.columns), self.target_index
        kept = {split: _Kept() for split in SPLITS}
        by_bucket = (kept["train"],) * 8 + (kept["validation"], kept["test"])
        dedup, seen, cap = self.spec.drop_duplicates, self.seen, self.limits.max_dedup_rows
        lines = chunk.lines
        for index, row in enumerate(chunk.rows):
            if type(row) is not list:
                assert isinstance(row, _Broken)
                self.rows_read += 1
                self.drop(row.reason, chunk.line(index), row.text)
                continue
            if len(row) != width:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # a blank line is not a row
                self.rows_read += 1
                self.drop("wrong_number_of_fields", chunk.line(index), row)
                continue
            self.rows_read += 1
            if row[target_index].strip() in _MISSING_ANY_CASE:
                self.drop("missing_target", chunk.line(index), row)
                continue
            joined = _JOIN(row)
            try:
                encoded = joined.encode()
            except UnicodeEncodeError:  # a lone surrogate from a JSON "\\ud800" escape
                self.drop("invalid_unicode", chunk.line(index), row)
                continue
            if dedup:
                key = hash(joined)
                if key in seen:
                    self.drop("duplicate_row", chunk.line(index), row)
                    continue
                if len(seen) < cap:
                    seen.add(key)
                else:
                    self.dedup_complete = False
            part = by_bucket[zlib.crc32(encoded) % 10]
            part.rows.append(row)
            line = None if lines is None else lines[index]
            if line is None:
                part.serialise.append(row)
            else:
                part.lines.append(line)
        for split, part in kept.items():
            self.counts[split] += len(part.rows)
        return kept

    def profile(self, rows: list[list[str]], in_train: bool) -> None:
        by_column = list(zip(*rows, strict=True))
        target_values = by_column[self.target_index]
        for index, (column, values) in enumerate(zip(self.columns, by_column, strict=True)):
            column.observe(values, in_train)
            if index != self.target_index and column.copy_of_target and values != target_values:
                column.copy_of_target = False


def _check_declared_columns(header: list[str], spec: DatasetSpec) -> None:
    unknown = [name for name in spec.columns if name not in header]
    if unknown:
        raise DatasetRejected(
            f"conveyor.json: columns names {', '.join(map(repr, unknown))}, not in this file's header",
            header=header[:100],
        )


def _mark_text_columns(
    columns: list[_Column],
    kept: dict[str, _Kept],
    target_index: int,
    inferred: list[str],
    spec: DatasetSpec,
) -> None:
    """Say which columns are text, from the first chunk: conveyor.json's ``columns`` first; with a base
    model, every mostly non-numeric column (`_describe_feature` keeps few-valued ones as categories); else
    the columns of several words per value."""
    rows = [row for split in SPLITS for row in kept[split].rows]
    by_column = list(zip(*rows, strict=True)) if rows else [()] * len(columns)
    for index, values in enumerate(by_column):
        column = columns[index]
        if index == target_index:
            continue
        declared = spec.columns.get(column.name)
        if declared == "text":
            column.text = True
            inferred.append(f"text: column {column.name!r} (conveyor.json columns)")
        elif declared is not None:
            continue
        elif column.looks_like_text(values):
            column.text = True
            inferred.append(f"text: column {column.name!r} (several words per value)")
        elif spec.base_model is not None and column.looks_like_strings(values):
            column.text = column.text_unless_category = True


def _manifest(
    *,
    header: list[str],
    state: _PassState,
    spec: DatasetSpec,
    inferred: list[str],
    fmt: str,
    delimiter: str | None,
    extra_keys: Counter[str],
    provenance: dict[str, Any],
) -> dict[str, Any]:
    counts, dropped, rows_read = state.counts, state.dropped, state.rows_read
    columns, target_index = state.columns, state.target_index
    used = sum(counts.values())
    broken = sum(dropped[r] for r in ("wrong_number_of_fields", "invalid_json", "not_a_json_object"))
    if rows_read and broken > rows_read * MAX_BROKEN_ROW_SHARE:
        reasons = {r: dropped[r] for r in ("wrong_number_of_fields", "invalid_json", "not_a_json_object")}
        what = (
            f"a different number of fields than the header ({len(header)}, delimiter {delimiter!r})"
            if fmt == "csv"
            else "lines that are not JSON objects"
        )
        raise DatasetRejected(
            f"{broken:,} of {rows_read:,} rows have {what}",
            dropped={r: n for r, n in reasons.items() if n},
            lines=state.dropped_lines,
            samples=state.dropped_samples,
        )
    if used < MIN_ROWS:
        raise DatasetRejected(
            f"only {used} usable rows (need at least {MIN_ROWS})",
            rows_read=rows_read,
            dropped=dict(dropped),
            lines=state.dropped_lines,
            samples=state.dropped_samples,
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
        described.append(_describe_feature(column, rows=used, declared=spec.columns.get(column.name)))
    features = [c for c in described if c["role"] == "feature"]
    if not features:
        raise DatasetRejected(
            "no usable feature columns",
            columns={c["name"]: c.get("reason") for c in described[:100]},
        )

    target_entry: dict[str, Any] = {"name": target.name, "role": "target"}
    labels: list[Any] | None = None
    if task == "classification":
        labels = _check_classes(target)
        assert target.train_values is not None
        target_entry.update(
            type="categorical",
            stats={"count": target.train_count, "class_counts": dict(sorted(target.train_values.items()))},
        )
    else:
        target_entry.update(type="numeric", stats=target.numeric_stats())

    manifest: dict[str, Any] = {
        "schema_version": 1,
        "dataset": provenance["dataset"],
        "version": provenance["version"],
        "source": dict(provenance["source"]),
        "format": fmt,
        "delimiter": delimiter or ",",
        "task": task,
        "recipe": _choose_recipe(features, spec, inferred),
        "target": target.name,
    }
    if labels is not None:
        manifest["labels"] = labels
    ordered = [*described[:target_index], target_entry, *described[target_index:]]
    warnings = _warnings(columns, target_index, state, extra_keys)
    manifest.update(
        columns=ordered,
        counts={"rows_read": rows_read, "rows_used": used, **counts},
        dropped=dict(dropped),
        dropped_lines=state.dropped_lines,
        duplicates_checked="all rows"
        if state.dedup_complete
        else f"the first {state.limits.max_dedup_rows:,} distinct rows",
        inferred=inferred,
        warnings=warnings,
    )
    if not spec.drop_duplicates:
        manifest["duplicates_checked"] = "off (conveyor.json drop_duplicates: false)"
    return manifest


def _choose_recipe(features: list[dict[str, Any]], spec: DatasetSpec, inferred: list[str]) -> str:
    text = [c["name"] for c in features if c.get("type") == "text"]
    if spec.base_model is not None:
        if not text:
            raise DatasetRejected(
                f"conveyor.json names base_model {spec.base_model!r}, which reads text, but no feature column "
                'is text: declare one, e.g. "columns": {"title": "text"}',
                features={c["name"]: c.get("type") for c in features[:100]},
            )
        inferred.append(
            f"recipe: pretrained (base_model {spec.base_model!r} reads {', '.join(map(repr, text))})"
        )
        return "pretrained"
    if spec.recipe == "text" and not text:
        raise DatasetRejected(
            "conveyor.json says recipe 'text', but no feature column is free text (several words per "
            "value): set recipe to 'tabular', or remove it",
            features={c["name"]: c.get("type") for c in features[:100]},
        )
    if spec.recipe is not None:
        inferred.append(f"recipe: {spec.recipe} from conveyor.json")
        return spec.recipe
    if text:
        inferred.append(f"recipe: text (free-text column {', '.join(map(repr, text))})")
        return "text"
    inferred.append("recipe: tabular (no free-text column)")
    return "tabular"


def _check_classes(target: _Column) -> list[Any]:
    if target.distinct_count is None or target.distinct_count > MAX_CLASSES:
        raise DatasetRejected(
            f"the target {target.name!r} has more than {MAX_CLASSES} classes; "
            'set "task": "regression" in conveyor.json if it is a number'
        )
    assert target.values is not None
    return check_classes(target.name, target.train_values or Counter(), target.values)


def check_classes(
    target: str, train_counts: Mapping[str, int], counts: Mapping[str, int], unit: str = "rows"
) -> list[Any]:
    """The labels of a classification target, once it passes the classification checks.

    Parameters
    ----------
    target
        The target's name, for the reasons.
    train_counts, counts
        How often each class occurs in the train split, and in every split together.
    unit
        What a class holds, for the reasons ("rows", "images").

    Returns
    -------
    list
        The classes in sorted order: integers when every class is an integer literal, else the strings.

    Raises
    ------
    DatasetRejected
        A single class in train, or a class with fewer than MIN_ROWS_PER_CLASS `unit` over every split.
    """
    class_counts = dict(sorted(train_counts.items()))
    if len(class_counts) < 2:
        raise DatasetRejected(
            # The class itself is a value of the data: it goes to the report (class_counts), not into the
            # reason, which is logged.
            f"the target {target!r} has a single class in the training split: nothing to learn "
            "(the report's class_counts shows it)",
            class_counts=class_counts,
        )
    rare = {label: n for label, n in counts.items() if n < MIN_ROWS_PER_CLASS}
    if rare:
        raise DatasetRejected(
            f"{len(rare)} class(es) of the target {target!r} have fewer than {MIN_ROWS_PER_CLASS} "
            f"{unit}, too few to train and test on: add {unit}, merge those classes, or remove them",
            rare_classes=dict(sorted(rare.items())[:20]),
        )
    all_labels = sorted(counts)
    if all(_INTEGER.match(v) for v in all_labels):
        return sorted({int(v) for v in all_labels})
    return all_labels


def _warnings(
    columns: list[_Column], target_index: int, state: _PassState, extra_keys: Counter[str]
) -> list[str]:
    warnings = []
    for column in columns:
        if column.formula_like:
            warnings.append(
                f"column {column.name!r}: {column.formula_like} value(s) start with = + - or @ and would run "
                "as formulas if the split files were opened in a spreadsheet; they are kept as text"
            )
        if column.numeric and column.non_numeric and column is not columns[target_index]:
            warnings.append(
                f"column {column.name!r}: {column.non_numeric} value(s) are not numbers "
                f"(e.g. {', '.join(map(repr, column.non_numeric_examples))}) and are treated as missing"
            )
    if extra_keys:
        keys = ", ".join(f"{k!r} ({n})" for k, n in extra_keys.most_common(10))
        warnings.append(f"keys absent from the first JSON object are ignored: {keys}")
    if not state.dedup_complete:
        warnings.append(
            f"duplicate rows were detected among the first {state.limits.max_dedup_rows:,} distinct rows only"
        )
    return warnings


def _choose_task(target: _Column, spec: DatasetSpec, inferred: list[str]) -> str:
    distinct = target.distinct_count
    if spec.task:
        if spec.task == "regression" and not target.strictly_numeric:
            raise DatasetRejected(
                f"conveyor.json says regression, but target {target.name!r} is not numeric",
                examples=target.non_numeric_examples,
            )
        inferred.append(f"task: {spec.task} from conveyor.json")
        return spec.task
    if not target.strictly_numeric:
        inferred.append(f"task: classification (target {target.name!r} is not numeric)")
        return "classification"
    if target.non_integer == 0 and distinct is not None and distinct <= CLASSIFICATION_MAX_DISTINCT_NUMERIC:
        inferred.append(f"task: classification ({distinct} distinct integer values)")
        return "classification"
    inferred.append("task: regression (numeric target with many distinct values)")
    return "regression"


def _describe_feature(column: _Column, rows: int, declared: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": column.name}
    distinct = column.distinct_count
    if declared == "ignore":
        return {**entry, "role": "ignored", "reason": "conveyor.json columns: ignore"}
    if column.present == 0:
        return {**entry, "role": "ignored", "reason": "every value is missing"}
    if distinct == 1:
        return {**entry, "role": "ignored", "reason": "the same value in every row"}
    if column.copy_of_target:
        return {**entry, "role": "ignored", "reason": "a copy of the target (it would leak the answer)"}
    unique_per_row = distinct is not None and distinct == column.present and column.present >= 20
    if declared is not None:
        return _declared_feature(column, entry, declared)
    if column.text_unless_category:
        if distinct is not None and distinct <= MAX_CATEGORIES:
            return {**entry, "role": "feature", "type": "categorical", "stats": column.categorical_stats()}
        if unique_per_row and _ID_NAME.search(column.name):
            return {
                **entry,
                "role": "ignored",
                "reason": 'identifier-like: a distinct value in every row (declare it "text" in '
                "conveyor.json columns to read it)",
            }
    if column.text:
        return {**entry, "role": "feature", "type": "text", "stats": column.text_stats()}
    if column.numeric:
        many = unique_per_row or distinct is None  # distinct per row, or too many distinct values to track
        if many and column.non_integer == 0 and _ID_NAME.search(column.name):
            return {**entry, "role": "ignored", "reason": "identifier-like: a distinct integer in every row"}
        return {**entry, "role": "feature", "type": "numeric", "stats": column.numeric_stats()}
    if unique_per_row or (distinct is None and _ID_NAME.search(column.name)):
        return {**entry, "role": "ignored", "reason": "identifier-like: a distinct value in every row"}
    if distinct is None or distinct > max(MAX_CATEGORIES * 4, rows // 2):
        return {
            **entry,
            "role": "ignored",
            "reason": f"high-cardinality text ({distinct or 'too many'} distinct values, few words each)",
        }
    return {**entry, "role": "feature", "type": "categorical", "stats": column.categorical_stats()}


def _declared_feature(column: _Column, entry: dict[str, Any], declared: str) -> dict[str, Any]:
    """A feature as conveyor.json's ``columns`` declares it, or DatasetRejected when the values disagree."""
    if declared == "text":
        return {**entry, "role": "feature", "type": "text", "stats": column.text_stats()}
    if declared == "numeric":
        if not column.numeric:
            raise DatasetRejected(
                f"conveyor.json says column {column.name!r} is numeric, but {column.non_numeric} of its "
                'values are not numbers: fix them, or declare it "categorical" or "text"',
                examples=column.non_numeric_examples,
            )
        return {**entry, "role": "feature", "type": "numeric", "stats": column.numeric_stats()}
    if column.train_values is None:
        raise DatasetRejected(
            f"conveyor.json says column {column.name!r} is categorical, but it has more distinct values than "
            f'conveyor tracks ({column.max_distinct:,}): declare it "text" or "ignore"',
        )
    return {**entry, "role": "feature", "type": "categorical", "stats": column.categorical_stats()}
