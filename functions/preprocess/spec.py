"""conveyor.json: what a user may say about a dataset, checked once (docs/contracts.md, section 1).

Every key is optional; an unknown key, or a value of the wrong kind, rejects the upload with the key named.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from common.base_models import ADAPTERS, BaseModelRefused, check_name
from common.errors import DatasetRejected

RECIPES = ("tabular", "text", "image", "pretrained")
# What conveyor.json's "columns" may declare a column to be; "category" is a synonym of "categorical".
COLUMN_ROLES = ("text", "categorical", "category", "numeric", "ignore")
# The tokens a pretrained encoder reads per row at most (its position embeddings bound it too).
MAX_LENGTH_RANGE = (8, 8192)

# The template's AllowedPattern for instance type parameters.
INSTANCE_TYPE = re.compile(r"^ml\.[a-z0-9-]+\.[a-z0-9]+$")
# SageMaker's limits for one training job.
MAX_INSTANCE_COUNT = 20
MAX_WAIT_SECONDS = 28 * 24 * 3600
TRAINING_KEYS = ("instance_type", "instance_count", "spot", "max_wait_seconds")


def _whole_number(value: Any, low: int, high: int) -> bool:
    """A JSON whole number from `low` to `high` (true and false are not numbers here)."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def check_training_spec(training: Any) -> dict[str, Any]:
    """Check conveyor.json's ``training`` block: every key optional, none unknown.

    Raises
    ------
    DatasetRejected
        Naming the key and what it must be.
    """
    if training is None:
        return {}
    if not isinstance(training, dict):
        raise DatasetRejected('conveyor.json: training must be an object, e.g. {"instance_count": 2}')
    unknown = sorted(set(training) - set(TRAINING_KEYS))
    if unknown:
        raise DatasetRejected(
            f"conveyor.json: training has unknown keys: {', '.join(unknown)}", allowed=list(TRAINING_KEYS)
        )
    instance_type = training.get("instance_type")
    if instance_type is not None and not (
        isinstance(instance_type, str) and INSTANCE_TYPE.match(instance_type)
    ):
        raise DatasetRejected(
            f"conveyor.json: training.instance_type must be a SageMaker instance type such as "
            f"'ml.g5.2xlarge', not {instance_type!r}"
        )
    count = training.get("instance_count")
    if count is not None and not _whole_number(count, 1, MAX_INSTANCE_COUNT):
        raise DatasetRejected(
            f"conveyor.json: training.instance_count must be a whole number from 1 to {MAX_INSTANCE_COUNT}, "
            f"not {count!r}"
        )
    spot = training.get("spot")
    if spot is not None and not isinstance(spot, bool):
        raise DatasetRejected(f"conveyor.json: training.spot must be true or false, not {spot!r}")
    wait = training.get("max_wait_seconds")
    if wait is not None and not _whole_number(wait, 1, MAX_WAIT_SECONDS):
        raise DatasetRejected(
            f"conveyor.json: training.max_wait_seconds must be a whole number of seconds from 1 to "
            f"{MAX_WAIT_SECONDS}, not {wait!r}"
        )
    return dict(training)


@dataclass(frozen=True)
class DatasetSpec:
    """What the user said about the dataset in `conveyor.json` (all optional)."""

    target: str | None = None
    task: str | None = None
    metric: str | None = None
    threshold: float | None = None
    drop_duplicates: bool = True
    margin: float = 0.0
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    # "auto": a model that passes the gate deploys; "manual": it waits in PendingManualApproval until a
    # person approves its model package (which deploys it).
    approval: str = "auto"
    # "instances": a real-time endpoint on InferenceInstanceType; "serverless": a serverless endpoint.
    serving: str = "instances"
    # What trains (RECIPES); None: inferred from the data. "image" is a zip's only recipe, and only a zip's.
    recipe: str | None = None
    # Where the training job runs, over the stack's defaults (TRAINING_KEYS; preprocess/resources.py).
    training: dict[str, Any] = field(default_factory=dict)
    # A base model to fine-tune (docs/base-models.md): a hub name or an s3:// URI under base-models/; with
    # it the recipe is "pretrained" and string columns that are not categories are text.
    base_model: str | None = None
    # "full": every weight trains; "lora": the base stays frozen and peft's low-rank adapters train.
    adapter: str = "full"
    # Tokens per row the encoder reads (the rest is cut); None: the recipe's default.
    max_length: int | None = None
    # What a column is, over what profiling infers: {"title": "text", "customer_id": "ignore"}.
    columns: dict[str, str] = field(default_factory=dict)

    KEYS = frozenset(
        {
            "target",
            "task",
            "metric",
            "threshold",
            "drop_duplicates",
            "margin",
            "hyperparameters",
            "approval",
            "serving",
            "recipe",
            "training",
            "base_model",
            "adapter",
            "max_length",
            "columns",
        }
    )

    @classmethod
    def from_json(cls, document: Any) -> DatasetSpec:
        if not isinstance(document, dict):
            raise DatasetRejected("conveyor.json must be a JSON object")
        unknown = set(document) - cls.KEYS
        if unknown:
            raise DatasetRejected(
                f"conveyor.json has unknown keys: {', '.join(sorted(unknown))}",
                allowed=sorted(cls.KEYS),
            )
        task = document.get("task")
        if task not in (None, "classification", "regression"):
            raise DatasetRejected(
                f"conveyor.json: task must be 'classification' or 'regression', not {task!r}"
            )
        target = document.get("target")
        if target is not None and not isinstance(target, str):
            raise DatasetRejected("conveyor.json: target must be a column name (a string)")
        threshold = document.get("threshold")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)):
            raise DatasetRejected("conveyor.json: threshold must be a number")
        margin = document.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, int | float) or margin < 0:
            raise DatasetRejected("conveyor.json: margin must be a number of at least 0")
        drop_duplicates = document.get("drop_duplicates", True)
        if not isinstance(drop_duplicates, bool):
            raise DatasetRejected("conveyor.json: drop_duplicates must be true or false")
        hps = document.get("hyperparameters") or {}
        if not isinstance(hps, dict):
            raise DatasetRejected("conveyor.json: hyperparameters must be an object")
        approval = document.get("approval", "auto")
        if approval not in ("auto", "manual"):
            raise DatasetRejected(f"conveyor.json: approval must be 'auto' or 'manual', not {approval!r}")
        serving = document.get("serving", "instances")
        if serving not in ("instances", "serverless"):
            raise DatasetRejected(
                f"conveyor.json: serving must be 'instances' or 'serverless', not {serving!r}"
            )
        recipe = document.get("recipe")
        if recipe is not None and recipe not in RECIPES:
            raise DatasetRejected(
                f"conveyor.json: recipe must be {', '.join(map(repr, RECIPES))}, not {recipe!r}"
            )
        base_model, adapter, max_length = _check_base_model(document)
        columns = _check_columns(document.get("columns"), target)
        if base_model is not None and recipe not in (None, "pretrained"):
            raise DatasetRejected(
                f"conveyor.json names base_model {base_model!r}, which fine-tunes the pretrained recipe, "
                f"and recipe {recipe!r}: remove one of them"
            )
        if recipe == "pretrained" and base_model is None:
            raise DatasetRejected(
                "conveyor.json: recipe 'pretrained' fine-tunes a base model: name one with \"base_model\" "
                "(`conveyor base-models list` shows the hub)"
            )
        return cls(
            target=target,
            task=task,
            metric=document.get("metric"),
            threshold=None if threshold is None else float(threshold),
            drop_duplicates=drop_duplicates,
            margin=float(margin),
            hyperparameters=hps,
            approval=approval,
            serving=serving,
            recipe=recipe,
            training=check_training_spec(document.get("training")),
            base_model=base_model,
            adapter=adapter,
            max_length=max_length,
            columns=columns,
        )


def _check_base_model(document: dict[str, Any]) -> tuple[str | None, str, int | None]:
    base_model = document.get("base_model")
    if base_model is not None:
        if not isinstance(base_model, str) or not base_model:
            raise DatasetRejected("conveyor.json: base_model must be a base's name or an s3:// URI")
        if not base_model.startswith("s3://"):
            try:
                check_name(base_model)
            except BaseModelRefused as refused:
                raise DatasetRejected(f"conveyor.json: {refused.reason}") from None
    adapter = document.get("adapter", "full")
    if adapter not in ADAPTERS:
        raise DatasetRejected(f"conveyor.json: adapter must be 'full' or 'lora', not {adapter!r}")
    max_length = document.get("max_length")
    low, high = MAX_LENGTH_RANGE
    if max_length is not None and not _whole_number(max_length, low, high):
        raise DatasetRejected(
            f"conveyor.json: max_length must be a whole number of tokens from {low} to {high}, not {max_length!r}"
        )
    if base_model is None and (adapter != "full" or max_length is not None):
        raise DatasetRejected(
            'conveyor.json: adapter and max_length apply to fine-tuning a base model: add "base_model"'
        )
    return base_model, adapter, max_length


def _check_columns(columns: Any, target: str | None) -> dict[str, str]:
    if columns is None:
        return {}
    if not isinstance(columns, dict) or not all(isinstance(k, str) for k in columns):
        raise DatasetRejected('conveyor.json: columns must be an object such as {"title": "text"}')
    bad = {name: role for name, role in columns.items() if role not in COLUMN_ROLES}
    if bad:
        name, role = next(iter(bad.items()))
        raise DatasetRejected(
            f"conveyor.json: columns.{name} must be one of {', '.join(map(repr, COLUMN_ROLES[:2] + COLUMN_ROLES[3:]))}, "
            f"not {role!r}",
            columns=bad,
        )
    if target is not None and target in columns:
        raise DatasetRejected(
            f"conveyor.json: columns names the target {target!r}; say only what the feature columns are"
        )
    return {name: "categorical" if role == "category" else role for name, role in columns.items()}
