"""Every function's Powertools Metrics, in the namespace the template sets."""

from __future__ import annotations

import os

from aws_lambda_powertools import Metrics


def make_metrics() -> Metrics:
    """Metrics in POWERTOOLS_METRICS_NAMESPACE (the template's "conveyor"; the same without it, in a test or a
    script), flushed as EMF by each handler's `@metrics.log_metrics`."""
    return Metrics(namespace=os.environ.get("POWERTOOLS_METRICS_NAMESPACE") or "conveyor")
