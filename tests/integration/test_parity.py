"""Local mode is the template: every resource of template.yaml exists in the local stack (or is on the
reviewed list of what local mode does not create, with the reason), every function has exactly the template's
environment, and every DefinitionSubstitution is used by the ASL file and none is missing (issue 7)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from local_stack import aws

from conveyor.local.template import Stack

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
# What local mode does not create, and why; a new resource type fails the test until it is added here or
# created locally.
NOT_CREATED = {
    "AWS::S3::BucketPolicy": "moto enforces aws:SecureTransport and local clients speak HTTP (docs/local-mode.md)",
    "AWS::Serverless::HttpApi": "the local HTTPS gateway (conveyor/local/gateway.py) serves its routes",
    "AWS::SQS::QueuePolicy": "moto's S3 notifies the queue without it (tests/unit/test_iam_policy.py checks it)",
    "AWS::IAM::ManagedPolicy": "local mode evaluates no IAM (tests/unit/test_iam_policy.py checks the policies)",
    "AWS::Lambda::Permission": "the local gateways invoke the function in-process",
    "AWS::Serverless::LayerVersion": "functions run in-process, in the virtualenv that has the layer's Pillow",
}


def test_every_template_resource_exists_locally(cloud):
    stack, outputs = cloud.stack, cloud.outputs
    s3, sqs, sns = aws(outputs, "s3"), aws(outputs, "sqs"), aws(outputs, "sns")
    lam, sfn, iam, cloudwatch = (aws(outputs, s) for s in ("lambda", "stepfunctions", "iam", "cloudwatch"))
    kms = aws(outputs, "kms")
    present = {
        "AWS::KMS::Key": {k["KeyId"] for k in kms.list_keys()["Keys"]},
        "AWS::KMS::Alias": {a["AliasName"] for a in kms.list_aliases()["Aliases"]},
        "AWS::S3::Bucket": {b["Name"] for b in s3.list_buckets()["Buckets"]},
        "AWS::SQS::Queue": set(sqs.list_queues().get("QueueUrls", [])),
        "AWS::SNS::Topic": {t["TopicArn"] for t in sns.list_topics()["Topics"]},
        "AWS::IAM::Role": {r["RoleName"] for r in iam.list_roles()["Roles"]},
        "AWS::Serverless::Function": {f["FunctionName"] for f in lam.list_functions()["Functions"]},
        "AWS::Serverless::StateMachine": {
            m["stateMachineArn"] for m in sfn.list_state_machines()["stateMachines"]
        },
        "AWS::CloudWatch::Alarm": {a["AlarmName"] for a in cloudwatch.describe_alarms()["MetricAlarms"]},
        "AWS::CloudWatch::Dashboard": {
            d["DashboardName"] for d in cloudwatch.list_dashboards()["DashboardEntries"]
        },
    }
    missing, unknown = [], []
    for resource in stack.resources.values():
        if resource.type in NOT_CREATED:
            continue
        if resource.type not in present:
            unknown.append(f"{resource.logical_id} ({resource.type})")
        elif resource.attributes["Ref"] not in present[resource.type]:
            missing.append(f"{resource.logical_id} ({resource.attributes['Ref']})")
    assert unknown == [], f"local mode does not know these resource types: {unknown}"
    assert missing == [], f"template resources missing from the local stack: {missing}"


def test_every_function_has_exactly_the_template_environment(cloud):
    lam = aws(cloud.outputs, "lambda")
    for function in cloud.stack.of_type("AWS::Serverless::Function"):
        configuration = lam.get_function_configuration(FunctionName=function.attributes["Ref"])
        local = configuration.get("Environment", {}).get("Variables", {})
        template = cloud.stack.function_environment(function.logical_id)
        # Local mode adds its own settings (quiet logs, no EMF); it never drops or changes the template's.
        assert {k: local.get(k) for k in template} == template, function.logical_id


def test_definition_substitutions_and_the_asl_file_name_the_same_things():
    stack = Stack(ROOT)
    (machine,) = stack.of_type("AWS::Serverless::StateMachine")
    text = (ROOT / machine.properties["DefinitionUri"]).read_text()
    used = set(re.findall(r"\$\{(\w+)\}", text))
    defined = set(machine.properties["DefinitionSubstitutions"])
    assert used - defined == set(), "the ASL uses substitutions the template does not define"
    assert defined - used == set(), "the template defines substitutions the ASL never uses"
    json.loads(stack.state_machine_definition(machine.logical_id))
