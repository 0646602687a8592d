"""Test-split metrics in SageMaker's model-quality format, plus conveyor's summary for the gate.

``evaluation.json`` (docs/contracts.md, section 3): ``binary_classification_metrics``,
``multiclass_classification_metrics`` or ``regression_metrics``, each metric as
``{"value": v, "standard_deviation": "NaN"}``, and a ``conveyor`` block with the primary metric and its
naive baseline. numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def _metric(value: float) -> dict[str, Any]:
    return {"value": float(value), "standard_deviation": "NaN"}


def classification_evaluation(
    probabilities: np.ndarray, truth: np.ndarray, train_truth: np.ndarray, labels: Sequence[Any]
) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 (macro and weighted), ROC-AUC (binary), confusion matrix.

    Parameters
    ----------
    probabilities
        Test rows by classes, each row summing to 1.
    truth
        The test rows' class indices.
    train_truth
        The train rows' class indices: the baseline predicts their most frequent class.
    labels
        The manifest's labels, in class-index order.

    Returns
    -------
    dict
        The ``evaluation.json`` document. Binary metrics take ``labels[1]`` as the positive class.
    """
    classes = len(labels)
    truth = np.asarray(truth, dtype=np.int64)
    predicted = np.asarray(probabilities).argmax(axis=1)
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    support = confusion.sum(axis=1)
    predicted_count = confusion.sum(axis=0)
    hits = np.diag(confusion).astype(np.float64)
    precision = np.divide(hits, predicted_count, out=np.zeros(classes), where=predicted_count > 0)
    recall = np.divide(hits, support, out=np.zeros(classes), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros(classes), where=both > 0)
    rows = max(1, len(truth))
    accuracy = float(hits.sum() / rows)
    majority = int(np.bincount(np.asarray(train_truth, dtype=np.int64), minlength=classes).argmax())
    baseline = float(np.mean(truth == majority)) if len(truth) else 0.0
    # Macro F1 over the classes present in the test split or predicted there, so an absent class is no 0.
    seen = (support > 0) | (predicted_count > 0)
    metrics: dict[str, Any] = {"accuracy": _metric(accuracy)}
    if classes == 2:
        section = "binary_classification_metrics"
        metrics.update(precision=_metric(precision[1]), recall=_metric(recall[1]), f1=_metric(f1[1]))
        auc = roc_auc(np.asarray(probabilities)[:, 1], truth == 1)
        if not math.isnan(auc):
            metrics["auc"] = _metric(auc)
    else:
        section = "multiclass_classification_metrics"
        metrics.update(
            weighted_precision=_metric(float(precision @ support / rows)),
            weighted_recall=_metric(float(recall @ support / rows)),
            weighted_f1=_metric(float(f1 @ support / rows)),
        )
    metrics["macro_f1"] = _metric(float(f1[seen].mean()) if seen.any() else 0.0)
    names = [str(label) for label in labels]
    metrics["confusion_matrix"] = {
        names[actual]: {names[guess]: int(confusion[actual, guess]) for guess in range(classes)}
        for actual in range(classes)
    }
    per_class = {
        names[c]: {
            "precision": float(precision[c]),
            "recall": float(recall[c]),
            "f1": float(f1[c]),
            "support": int(support[c]),
        }
        for c in range(classes)
    }
    return {
        section: metrics,
        "conveyor": {
            "task": "classification",
            "metric": "accuracy",
            "value": accuracy,
            "baseline": baseline,
            "baseline_name": "majority class",
            "test_rows": len(truth),
            "per_class": per_class,
        },
    }


def regression_evaluation(predicted: np.ndarray, actual: np.ndarray, train_mean: float) -> dict[str, Any]:
    """MSE, RMSE, MAE and R² on the test split, in the target's units.

    Parameters
    ----------
    predicted, actual
        The test rows' predictions and true values.
    train_mean
        The mean target of the train split: the baseline predicts it for every row.

    Returns
    -------
    dict
        The ``evaluation.json`` document.
    """
    predicted = np.asarray(predicted, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    errors = predicted - actual
    mse = float(np.mean(errors**2))
    r2 = r_squared(predicted, actual)
    baseline = r_squared(np.full_like(actual, train_mean), actual)
    return {
        "regression_metrics": {
            "mse": _metric(mse),
            "rmse": _metric(math.sqrt(mse)),
            "mae": _metric(float(np.mean(np.abs(errors)))),
            "r2": _metric(r2),
        },
        "conveyor": {
            "task": "regression",
            "metric": "r2",
            "value": r2,
            "baseline": baseline,
            "baseline_name": "train mean",
            "test_rows": len(actual),
        },
    }


def r_squared(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Coefficient of determination; for a constant `actual`, 1 when every prediction is exact, else 0."""
    residual = float(np.sum((actual - predicted) ** 2))
    total = float(np.sum((actual - actual.mean()) ** 2))
    if total == 0.0:
        return 1.0 if residual == 0.0 else 0.0
    return 1.0 - residual / total


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney U) formula, tied scores sharing their rank.

    Parameters
    ----------
    scores
        The positive class's probability per row.
    positive
        Whether each row is of the positive class.

    Returns
    -------
    float
        The AUC, or NaN when the rows are all of one class.
    """
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(np.asarray(scores), return_inverse=True, return_counts=True)
    # Each distinct score's average 1-based rank: the ranks its ties span, averaged.
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = average_rank[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
