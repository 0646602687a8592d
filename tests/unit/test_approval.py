"""ApprovalFunction: which approved packages it deploys, and how it names and feeds the deploying execution."""

import json
from pathlib import Path

import pytest
from moto.events.models import EventPattern, EventPatternParser

from approval.core import deployment, deployment_name, package_to_deploy
from conveyor.local.template import Stack

ROOT = Path(__file__).resolve().parents[2]
TRAINED = "arn:aws:states:us-east-1:123456789012:execution:conveyor-Pipeline:careful-" + "a" * 32


def package(status="Approved", **metadata):
    return {
        "ModelPackageArn": "arn:aws:sagemaker:us-east-1:123456789012:model-package/conveyor-careful/1",
        "ModelApprovalStatus": status,
        "CustomerMetadataProperties": {"approval": "manual", "execution": TRAINED, **metadata},
    }


def test_only_manual_packages_a_person_approved_are_deployed():
    assert package_to_deploy({}, package()) is None
    assert "PendingManualApproval" in package_to_deploy({}, package("PendingManualApproval"))
    assert "Rejected" in package_to_deploy({}, package("Rejected"))
    assert "approved this package itself" in package_to_deploy({}, package(approval="auto"))
    unnamed = package()
    del unnamed["CustomerMetadataProperties"]["execution"]
    assert "does not name the execution" in package_to_deploy({}, unnamed)


def test_the_deployment_reuses_the_training_input_under_a_name_of_its_own():
    run = deployment("arn:package/1", TRAINED, json.dumps({"dataset": "careful", "names": {"model": "m"}}))
    assert run.input == {
        "dataset": "careful",
        "names": {"model": "m"},
        "approved": {"package": "arn:package/1"},
    }
    assert run.name == "careful-" + "a" * 32 + "-approved"
    long = TRAINED.rsplit(":", 1)[0] + ":" + "x" * 80
    assert len(deployment_name(long)) == 80 and deployment_name(long).endswith("-approved")


@pytest.mark.parametrize(
    ("status", "group", "matches"),
    [
        ("Approved", "conveyor-careful", True),
        ("PendingManualApproval", "conveyor-careful", False),
        ("Approved", "someone-elses-group", False),
    ],
)
def test_the_template_rule_hears_approvals_of_this_stack_only(status, group, matches):
    stack = Stack(ROOT)
    (rule,) = stack.resources["ApprovalFunction"].properties["Events"].values()
    raw = json.dumps(stack.resolve(rule["Properties"]["Pattern"]))
    matcher = EventPattern(raw, EventPatternParser(raw).parse())
    event = {
        "source": "aws.sagemaker",
        "detail-type": "SageMaker Model Package State Change",
        "detail": {"ModelApprovalStatus": status, "ModelPackageGroupName": group},
    }
    assert matcher.matches_event(event) is matches
