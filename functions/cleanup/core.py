"""What is left to clean up when a pipeline execution ends without reaching its own end.

A person's StopExecution, or the state machine's TimeoutSeconds, ends an execution wherever it is: the
SageMaker job it was polling keeps running (and billing). The execution input (docs/contracts.md, section
6) names every job an execution may have started, so this module needs nothing but that input and a way to
describe and stop jobs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

# Step Functions execution statuses that leave work behind, and the notification outcome of each.
OUTCOMES = {"ABORTED": "aborted", "TIMED_OUT": "timed_out"}
# SageMaker job statuses in which a job still runs and can be stopped.
RUNNING = "InProgress"
STOPPING = "Stopping"


@dataclass(frozen=True)
class EndedExecution:
    """One pipeline execution that ended without finishing, as its status change event describes it."""

    execution_arn: str
    name: str
    status: str
    dataset: str
    version: str
    training_job: str
    processing_job: str | None = None

    @property
    def outcome(self) -> str:
        return OUTCOMES[self.status]

    def jobs(self) -> list[tuple[str, str]]:
        """(kind, name) of every job the execution may have started, in the order it starts them."""
        started = [("processing", self.processing_job)] if self.processing_job else []
        return [*started, ("training", self.training_job)]


def ended_execution(detail: Mapping[str, Any], execution_input: str | None = None) -> EndedExecution | None:
    """Read the `detail` of a "Step Functions Execution Status Change" event.

    Parameters
    ----------
    detail
        The event's detail: `executionArn`, `name`, `status` and `input` (the execution input as a JSON
        string; absent or null when EventBridge left it out for its size).
    execution_input
        The input from DescribeExecution, for an event that does not carry it.

    Returns
    -------
    EndedExecution or None
        None for a status that leaves nothing behind (RUNNING, SUCCEEDED, FAILED: the pipeline stops its own
        jobs on every failure path).

    Raises
    ------
    ValueError
        The input is not a conveyor execution input (no dataset, version or training job name).
    """
    status = str(detail.get("status", ""))
    if status not in OUTCOMES:
        return None
    raw = detail.get("input") or execution_input
    if not raw:
        raise ValueError(f"execution {detail.get('executionArn')}: the event carries no input")
    document = json.loads(raw) if isinstance(raw, str) else raw
    try:
        names = document["names"]
        preprocessing = document.get("preprocessing") or {}
        return EndedExecution(
            execution_arn=str(detail["executionArn"]),
            name=str(detail.get("name") or str(detail["executionArn"]).rsplit(":", 1)[-1]),
            status=status,
            dataset=str(document["dataset"]),
            version=str(document["version"]),
            training_job=str(names["training_job"]),
            processing_job=preprocessing.get("job_name")
            if preprocessing.get("mode") == "processing"
            else None,
        )
    except (KeyError, TypeError) as missing:
        raise ValueError(
            f"execution {detail.get('executionArn')}: input is not a conveyor execution input ({missing!r})"
        ) from None


class Jobs(Protocol):
    """Describe and stop SageMaker jobs (`kind` is "training" or "processing")."""

    def status(self, kind: str, name: str) -> str | None:
        """The job's status, or None when no job has that name (the execution never started it)."""

    def stop(self, kind: str, name: str) -> str:
        """Ask SageMaker to stop the job; return its status afterwards (Stopping, or the status it reached
        first if it ended in the meantime)."""


def clean_up(execution: EndedExecution, jobs: Jobs) -> list[dict[str, Any]]:
    """Stop every job of `execution` that still runs; leave finished and never-started ones alone.

    Safe to repeat: a second call finds the jobs Stopping or Stopped and stops nothing.

    Returns
    -------
    list of dict
        Per job: `kind`, `name`, `status` (as found; "NotStarted" when there is no such job) and `stopped`.
    """
    report = []
    for kind, name in execution.jobs():
        status = jobs.status(kind, name)
        stopped = False
        if status == RUNNING:
            stopped = jobs.stop(kind, name) in (STOPPING, "Stopped")
        report.append({"kind": kind, "name": name, "status": status or "NotStarted", "stopped": stopped})
    return report


@dataclass(frozen=True)
class Notification:
    """An SNS message in the shape of the pipeline's own notifications (the `Notify*` states of the ASL)."""

    subject: str
    message: dict[str, Any]
    attributes: dict[str, dict[str, str]]


def notification(execution: EndedExecution, report: list[dict[str, Any]]) -> Notification:
    """The `aborted` / `timed_out` notification: what ended, and what was stopped so it stops billing."""
    outcome = execution.outcome
    message = {
        "outcome": outcome,
        "dataset": execution.dataset,
        "version": execution.version,
        "execution": execution.execution_arn,
        "stopped": [f"{job['kind']} job {job['name']}" for job in report if job["stopped"]],
        "jobs": report,
    }
    return Notification(
        subject=f"conveyor: {execution.dataset} {execution.version} {outcome.replace('_', ' ')}",
        message=message,
        attributes={
            "outcome": {"DataType": "String", "StringValue": outcome},
            "dataset": {"DataType": "String", "StringValue": execution.dataset},
        },
    )
