"""Processed splits and the encoder that turns rows into tensors, from the dataset's manifest.

The encoder is saved with the model (`model_config.json`), so serving applies exactly the preprocessing of
training without the manifest. Standard library and numpy only: this file also runs in the AWS PyTorch
serving image.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

MISSING = frozenset({"", "na", "n/a", "nan", "null", "none"})


def is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in MISSING


def read_manifest(channel: str | Path) -> dict[str, Any]:
    """The manifest from its channel directory (or the file itself)."""
    path = Path(channel)
    if path.is_dir():
        candidates = sorted(path.rglob("manifest.json"))
        if not candidates:
            raise FileNotFoundError(f"no manifest.json in {path}")
        path = candidates[0]
    manifest: dict[str, Any] = json.loads(path.read_text())
    return manifest


def read_split(channel: str | Path) -> list[dict[str, str]]:
    """Every row of every CSV file in a channel directory, as dicts of strings."""
    files = sorted(Path(channel).rglob("*.csv"))
    if not files:
        raise FileNotFoundError(f"no .csv files in {channel}")
    rows: list[dict[str, str]] = []
    for file in files:
        with file.open(newline="", encoding="utf-8") as handle:
            rows.extend(csv.DictReader(handle))
    return rows


class Encoder:
    """Rows → standardised numeric features + one-hot categories; targets → class index or scaled value."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.task: str = config["task"]
        self.target: str = config["target"]
        self.features: list[dict[str, Any]] = config["features"]
        self.labels: list[Any] = config.get("labels", [])
        self._label_index = {str(label): i for i, label in enumerate(self.labels)}
        self._category_index = [
            {c: i for i, c in enumerate(f["categories"])} if f["type"] == "categorical" else {}
            for f in self.features
        ]
        self.width = sum(1 if f["type"] == "numeric" else len(f["categories"]) + 1 for f in self.features)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> Encoder:
        features = []
        target_stats: dict[str, Any] = {}
        for column in manifest["columns"]:
            if column["role"] == "target":
                target_stats = column.get("stats", {})
            if column["role"] != "feature":
                continue
            stats = column["stats"]
            if column["type"] == "numeric":
                std = stats.get("std") or 1.0
                features.append(
                    {
                        "name": column["name"],
                        "type": "numeric",
                        "mean": stats.get("mean") or 0.0,
                        "std": std if std > 1e-12 else 1.0,
                    }
                )
            else:
                features.append(
                    {"name": column["name"], "type": "categorical", "categories": list(stats["categories"])}
                )
        config: dict[str, Any] = {
            "task": manifest["task"],
            "target": manifest["target"],
            "features": features,
        }
        if manifest["task"] == "classification":
            config["labels"] = manifest["labels"]
        else:
            std = target_stats.get("std") or 1.0
            config["target_mean"] = target_stats.get("mean") or 0.0
            config["target_std"] = std if std > 1e-12 else 1.0
        return cls(config)

    @property
    def output_width(self) -> int:
        return len(self.labels) if self.task == "classification" else 1

    def encode(self, rows: list[dict[str, Any]], strict: bool = False) -> np.ndarray:
        """Feature matrix (rows by width). With `strict`, a missing column or a non-number is a ValueError
        naming the row and column (serving); otherwise bad values count as missing (training data has
        already been validated by preprocessing)."""
        matrix = np.zeros((len(rows), self.width), dtype=np.float32)
        for r, row in enumerate(rows):
            offset = 0
            for feature, categories in zip(self.features, self._category_index, strict=True):
                name = feature["name"]
                if strict and name not in row:
                    raise ValueError(f"instance {r}: missing feature column {name!r}")
                value = row.get(name)
                if feature["type"] == "numeric":
                    if not is_missing(value):
                        number = _number(value)
                        if number is None:
                            if strict:
                                raise ValueError(
                                    f"instance {r}: column {name!r} must be a number, got {value!r}"
                                )
                        else:
                            matrix[r, offset] = (number - feature["mean"]) / feature["std"]
                    offset += 1
                else:
                    key = "" if is_missing(value) else str(value).strip()
                    matrix[r, offset + categories.get(key, len(categories))] = 1.0
                    offset += len(categories) + 1
        return matrix

    def encode_target(self, rows: list[dict[str, str]]) -> np.ndarray:
        values = [row[self.target].strip() for row in rows]
        if self.task == "classification":
            try:
                return np.array([self._label_index[v] for v in values], dtype=np.int64)
            except KeyError as exc:
                raise ValueError(f"label {exc.args[0]!r} is not among the manifest's labels") from None
        mean, std = self.config["target_mean"], self.config["target_std"]
        return np.array([(float(v) - mean) / std for v in values], dtype=np.float32)

    def decode_regression(self, scaled: np.ndarray) -> np.ndarray:
        return scaled * self.config["target_std"] + self.config["target_mean"]


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None
