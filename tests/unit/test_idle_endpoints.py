"""IdleEndpointsFunction: endpoints nobody calls are deleted after IdleEndpointDays, and only those."""

from datetime import UTC, datetime, timedelta

import boto3
import pytest
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID
from moto.sagemaker.models import sagemaker_backends

from common import aws
from idle import app as idle_app
from idle.core import Endpoint, idle

NOW = datetime(2026, 11, 30, tzinfo=UTC)


def endpoint(days_since_change=30, invocations=0.0, status="InService"):
    return Endpoint("conveyor-churn", status, NOW - timedelta(days=days_since_change), invocations)


def test_only_an_endpoint_unused_and_unchanged_for_the_whole_window_is_idle():
    assert "no invocations in 14 days" in idle(endpoint(), 14, NOW)
    assert idle(endpoint(invocations=1), 14, NOW) is None
    assert idle(endpoint(days_since_change=3), 14, NOW) is None  # deployed recently: no traffic yet is fine
    assert idle(endpoint(status="Updating"), 14, NOW) is None
    assert idle(endpoint(), 0, NOW) is None  # the feature is off


@pytest.fixture
def account(monkeypatch, lambda_context):
    with mock_aws():
        monkeypatch.setenv("STACK_NAME", "conveyor")
        monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "true")
        aws.reset_clients()
        sagemaker = boto3.client("sagemaker", region_name="us-east-1")
        sns = boto3.client("sns", region_name="us-east-1")
        sqs = boto3.client("sqs", region_name="us-east-1")
        topic = sns.create_topic(Name="notifications")["TopicArn"]
        queue = sqs.create_queue(QueueName="inbox")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=arn)
        monkeypatch.setenv("NOTIFICATION_TOPIC_ARN", topic)
        for service, client in (("sagemaker", sagemaker), ("sns", sns)):
            aws.set_client(service, client)
        aws.set_client("cloudwatch", boto3.client("cloudwatch", region_name="us-east-1"))
        backend = sagemaker_backends[DEFAULT_ACCOUNT_ID]["us-east-1"]
        for name, days_ago in (("conveyor-old", 30), ("conveyor-new", 1), ("other-stack-old", 30)):
            sagemaker.create_model(ModelName=name, ExecutionRoleArn="arn:aws:iam::123456789012:role/r")
            sagemaker.create_endpoint_config(
                EndpointConfigName=name,
                ProductionVariants=[
                    {
                        "VariantName": "AllTraffic",
                        "ModelName": name,
                        "InstanceType": "ml.m5.large",
                        "InitialInstanceCount": 1,
                    }
                ],
            )
            sagemaker.create_endpoint(EndpointName=name, EndpointConfigName=name)
            backend.endpoints[name].last_modified_time = str(datetime.now(UTC) - timedelta(days=days_ago))
        yield sagemaker, sqs, queue
        aws.reset_clients()


def test_the_daily_run_deletes_idle_endpoints_of_this_stack_only(account, monkeypatch, lambda_context):
    sagemaker, sqs, queue = account
    monkeypatch.setenv("IDLE_ENDPOINT_DAYS", "0")
    assert idle_app.handler({}, lambda_context)["deleted"] == []

    monkeypatch.setenv("IDLE_ENDPOINT_DAYS", "14")
    result = idle_app.handler({}, lambda_context)
    assert [d["endpoint"] for d in result["deleted"]] == ["conveyor-old"]
    left = sorted(e["EndpointName"] for e in sagemaker.list_endpoints()["Endpoints"])
    assert left == ["conveyor-new", "other-stack-old"]
    assert sagemaker.describe_endpoint_config(EndpointConfigName="conveyor-old")  # kept: redeployable
    (message,) = sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=1)["Messages"]
    assert "conveyor-old" in message["Body"] and "endpoint_deleted" in message["Body"]


def test_an_endpoint_that_was_called_is_kept(account, monkeypatch, lambda_context):
    sagemaker, _, _ = account
    monkeypatch.setenv("IDLE_ENDPOINT_DAYS", "14")
    monkeypatch.setattr(idle_app, "_invocations", lambda name, since, now: 3.0)
    assert idle_app.handler({}, lambda_context)["deleted"] == []
    assert len(sagemaker.list_endpoints()["Endpoints"]) == 3
