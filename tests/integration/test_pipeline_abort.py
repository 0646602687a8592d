"""An execution aborted by hand on the local stack: the training job it started is stopped (it would bill on
for hours otherwise), its subscribers hear `aborted`, and a repeated event changes nothing."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from local_stack import Inbox, aws

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def rows(n=300, seed=11) -> bytes:
    rng = random.Random(seed)
    lines = ["x,y,label"] + [f"{rng.random():.4f},{rng.random():.4f},{'ab'[i % 2]}" for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


def wait_for(what: str, probe, timeout: float = 120):
    """Poll `probe` until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout} s")


def notices(inbox: Inbox, outcome: str, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    heard: list[dict] = []
    while time.monotonic() < deadline and not heard:
        heard = [n for n in inbox.messages() if n["outcome"] == outcome]
    return heard


def test_stopping_an_execution_stops_its_training_job_and_tells_subscribers(cloud):
    outputs = cloud.outputs
    s3, sfn, sagemaker = (aws(outputs, s) for s in ("s3", "stepfunctions", "sagemaker"))
    inbox = Inbox(outputs, "abort-notifications")
    bucket = outputs["RawBucketName"]
    # Far more epochs than anyone waits for, and no early stopping: the job runs until it is stopped.
    spec = {"hyperparameters": {"epochs": 1000000, "patience": 1000000}}
    s3.put_object(Bucket=bucket, Key="datasets/endless/conveyor.json", Body=json.dumps(spec).encode())
    s3.put_object(Bucket=bucket, Key="datasets/endless/data.csv", Body=rows())

    def running_execution():
        return [
            e
            for e in sfn.list_executions(stateMachineArn=outputs["StateMachineArn"])["executions"]
            if e["name"].startswith("endless-") and e["status"] == "RUNNING"
        ]

    (execution,) = wait_for("a running execution", running_execution)
    arn = execution["executionArn"]
    job = json.loads(sfn.describe_execution(executionArn=arn)["input"])["names"]["training_job"]

    def training():
        try:
            found = sagemaker.describe_training_job(TrainingJobName=job)
        except sagemaker.exceptions.ClientError:
            return None  # not created yet
        return found["TrainingJobStatus"] == "InProgress" and found["SecondaryStatus"] == "Training"

    wait_for(f"training job {job} InProgress", training)
    sfn.stop_execution(executionArn=arn, error="Operator", cause="stopped by hand in a test")

    wait_for(
        "the execution ABORTED", lambda: sfn.describe_execution(executionArn=arn)["status"] == "ABORTED", 60
    )
    wait_for(
        f"training job {job} Stopped",
        lambda: sagemaker.describe_training_job(TrainingJobName=job)["TrainingJobStatus"] == "Stopped",
        60,
    )
    (notice,) = notices(inbox, "aborted")
    assert notice["dataset"] == "endless" and notice["execution"] == arn
    assert notice["stopped"] == [f"training job {job}"]
    assert notice["jobs"] == [{"kind": "training", "name": job, "status": "InProgress", "stopped": True}]

    # EventBridge may deliver an event twice: the second delivery stops nothing and tells no one.
    (event,) = [e for e in cloud.events.emitted if e["detail"]["executionArn"] == arn]
    assert cloud.events.put(event) == [cloud.stack.resources["CleanupFunction"].attributes["Ref"]]
    cloud.events.drain()
    assert notices(inbox, "aborted", timeout=6) == []
    assert sagemaker.describe_training_job(TrainingJobName=job)["TrainingJobStatus"] == "Stopped"


def test_an_execution_past_its_timeout_emits_a_timed_out_event(cloud):
    """moto's executor models the definition's TimeoutSeconds; the event reaches only matching rules (this
    state machine is not the Pipeline, so CleanupFunction is not invoked)."""
    outputs = cloud.outputs
    sfn = aws(outputs, "stepfunctions")
    definition = {
        "TimeoutSeconds": 1,
        "StartAt": "Sleep",
        "States": {"Sleep": {"Type": "Wait", "Seconds": 30, "End": True}},
    }
    machine = sfn.create_state_machine(
        name="slow-to-finish",
        definition=json.dumps(definition),
        roleArn="arn:aws:iam::123456789012:role/conveyor-local-states",
    )["stateMachineArn"]
    arn = sfn.start_execution(stateMachineArn=machine, name="late", input='{"dataset": "x"}')["executionArn"]

    wait_for(
        "the execution TIMED_OUT",
        lambda: sfn.describe_execution(executionArn=arn)["status"] == "TIMED_OUT",
        30,
    )
    (event,) = wait_for(
        "its status change event", lambda: [e for e in cloud.events.emitted if e["resources"] == [arn]], 10
    )
    assert (
        event["source"] == "aws.states" and event["detail-type"] == "Step Functions Execution Status Change"
    )
    assert event["detail"]["status"] == "TIMED_OUT" and event["detail"]["input"] == '{"dataset": "x"}'
    assert event["detail"]["stateMachineArn"] == machine
    assert not [d for d in cloud.events.delivered if d[1] is event]
