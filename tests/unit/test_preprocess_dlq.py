"""A poison message goes through the real poller and handler, is retried, and ends in the DLQ with a log."""

import json
import logging
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from common import aws
from conveyor.local.lambdas import FunctionSpec, LambdaRuntime, SqsEventSource

FUNCTIONS = Path(__file__).resolve().parents[2] / "functions"
REGION = "us-east-1"


@pytest.fixture
def queues(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    with mock_aws():
        aws.reset_clients()
        sqs = boto3.client("sqs", region_name=REGION)
        dlq_url = sqs.create_queue(QueueName="ingest-dlq")["QueueUrl"]
        dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        url = sqs.create_queue(
            QueueName="ingest",
            Attributes={
                # Zero so the test need not wait out the template's visibility timeout between receives.
                "VisibilityTimeout": "0",
                "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "3"}),
            },
        )["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        yield sqs, url, arn, dlq_url
        aws.reset_clients()


def test_a_poison_message_is_retried_then_moved_to_the_dlq_with_the_reason_logged(queues, caplog):
    sqs, url, arn, dlq_url = queues
    runtime = LambdaRuntime(
        {"STACK_NAME": "conveyor", "POWERTOOLS_METRICS_DISABLED": "true"}, REGION, "123456789012"
    )
    runtime.register(
        FunctionSpec(name="preprocess", handler="preprocess.app.handler", code_dir=FUNCTIONS, environment={})
    )
    poller = SqsEventSource(sqs, runtime, "preprocess", url, arn, 10, REGION, report_batch_item_failures=True)
    sqs.send_message(QueueUrl=url, MessageBody='{"not": "an S3 event"}')

    with caplog.at_level(logging.ERROR):
        deliveries = sum(poller.poll_once() for _ in range(6))

    assert deliveries == 3  # maxReceiveCount
    moved = sqs.receive_message(QueueUrl=dlq_url, AttributeNames=["All"])["Messages"]
    assert [m["Body"] for m in moved] == ['{"not": "an S3 event"}']
    assert "Messages" not in sqs.receive_message(QueueUrl=url)
    logged = [r for r in caplog.records if "dead-letter queue" in r.getMessage()]
    assert len(logged) == 3  # one log per failed delivery, with the cause
    assert all("neither an S3 event notification" in (r.exc_text or "") for r in logged)
