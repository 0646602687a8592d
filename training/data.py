"""The processed splits, and the encoder that turns their rows into tensors (docs/contracts.md, 2 and 3).

The encoder is built from the dataset's manifest and saved in `model_config.json`, so serving applies the
preprocessing of training without the manifest. Standard library and numpy only: this file also runs in
the AWS PyTorch serving image, next to `inference.py`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# The contract's missing markers, compared after trimming spaces and lower-casing.
MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none"})
TASKS = ("classification", "regression")
SPLITS = ("train", "validation", "test")
_INTEGER = re.compile(r"^[+-]?\d+$")
# The contract's tokeniser (docs/contracts.md, section 2): Unicode word characters of the lower-cased text.
_TOKEN = re.compile(r"\w+")
FEATURE_TYPES = ("numeric", "categorical", "text", "image")
# How text features reach the network: counts of vocabulary tokens (the tabular recipe's MLP), each
# value's token ids in order (the text recipe's sequence encoder), or every feature of a row written as one
# text for a base model's own tokenizer (the pretrained recipe; `Encoder.row_texts`).
TEXT_ENCODINGS = ("bag_of_words", "sequence", "pretrained")
# The pretrained encoding's text of a row of several features: "name: value" joined by this.
FIELD_SEPARATOR = " | "
# Token ids of the sequence encoding: 0 pads a value to the sequence length, 1 is any token outside the
# vocabulary, and the vocabulary's tokens follow from 2 in the manifest's order.
PAD_ID, OTHER_ID, FIRST_TOKEN_ID = 0, 1, 2


class DataError(ValueError):
    """The channels do not hold what the contract promises; the message says what and where."""


def is_missing(value: Any) -> bool:
    """Whether a cell or request value counts as missing.

    Parameters
    ----------
    value
        A CSV string, or a JSON value from a request (``None``, a number, a string).

    Returns
    -------
    bool
        True for ``None``, NaN, and the strings empty, NA, N/A, NaN, null and None (any case, trimmed).
    """
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and value.strip().lower() in MISSING_TOKENS


def tokenize(text: str) -> list[str]:
    """Split a text value into the tokens its bag of words counts, as preprocessing built the vocabulary.

    Parameters
    ----------
    text
        A non-missing text value.

    Returns
    -------
    list of str
        ``re.findall(r"\\w+", text.lower())``: runs of Unicode letters, digits and underscores.
    """
    return _TOKEN.findall(text.lower())


class Encoder:
    """Rows to model inputs and targets: standardised numbers, one-hot categories, text, classes.

    A numeric feature becomes ``(x - mean) / std`` with the train statistics of the manifest, and 0 (the
    mean) when missing. A categorical feature becomes a one-hot over its manifest categories plus one slot
    for anything else, missing included. The target becomes a class index, or for regression a value
    standardised with the train mean and standard deviation.

    A text feature is encoded one of two ways (`text_encoding`):

    - ``bag_of_words``: one slot per vocabulary token plus one for all other tokens, each holding
      ``log1p(count)`` of its token in the value (see `tokenize`); a missing value is all zeros. The
      logarithm keeps a word repeated in a long review from outweighing the rest, and a value's slots stay
      on the scale of the one-hot and standardised inputs beside them.
    - ``sequence``: the value's first `sequence_length` tokens as ids (`PAD_ID`, `OTHER_ID`,
      `FIRST_TOKEN_ID` onwards in vocabulary order), padded with `PAD_ID`; a missing value is all padding.
      These form a second input beside the other features' matrix (`encode_inputs`).
    - ``pretrained``: every feature of a row, text or not, becomes one text (`row_texts`) that a base
      model's tokenizer (`tokenizer`, attached by ``hf_text``) cuts to its first `sequence_length` tokens.

    An image dataset has one feature of type ``image``: its files are decoded to ``image_size`` squares of
    uint8 RGB (`images.decode_images`); the network normalises and augments them itself.
    """

    def __init__(
        self,
        *,
        task: str,
        target: str,
        features: Sequence[Mapping[str, Any]],
        labels: Sequence[Any] = (),
        target_mean: float = 0.0,
        target_std: float = 1.0,
        text_encoding: str = "bag_of_words",
        sequence_length: int = 0,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}")
        if text_encoding not in TEXT_ENCODINGS:
            raise ValueError(f"text_encoding {text_encoding!r} is not one of {', '.join(TEXT_ENCODINGS)}")
        if text_encoding != "bag_of_words" and sequence_length < 1:
            raise ValueError(
                f"the {text_encoding} encoding needs a sequence_length of at least 1, not {sequence_length}"
            )
        self.text_encoding = text_encoding
        self.sequence_length = int(sequence_length) if text_encoding != "bag_of_words" else 0
        # The pretrained encoding's tokenizer (a transformers tokenizer; `hf_text.load_tokenizer`).
        self.tokenizer: Any = None
        self.task = task
        self.target = target
        self.features = [dict(f) for f in features]
        self.labels = list(labels)
        self.target_mean = float(target_mean)
        self.target_std = float(target_std)
        unknown = [f.get("name") for f in self.features if f.get("type") not in FEATURE_TYPES]
        if unknown:
            raise ValueError(
                f"feature {unknown[0]!r} has a type this encoder does not know ({FEATURE_TYPES})"
            )
        # Each categorical or text feature's slot per category or token; the slot after them is "other".
        self._slots = [
            {str(c): i for i, c in enumerate(f["categories"])}
            if f["type"] == "categorical"
            else {token: i for i, token in enumerate(f["vocabulary"])}
            if f["type"] == "text"
            else {}
            for f in self.features
        ]
        if self.labels and all(
            isinstance(label, int) and not isinstance(label, bool) for label in self.labels
        ):
            self._label_index: dict[Any, int] = {label: i for i, label in enumerate(self.labels)}
            self._integer_labels = True
        else:
            self._label_index = {str(label): i for i, label in enumerate(self.labels)}
            self._integer_labels = False

    @classmethod
    def from_manifest(
        cls,
        manifest: Mapping[str, Any],
        train_target: Sequence[str] = (),
        max_vocabulary: int | None = None,
        text_encoding: str = "bag_of_words",
        sequence_length: int = 0,
        image_size: int = 64,
        image_crop: float = 1.0,
    ) -> Encoder:
        """Build the encoder from a manifest (contract section 2).

        Parameters
        ----------
        manifest
            The checked manifest (see `read_manifest`).
        train_target
            For regression, the train split's target strings: their mean and standard deviation scale
            the target. Without them the manifest's target statistics are used.
        max_vocabulary
            Keep at most this many tokens of each text feature's vocabulary (the most frequent, as the
            manifest lists them first); None keeps them all.
        text_encoding, sequence_length
            How text features are encoded (see the class).
        image_size, image_crop
            The side of the square an image feature is decoded to, and the share of each image's shorter
            side its centre square keeps (a base model's preprocessing, `hf_image.preprocessing`).

        Returns
        -------
        Encoder
        """
        features: list[dict[str, Any]] = []
        target_stats: Mapping[str, Any] = {}
        for column in manifest["columns"]:
            if column.get("role") == "target":
                target_stats = column.get("stats") or {}
            if column.get("role") != "feature":
                continue
            stats = column.get("stats") or {}
            if column["type"] == "image":
                image = {"name": column["name"], "type": "image", "image_size": int(image_size)}
                if image_crop != 1.0:
                    image["crop"] = float(image_crop)
                features.append(image)
            elif column["type"] == "numeric":
                features.append(
                    {
                        "name": column["name"],
                        "type": "numeric",
                        "mean": float(stats["mean"] or 0.0),
                        "std": _usable_std(stats["std"]),
                    }
                )
            elif column["type"] == "text":
                features.append(
                    {
                        "name": column["name"],
                        "type": "text",
                        "vocabulary": list(stats["vocabulary"][:max_vocabulary]),
                    }
                )
            else:
                features.append(
                    {
                        "name": column["name"],
                        "type": "categorical",
                        "categories": [str(c) for c in stats["categories"]],
                    }
                )
        text = {"text_encoding": text_encoding, "sequence_length": sequence_length}
        if manifest["task"] == "classification":
            return cls(
                task="classification",
                target=manifest["target"],
                features=features,
                labels=manifest["labels"],
                **text,
            )
        std: Any
        if train_target:
            values = np.array([_target_number(v) for v in train_target], dtype=np.float64)
            mean, std = float(values.mean()), float(values.std())
        else:
            mean, std = float(target_stats.get("mean") or 0.0), target_stats.get("std")
        return cls(
            task="regression",
            target=manifest["target"],
            features=features,
            target_mean=mean,
            target_std=_usable_std(std),
            **text,
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Encoder:
        """Rebuild the encoder from what `to_config` wrote (the keys of ``model_config.json``)."""
        scale = config.get("target_scale") or {}
        return cls(
            task=config["task"],
            target=config["target"],
            features=config["features"],
            labels=config.get("labels", ()),
            target_mean=scale.get("mean", 0.0),
            target_std=scale.get("std", 1.0),
            text_encoding=config.get("text_encoding", "bag_of_words"),
            sequence_length=config.get("sequence_length", 0),
        )

    def to_config(self) -> dict[str, Any]:
        """The encoder as JSON-ready values: task, target, labels or target_scale, features, and the text
        encoding when it is not the bag of words."""
        config: dict[str, Any] = {"task": self.task, "target": self.target}
        if self.task == "classification":
            config["labels"] = self.labels
        else:
            config["target_scale"] = {"mean": self.target_mean, "std": self.target_std}
        config["features"] = self.features
        if self.text_encoding != "bag_of_words":
            config["text_encoding"] = self.text_encoding
            config["sequence_length"] = self.sequence_length
        return config

    @property
    def feature_names(self) -> list[str]:
        """The feature columns, in encoding order."""
        return [f["name"] for f in self.features]

    @property
    def sequences(self) -> list[dict[str, Any]]:
        """The text features encoded as token id sequences (none with the bag of words)."""
        return [f for f in self.features if f["type"] == "text" and self.text_encoding == "sequence"]

    @property
    def image(self) -> dict[str, Any] | None:
        """The image feature of an image dataset (its only feature), else None."""
        return next((f for f in self.features if f["type"] == "image"), None)

    @property
    def width(self) -> int:
        """How many columns the matrix of `encode` has (text features encoded as sequences, and images, are
        not in it)."""
        if self.text_encoding == "pretrained":
            return 0  # every feature is in the row's text
        return sum(
            1 if f["type"] == "numeric" else len(slots) + 1
            for f, slots in zip(self.features, self._slots, strict=True)
            if not (f["type"] == "text" and self.text_encoding == "sequence") and f["type"] != "image"
        )

    @property
    def row_bytes(self) -> int:
        """Memory one encoded row takes: its float32 matrix row, its int32 token ids, its uint8 pixels."""
        if self.text_encoding == "pretrained":
            return 2 * 4 * self.sequence_length  # int32 token ids and attention mask
        pixels = 3 * self.image["image_size"] ** 2 if self.image else 0
        return 4 * (self.width + len(self.sequences) * self.sequence_length) + pixels

    @property
    def output_width(self) -> int:
        """How many model outputs the task needs: one logit per label, or one value."""
        return len(self.labels) if self.task == "classification" else 1

    def encode(self, columns: Mapping[str, Sequence[Any]], rows: int) -> np.ndarray:
        """Encode feature columns; a value that is not a number in a numeric column counts as missing.

        Values of a text column must be strings or missing (``None``): `encode_instances` checks requests.

        Parameters
        ----------
        columns
            Every feature column's values (strings from CSV, or validated JSON values).
        rows
            The number of rows.

        Returns
        -------
        numpy.ndarray
            float32, ``rows`` by `width`.
        """
        matrix = np.zeros((rows, self.width), dtype=np.float32)
        every_row = np.arange(rows)
        offset = 0
        for feature, index in zip(self.features, self._slots, strict=True):
            values = columns[feature["name"]]
            if feature["type"] == "numeric":
                numbers = np.fromiter((_number_or_nan(v) for v in values), dtype=np.float64, count=rows)
                scaled = (numbers - feature["mean"]) / feature["std"]
                matrix[:, offset] = np.nan_to_num(scaled, nan=0.0)
                offset += 1
            elif feature["type"] == "image":
                continue  # in `encode_inputs`
            elif feature["type"] == "text":
                if self.text_encoding == "sequence":
                    continue  # in `encode_sequences`
                _add_bag_of_words(matrix, offset, values, index, rows)
                offset += len(index) + 1
            else:
                other = len(index)
                slots = np.fromiter(
                    (index.get(_category_key(v), other) for v in values), dtype=np.int64, count=rows
                )
                matrix[every_row, offset + slots] = 1.0
                offset += other + 1
        return matrix

    def encode_sequences(self, columns: Mapping[str, Sequence[Any]], rows: int) -> np.ndarray:
        """Token ids of the text features encoded as sequences.

        Returns
        -------
        numpy.ndarray
            int32, ``rows`` by ``len(sequences)`` by `sequence_length`: each value's first tokens, padded.
        """
        ids = np.zeros((rows, len(self.sequences), self.sequence_length), dtype=np.int32)
        for position, feature in enumerate(self.sequences):
            index = self._slots[self.features.index(feature)]
            for row, value in enumerate(columns[feature["name"]]):
                if is_missing(value):
                    continue
                tokens = tokenize(value)[: self.sequence_length]
                ids[row, position, : len(tokens)] = [
                    FIRST_TOKEN_ID + index[t] if t in index else OTHER_ID for t in tokens
                ]
        return ids

    def encode_inputs(
        self, columns: Mapping[str, Sequence[Any]], rows: int, entries: Sequence[str] = ()
    ) -> tuple[np.ndarray, ...]:
        """Everything the network takes, in the order of its ``forward`` arguments: the matrix of `encode`,
        then the token ids of `encode_sequences` when text is encoded as sequences. An image dataset's
        network takes its images alone: uint8, ``rows`` x 3 x size x size (`images.decode_images`, the
        image file bytes of each row; `entries` name them in messages)."""
        if self.image:
            from images import decode_images  # only image models need Pillow

            size, crop = self.image["image_size"], self.image.get("crop", 1.0)
            return (decode_images(columns[self.image["name"]], size, list(entries) or None, crop=crop),)
        if self.text_encoding == "pretrained":
            return self.encode_texts(self.row_texts(columns, rows))
        if self.sequences:
            return self.encode(columns, rows), self.encode_sequences(columns, rows)
        return (self.encode(columns, rows),)

    def row_texts(self, columns: Mapping[str, Sequence[Any]], rows: int) -> list[str]:
        """Each row as the one text a base model reads (the pretrained encoding).

        A single feature's value is the text itself; several are ``"name: value"`` joined by
        `FIELD_SEPARATOR`, missing values left out. Numbers are written alike whether they came from a CSV
        cell or a JSON request (``"42.50"`` and ``42.5`` are both ``42.5``).
        """
        names = self.feature_names
        written = [
            [_as_text(value, feature["type"]) for value in columns[feature["name"]]]
            for feature in self.features
        ]
        if len(names) == 1:
            return [value or "" for value in written[0]]
        return [
            FIELD_SEPARATOR.join(
                f"{name}: {values[row]}" for name, values in zip(names, written, strict=True) if values[row]
            )
            for row in range(rows)
        ]

    def encode_texts(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask (int32, rows x the longest row's tokens, at most `sequence_length`)
        from the attached tokenizer; right-padded, so a batch can be cut to its own longest row."""
        if self.tokenizer is None:
            raise ValueError(
                "the pretrained encoding needs the base model's tokenizer (hf_text.load_tokenizer)"
            )
        encoded = self.tokenizer(
            list(texts),
            truncation=True,
            max_length=self.sequence_length,
            padding="longest",
            return_attention_mask=True,
            return_token_type_ids=False,
            return_tensors="np",
        )
        return encoded["input_ids"].astype(np.int32), encoded["attention_mask"].astype(np.int32)

    def encode_instances(self, instances: Sequence[Any]) -> tuple[np.ndarray, ...]:
        """Check and encode request rows (contract section 4).

        Parameters
        ----------
        instances
            JSON objects with every feature column as a key; ``null`` or ``""`` is missing; other keys are
            ignored. For an image model, ``{"image": "<base64 of the image file>"}``
            (`images.encode_image_instances`).

        Returns
        -------
        tuple of numpy.ndarray
            As `encode_inputs`.

        Raises
        ------
        ValueError
            Naming the first bad row and column: not an object, a missing column, a numeric column whose
            value is not a number, a text column whose value is not a string, or a categorical value that
            is neither a number nor a string.
        """
        if self.image:
            from images import encode_image_instances

            return (encode_image_instances(instances, self.image["image_size"], self.image.get("crop", 1.0)),)
        columns: dict[str, list[Any]] = {name: [] for name in self.feature_names}
        for i, instance in enumerate(instances):
            if not isinstance(instance, Mapping):
                raise ValueError(
                    f"instance {i}: expected a JSON object of column values, got {json_kind(instance)}"
                )
            for feature in self.features:
                name = feature["name"]
                if name not in instance:
                    raise ValueError(f"instance {i}: missing feature column {name!r}")
                value = instance[name]
                if feature["type"] == "numeric":
                    if not is_missing(value) and _number(value) is None:
                        raise ValueError(f"instance {i}: column {name!r} must be a number, got {value!r}")
                elif feature["type"] == "text":
                    if value is not None and not isinstance(value, str):
                        raise ValueError(
                            f"instance {i}: column {name!r} is text and must be a string, "
                            f"got {json_kind(value)}"
                        )
                elif value is not None and not isinstance(value, str | int | float):
                    raise ValueError(
                        f"instance {i}: column {name!r} must be a string or a number, got {json_kind(value)}"
                    )
                columns[name].append(value)
        return self.encode_inputs(columns, len(instances))

    def encode_target(self, values: Sequence[str]) -> np.ndarray:
        """Class indices (int64) or standardised values (float32) from the target's strings.

        Raises
        ------
        DataError
            For a label that is not among the manifest's labels, or a regression target that is not a number.
        """
        if self.task == "regression":
            numbers = np.array([_target_number(v) for v in values], dtype=np.float64)
            return ((numbers - self.target_mean) / self.target_std).astype(np.float32)
        indices = np.empty(len(values), dtype=np.int64)
        for i, text in enumerate(values):
            key: Any = text.strip()
            if self._integer_labels and _INTEGER.match(key):
                # The manifest holds integer labels as JSON numbers, the CSV as text ("1", "+1", "01").
                key = int(key)
            if key not in self._label_index:
                raise DataError(f"target value {text!r} is not one of the manifest's labels {self.labels}")
            indices[i] = self._label_index[key]
        return indices

    def decode_target(self, scaled: np.ndarray) -> np.ndarray:
        """Regression outputs back in the target's units."""
        return np.asarray(scaled, dtype=np.float64) * self.target_std + self.target_mean


def _add_bag_of_words(
    matrix: np.ndarray, offset: int, values: Sequence[Any], vocabulary: Mapping[str, int], rows: int
) -> None:
    """Write ``log1p(count)`` of each value's tokens into its row, from column `offset` on.

    One dictionary lookup per token; the counting is numpy's (a sort of the row and slot pairs).
    """
    other = len(vocabulary)
    width = other + 1
    tokens = [[] if is_missing(v) else tokenize(v) for v in values]
    lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=rows)
    slots = np.fromiter(
        (vocabulary.get(token, other) for value in tokens for token in value),
        dtype=np.int64,
        count=int(lengths.sum()),
    )
    cells, counts = np.unique(
        np.repeat(np.arange(rows, dtype=np.int64), lengths) * width + slots, return_counts=True
    )
    matrix[cells // width, offset + cells % width] = np.log1p(counts)


def _usable_std(std: Any) -> float:
    # A constant column (std 0) or one with too few rows (std null) keeps its values unscaled.
    return float(std) if isinstance(std, int | float) and math.isfinite(std) and std > 1e-12 else 1.0


def _number(value: Any) -> float | None:
    """A finite float from a JSON number or a numeric string; None otherwise (booleans included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float range, e.g. 10**400
            return None
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _number_or_nan(value: Any) -> float:
    number = None if is_missing(value) else _number(value)
    return math.nan if number is None else number


def _as_text(value: Any, kind: str) -> str:
    """A value as a row's text writes it ("" when missing)."""
    if is_missing(value):
        return ""
    if kind == "numeric":
        number = _number(value)
        return "" if number is None else f"{number:.15g}"
    return " ".join(str(value).split())


def _category_key(value: Any) -> str:
    # "" is never a category (an empty cell is missing), so it lands in the "other or missing" slot.
    return "" if is_missing(value) else str(value).strip()


def _target_number(text: str) -> float:
    number = _number(text)
    if number is None:
        raise DataError(f"regression target value {text!r} is not a finite number")
    return number


def json_kind(value: Any, quote_strings: bool = True) -> str:
    """How a request's JSON value reads in an error message: its kind, or the value itself.

    `quote_strings` False says "a string" instead of echoing one (an image's base64 would fill the message).
    """
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    if isinstance(value, str) and not quote_strings:
        return "a string"
    return repr(value)
