"""The processed splits as the training job reads them: the manifest, and the CSV parts of each split
(docs/contracts.md, sections 2 and 3). Training only: serving reads requests, not channels (`data`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data import TASKS, DataError, is_missing


def read_manifest(channel: str | Path) -> dict[str, Any]:
    """Read and check the manifest from the ``manifest`` channel.

    Parameters
    ----------
    channel
        The channel directory (holding ``manifest.json``) or the file itself.

    Returns
    -------
    dict
        The manifest, checked for what training needs: task, target, labels and feature statistics.

    Raises
    ------
    DataError
        When there is no manifest, it is not JSON, or it lacks what training needs.
    """
    path = Path(channel)
    if path.is_dir():
        found = (
            [path / "manifest.json"] if (path / "manifest.json").is_file() else sorted(path.rglob("*.json"))
        )
        if len(found) != 1:
            raise DataError(
                f"manifest channel {path}: expected one manifest.json, found {len(found)} JSON files"
            )
        path = found[0]
    elif not path.is_file():
        raise DataError(f"manifest channel {path} does not exist")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None
    _check_manifest(manifest, path)
    return manifest  # type: ignore[no-any-return]


def _check_manifest(manifest: Any, path: Path) -> None:
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: the manifest is not a JSON object")
    for key in ("task", "target", "columns"):
        if key not in manifest:
            raise DataError(f"{path}: the manifest has no {key!r}")
    if manifest["task"] not in TASKS:
        raise DataError(f"{path}: task {manifest['task']!r} is not one of {', '.join(TASKS)}")
    if manifest["task"] == "classification":
        labels = manifest.get("labels")
        if not isinstance(labels, list) or len(labels) < 2:
            raise DataError(f"{path}: a classification manifest needs at least two labels, got {labels!r}")
    features = [c for c in manifest["columns"] if c.get("role") == "feature"]
    if not features:
        raise DataError(f"{path}: the manifest has no feature columns")
    needs = {"numeric": ("mean", "std"), "categorical": ("categories",), "text": ("vocabulary",), "image": ()}
    for column in features:
        stats = column.get("stats") or {}
        needed = needs.get(column.get("type"))
        vocabulary = stats.get("vocabulary", [])
        if (
            needed is None
            or any(k not in stats for k in needed)
            or not isinstance(vocabulary, list)
            or not all(isinstance(token, str) for token in vocabulary)
        ):
            raise DataError(
                f"{path}: feature {column.get('name')!r} needs type numeric (stats mean, std), "
                "categorical (stats categories), text (stats vocabulary, a list of tokens) or image"
            )


@dataclass
class Split:
    """One split's columns as lists of the original strings, read from every ``*.csv`` of its channel."""

    name: str
    columns: dict[str, list[Any]] = field(default_factory=dict)
    rows: int = 0
    # Where each row came from, for messages (an image split's entry names); empty for CSV splits.
    entries: list[str] = field(default_factory=list)

    def drop_missing(self, column: str) -> int:
        """Drop the rows whose `column` is missing; return how many were dropped."""
        keep = [not is_missing(v) for v in self.columns[column]]
        dropped = keep.count(False)
        if dropped:
            self.columns = {
                name: [v for v, k in zip(values, keep, strict=True) if k]
                for name, values in self.columns.items()
            }
            self.rows -= dropped
        return dropped


def read_split(channel: str | Path, name: str, columns: Sequence[str], delimiter: str = ",") -> Split:
    """Read the `columns` of every CSV file in a channel directory.

    Parameters
    ----------
    channel
        The channel directory; its ``*.csv`` files (any depth, in name order) have a header row.
    name
        The split's name, for messages.
    columns
        The columns to keep (features and target); every file must have them all.
    delimiter
        The source file's delimiter from the manifest, tried when a header does not parse with commas.

    Returns
    -------
    Split
        The values as strings, exactly as in the files.

    Raises
    ------
    DataError
        When the channel is missing or empty, or a file lacks one of `columns`.
    """
    directory = Path(channel)
    if not directory.is_dir():
        raise DataError(f"{name} channel {directory} does not exist")
    files = sorted(p for p in directory.rglob("*.csv") if p.is_file())
    if not files:
        raise DataError(f"{name} channel {directory} holds no .csv files")
    split = Split(name, {column: [] for column in columns})
    for path in files:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            layout = _header_layout(handle, path, name, columns, delimiter)
            if layout is None:
                continue
            positions, file_delimiter = layout
            for record in csv.reader(handle, delimiter=file_delimiter):
                if not record or (len(record) == 1 and not record[0].strip()):
                    continue
                for column, index in positions.items():
                    # A short row leaves its last cells missing rather than shifting columns.
                    split.columns[column].append(record[index] if index < len(record) else "")
                split.rows += 1
    if split.rows == 0:
        raise DataError(f"{name} split is empty: no data rows in {', '.join(str(p) for p in files)}")
    return split


def _header_layout(
    handle: Any, path: Path, name: str, columns: Sequence[str], delimiter: str
) -> tuple[dict[str, int], str] | None:
    # Each column's position and the file's delimiter; None for an empty file.
    line = handle.readline()
    if not line.strip():
        return None
    # Preprocessing writes splits with commas; the source's delimiter is the fallback for hand-made splits.
    for candidate in dict.fromkeys([",", delimiter or ","]):
        header = [h.strip() for h in next(csv.reader([line], delimiter=candidate))]
        absent = [c for c in columns if c not in header]
        if not absent:
            return {c: header.index(c) for c in columns}, candidate
    raise DataError(f"{name} split: {path.name} has no column {absent[0]!r} (header: {header})")
