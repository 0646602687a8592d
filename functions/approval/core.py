"""What a model package's approval means for the pipeline, as pure functions (ApprovalFunction's logic).

A dataset with `"approval": "manual"` in conveyor.json leaves each model that passes the gate in
PendingManualApproval (`RegisterPendingModel`). When a person approves the package (the SageMaker console,
`UpdateModelPackage`, or `conveyor approve`), SageMaker sends a "SageMaker Model Package State Change"
event; ApprovalFunction answers it by starting the pipeline again with the original execution's input and
`approved.package`, which skips to the deployment of that package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Step Functions execution names: at most 80 characters.
EXECUTION_NAME_MAX = 80
SUFFIX = "-approved"


@dataclass(frozen=True)
class Deployment:
    """The execution that deploys an approved package."""

    name: str
    input: dict[str, Any]


def package_to_deploy(detail: dict[str, Any], package: dict[str, Any]) -> str | None:
    """Why not, or None: the package is one of conveyor's manual-approval packages, now Approved.

    `detail` is the event's detail; `package` is DescribeModelPackage of it (the event may be older than
    the package's current state, which is the one that counts).
    """
    if package.get("ModelApprovalStatus") != "Approved":
        return f"the package is {package.get('ModelApprovalStatus')}, not Approved"
    metadata = package.get("CustomerMetadataProperties") or {}
    if metadata.get("approval") != "manual":
        return "the pipeline approved this package itself (approval auto): it deployed it then"
    if not metadata.get("execution"):
        return "the package does not name the execution that trained it"
    return None


def deployment_name(execution_arn: str) -> str:
    """The name of the execution that deploys what `execution_arn` trained (one per training execution,
    so a repeated event starts nothing twice)."""
    trained = execution_arn.rsplit(":", 1)[-1]
    return trained[: EXECUTION_NAME_MAX - len(SUFFIX)] + SUFFIX


def deployment(package_arn: str, execution_arn: str, execution_input: str) -> Deployment:
    """The deploying execution: the training execution's input plus the approved package."""
    document = json.loads(execution_input)
    document["approved"] = {"package": package_arn}
    return Deployment(name=deployment_name(execution_arn), input=document)
