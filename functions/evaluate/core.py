"""The gate's inputs, from a training job's evaluation.json (docs/contracts.md, section 3). No AWS here."""

from __future__ import annotations

import io
import json
import tarfile
from typing import Any

METRIC_SECTIONS = ("binary_classification_metrics", "multiclass_classification_metrics", "regression_metrics")


class EvaluationError(ValueError):
    """The training job's evaluation output is missing or unreadable."""


def evaluation_from_tarball(data: bytes, member: str = "evaluation.json") -> dict[str, Any]:
    """Read `evaluation.json` from a SageMaker `output.tar.gz` (or `model.tar.gz`)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
            for info in archive:
                if info.isfile() and info.name.lstrip("./") == member:
                    handle = archive.extractfile(info)
                    assert handle is not None
                    document: dict[str, Any] = json.loads(handle.read())
                    return document
    except (tarfile.TarError, json.JSONDecodeError) as exc:
        raise EvaluationError(f"cannot read {member} from the training output: {exc}") from exc
    raise EvaluationError(f"the training output has no {member}")


def gate(evaluation: dict[str, Any], metric: str | None, threshold: float | None) -> dict[str, Any]:
    """Which metric the gate compares, its value, and the threshold it must be above.

    Without a threshold from the dataset spec, the model must beat the naive baseline (majority class or
    the train mean) on the same test split.
    """
    summary = evaluation.get("conveyor")
    if not isinstance(summary, dict):
        raise EvaluationError("evaluation.json has no 'conveyor' summary block")
    name = metric or summary["metric"]
    value = summary["value"] if name == summary["metric"] else _lookup(evaluation, name)
    if threshold is None:
        if name != summary["metric"]:
            raise EvaluationError(f"metric {name!r} has no baseline: give a threshold in conveyor.json")
        threshold = summary["baseline"]
    return {
        "metric": name,
        "value": float(value),
        "threshold": float(threshold),
        "baseline": summary.get("baseline"),
    }


def _lookup(evaluation: dict[str, Any], name: str) -> float:
    for section in METRIC_SECTIONS:
        found = evaluation.get(section, {}).get(name)
        if isinstance(found, dict) and "value" in found:
            return float(found["value"])
    raise EvaluationError(f"evaluation.json has no metric {name!r}")
