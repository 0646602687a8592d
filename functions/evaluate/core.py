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


# Metrics where a smaller value is the better model; every other metric is "higher is better".
LOWER_IS_BETTER = frozenset({"mse", "rmse", "mae", "log_loss", "loss"})


def gate(
    evaluation: dict[str, Any],
    metric: str | None,
    threshold: float | None,
    champion: dict[str, Any] | None = None,
    margin: float = 0.0,
) -> dict[str, Any]:
    """The deployment decision for a challenger: its metric must pass the threshold and, when the dataset
    has a champion (its latest Approved model package), beat the champion's value by at least `margin`.

    Without a threshold from the dataset spec, the model must beat the naive baseline (majority class or
    the train mean) on the same test split. `champion` is `{"value", "version", "package"}` or None (the
    first model of a dataset: the threshold alone decides). Returns the metric, value, threshold, baseline,
    champion, `deploy` and a readable `reason`.
    """
    summary = evaluation.get("conveyor")
    if not isinstance(summary, dict):
        raise EvaluationError("evaluation.json has no 'conveyor' summary block")
    name = metric or summary["metric"]
    value = float(summary["value"] if name == summary["metric"] else _lookup(evaluation, name))
    if threshold is None:
        if name != summary["metric"]:
            raise EvaluationError(f"metric {name!r} has no baseline: give a threshold in conveyor.json")
        threshold = summary["baseline"]
    threshold = float(threshold)
    lower = name in LOWER_IS_BETTER
    passes = value < threshold if lower else value > threshold
    side = "below" if lower else "above"
    if not passes:
        deploy, reason = False, f"{name} = {value:.4g} is not {side} the threshold {threshold:.4g}"
    elif champion is None:
        deploy, reason = (
            True,
            f"{name} = {value:.4g} is {side} the threshold {threshold:.4g}; no champion yet",
        )
    else:
        best = float(champion["value"])
        needed = best - margin if lower else best + margin
        deploy = value <= needed if lower else value >= needed
        verdict = "beats" if deploy else "does not beat"
        reason = (
            f"{name} = {value:.4g} {verdict} the champion (version {champion.get('version')}: {best:.4g}) "
            f"by the margin {margin:.4g}"
        )
    return {
        "metric": name,
        "value": value,
        "threshold": threshold,
        "baseline": summary.get("baseline"),
        "champion": champion,
        "margin": margin,
        "deploy": deploy,
        "reason": reason,
    }


def metric_value(evaluation: dict[str, Any], name: str) -> float:
    """The value of metric `name` in an evaluation.json."""
    summary = evaluation.get("conveyor") or {}
    if summary.get("metric") == name and "value" in summary:
        return float(summary["value"])
    return _lookup(evaluation, name)


def _lookup(evaluation: dict[str, Any], name: str) -> float:
    for section in METRIC_SECTIONS:
        found = evaluation.get(section, {}).get(name)
        if isinstance(found, dict) and "value" in found:
            return float(found["value"])
    raise EvaluationError(f"evaluation.json has no metric {name!r}")
