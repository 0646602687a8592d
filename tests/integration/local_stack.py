"""Helpers the integration suites share: clients, signed API calls and waits, built only from the local
stack's outputs file, as any user would."""

from __future__ import annotations

import json
import time

import boto3
import requests

from conveyor.sigv4 import sign_request


def aws(outputs: dict, service: str):
    """A plain boto3 client built only from the outputs file."""
    return boto3.client(
        service,
        endpoint_url=outputs["EndpointUrl"],
        region_name=outputs["Region"],
        aws_access_key_id=outputs["AccessKeyId"],
        aws_secret_access_key=outputs["SecretAccessKey"],
    )


def signed_post(outputs: dict, path: str, body: dict, secret: str | None = None) -> requests.Response:
    """POST `body` as JSON to the local HTTPS API, signed with SigV4 (with `secret` instead, to sign wrongly)."""
    url = outputs["ApiUrl"] + path
    data = json.dumps(body).encode()
    headers = sign_request(
        "POST",
        url,
        data,
        (outputs["AccessKeyId"], secret or outputs["SecretAccessKey"], None),
        outputs["Region"],
        headers={"Content-Type": "application/json"},
    )
    return requests.post(url, data=data, headers=headers, verify=outputs["CaBundle"], timeout=60)


def wait_for_execution(sfn, machine_arn: str, prefix: str, timeout=300) -> dict:
    """The first execution whose name starts with `prefix`, once it has finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [
            e
            for e in sfn.list_executions(stateMachineArn=machine_arn)["executions"]
            if e["name"].startswith(prefix)
        ]
        if found and found[0]["status"] != "RUNNING":
            return sfn.describe_execution(executionArn=found[0]["executionArn"])
        time.sleep(1)
    raise AssertionError(f"no finished execution for {prefix} within {timeout} s")


def states_entered(sfn, execution_arn: str) -> list[str]:
    """The names of the states an execution entered, in order."""
    events = sfn.get_execution_history(executionArn=execution_arn, maxResults=1000)["events"]
    return [e["stateEnteredEventDetails"]["name"] for e in events if e["type"].endswith("StateEntered")]


class Inbox:
    """An SQS queue subscribed to the stack's notification topic: hears notifications as a subscriber."""

    def __init__(self, outputs: dict, name: str) -> None:
        self._sqs = aws(outputs, "sqs")
        self.url = self._sqs.create_queue(QueueName=name)["QueueUrl"]
        arn = self._sqs.get_queue_attributes(QueueUrl=self.url, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        aws(outputs, "sns").subscribe(TopicArn=outputs["NotificationTopicArn"], Protocol="sqs", Endpoint=arn)

    def messages(self) -> list[dict]:
        """The notifications received so far (waiting up to 5 s for the first)."""
        received = self._sqs.receive_message(QueueUrl=self.url, MaxNumberOfMessages=10, WaitTimeSeconds=5)
        return [json.loads(json.loads(m["Body"])["Message"]) for m in received.get("Messages", [])]


class EventInbox:
    """An SQS queue behind an EventBridge rule for conveyor's events about one dataset: hears them as a rule
    target would."""

    def __init__(self, outputs: dict, name: str, dataset: str) -> None:
        self._sqs = aws(outputs, "sqs")
        self.url = self._sqs.create_queue(QueueName=name)["QueueUrl"]
        arn = self._sqs.get_queue_attributes(QueueUrl=self.url, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        events = aws(outputs, "events")
        pattern = {"source": ["conveyor"], "detail": {"dataset": [dataset]}}
        events.put_rule(Name=name, EventPattern=json.dumps(pattern))
        events.put_targets(Rule=name, Targets=[{"Id": "inbox", "Arn": arn}])

    def events(self) -> list[dict]:
        """The events received so far (waiting up to 5 s for the first)."""
        received = self._sqs.receive_message(QueueUrl=self.url, MaxNumberOfMessages=10, WaitTimeSeconds=5)
        return [json.loads(m["Body"]) for m in received.get("Messages", [])]
