"""An aborted or timed-out execution: its running jobs are stopped, finished or missing ones left alone, the
subscribers told once; and the template's rule routes exactly those events to CleanupFunction."""

import copy
import json
from pathlib import Path

import boto3
import pytest
from botocore.stub import ANY, Stubber

from cleanup import app as cleanup_app
from cleanup.core import EndedExecution, clean_up, ended_execution, notification
from common import aws
from conveyor.local.template import Stack

ROOT = Path(__file__).resolve().parents[2]
EVENT = json.loads((ROOT / "tests" / "events" / "stepfunctions_execution_aborted.json").read_text())
TRAINING_JOB = "churn-20261122T175500Z-1a2b3c"
PROCESSING_JOB = "conveyor-churn-20261122T175500Z-1a2b3c"


def with_processing(event: dict) -> dict:
    event = copy.deepcopy(event)
    document = json.loads(event["detail"]["input"])
    document["preprocessing"] = {"mode": "processing", "job_name": PROCESSING_JOB}
    event["detail"]["input"] = json.dumps(document)
    return event


class FakeJobs:
    """SageMaker's job statuses, with StopJob moving InProgress to Stopping."""

    def __init__(self, **statuses):
        self.statuses = statuses
        self.stops = []

    def status(self, kind, name):
        return self.statuses.get(name)

    def stop(self, kind, name):
        self.stops.append((kind, name))
        self.statuses[name] = "Stopping"
        return "Stopping"


def test_a_running_training_job_is_stopped_and_named_in_the_notice():
    execution = ended_execution(EVENT["detail"])
    jobs = FakeJobs(**{TRAINING_JOB: "InProgress"})

    report = clean_up(execution, jobs)

    assert jobs.stops == [("training", TRAINING_JOB)]
    assert report == [{"kind": "training", "name": TRAINING_JOB, "status": "InProgress", "stopped": True}]
    notice = notification(execution, report)
    assert notice.subject == "conveyor: churn 20261122T175500Z-1a2b3c aborted"
    assert notice.message["outcome"] == "aborted"
    assert notice.message["execution"] == EVENT["detail"]["executionArn"]
    assert notice.message["stopped"] == [f"training job {TRAINING_JOB}"]
    assert notice.attributes == {
        "outcome": {"DataType": "String", "StringValue": "aborted"},
        "dataset": {"DataType": "String", "StringValue": "churn"},
    }


@pytest.mark.parametrize("status", ["Completed", "Failed", "Stopped", "Stopping"])
def test_a_job_that_is_not_running_is_left_alone(status):
    jobs = FakeJobs(**{TRAINING_JOB: status})
    report = clean_up(ended_execution(EVENT["detail"]), jobs)
    assert jobs.stops == []
    assert report[0]["status"] == status and not report[0]["stopped"]


def test_a_processing_job_is_stopped_and_a_training_job_never_started_is_fine():
    execution = ended_execution(with_processing(EVENT)["detail"])
    jobs = FakeJobs(**{PROCESSING_JOB: "InProgress"})

    report = clean_up(execution, jobs)

    assert jobs.stops == [("processing", PROCESSING_JOB)]
    assert [(j["kind"], j["status"], j["stopped"]) for j in report] == [
        ("processing", "InProgress", True),
        ("training", "NotStarted", False),
    ]


def test_cleaning_up_twice_stops_nothing_the_second_time():
    execution = ended_execution(EVENT["detail"])
    jobs = FakeJobs(**{TRAINING_JOB: "InProgress"})
    clean_up(execution, jobs)
    again = clean_up(execution, jobs)
    assert jobs.stops == [("training", TRAINING_JOB)]
    assert again[0] == {"kind": "training", "name": TRAINING_JOB, "status": "Stopping", "stopped": False}


def test_only_aborted_and_timed_out_executions_need_cleaning_up():
    for status in ("RUNNING", "SUCCEEDED", "FAILED"):
        assert ended_execution({**EVENT["detail"], "status": status}) is None
    timed_out = ended_execution({**EVENT["detail"], "status": "TIMED_OUT"})
    assert isinstance(timed_out, EndedExecution) and timed_out.outcome == "timed_out"
    assert notification(timed_out, []).subject.endswith(" timed out")


def test_an_event_without_its_input_takes_it_from_describe_execution():
    detail = {**EVENT["detail"], "input": None, "inputDetails": {"included": False}}
    with pytest.raises(ValueError, match="no input"):
        ended_execution(detail)
    assert ended_execution(detail, EVENT["detail"]["input"]).training_job == TRAINING_JOB
    with pytest.raises(ValueError, match="not a conveyor execution input"):
        ended_execution({**EVENT["detail"], "input": "{}"})


# ---------------------------------------------------------------- the handler, AWS stubbed at the client
class Context:
    function_name = "cleanup"
    memory_limit_in_mb = 256
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:cleanup"
    aws_request_id = "req"


@pytest.fixture
def stubbed(monkeypatch):
    monkeypatch.setenv("ARTIFACTS_BUCKET", "artifacts")
    monkeypatch.setenv(
        "NOTIFICATION_TOPIC_ARN", "arn:aws:sns:us-east-1:123456789012:conveyor-NotificationTopic"
    )
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "true")
    clients = {
        s: boto3.client(s, region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b")
        for s in ("sagemaker", "sns", "s3", "stepfunctions")
    }
    stubbers = {s: Stubber(c) for s, c in clients.items()}
    for service, client in clients.items():
        aws.set_client(service, client)
        stubbers[service].activate()
    yield stubbers
    for stubber in stubbers.values():
        stubber.assert_no_pending_responses()
    aws.reset_clients()


def test_the_handler_stops_the_job_records_the_cleanup_and_notifies(stubbed):
    stubbed["sagemaker"].add_response(
        "describe_training_job",
        {"TrainingJobStatus": "InProgress"} | _training_job_shape(),
        {"TrainingJobName": TRAINING_JOB},
    )
    stubbed["sagemaker"].add_response("stop_training_job", {}, {"TrainingJobName": TRAINING_JOB})
    record = f"cleanup/churn/{EVENT['detail']['name']}.json"
    stubbed["s3"].add_response(
        "put_object",
        {},
        {
            "Bucket": "artifacts",
            "Key": record,
            "Body": ANY,
            "ContentType": "application/json",
            "IfNoneMatch": "*",
        },
    )
    stubbed["sns"].add_response(
        "publish",
        {"MessageId": "m-1"},
        {
            "TopicArn": "arn:aws:sns:us-east-1:123456789012:conveyor-NotificationTopic",
            "Subject": "conveyor: churn 20261122T175500Z-1a2b3c aborted",
            "Message": ANY,
            "MessageAttributes": {
                "outcome": {"DataType": "String", "StringValue": "aborted"},
                "dataset": {"DataType": "String", "StringValue": "churn"},
            },
        },
    )
    result = cleanup_app.handler(EVENT, Context())
    assert result["notified"] and result["stopped"] == [f"training job {TRAINING_JOB}"]


def test_a_repeated_event_stops_nothing_and_does_not_notify_again(stubbed):
    stubbed["sagemaker"].add_response(
        "describe_training_job",
        {"TrainingJobStatus": "Stopped"} | _training_job_shape(),
        {"TrainingJobName": TRAINING_JOB},
    )
    stubbed["s3"].add_client_error("put_object", "PreconditionFailed", http_status_code=412)
    result = cleanup_app.handler(EVENT, Context())
    assert result["notified"] is False and result["stopped"] == []


def test_a_job_never_created_is_reported_not_started(stubbed):
    stubbed["sagemaker"].add_client_error(
        "describe_training_job", "ValidationException", "Requested resource not found."
    )
    stubbed["s3"].add_response("put_object", {})
    stubbed["sns"].add_response("publish", {"MessageId": "m-2"})
    result = cleanup_app.handler(EVENT, Context())
    assert result["jobs"][0]["status"] == "NotStarted" and result["stopped"] == []


def test_a_failed_notice_removes_the_record_so_the_retry_notifies(stubbed):
    stubbed["sagemaker"].add_response(
        "describe_training_job", {"TrainingJobStatus": "Completed"} | _training_job_shape()
    )
    stubbed["s3"].add_response("put_object", {})
    stubbed["sns"].add_client_error("publish", "InternalError", http_status_code=500)
    stubbed["s3"].add_response("delete_object", {})
    with pytest.raises(Exception, match="InternalError"):
        cleanup_app.handler(EVENT, Context())


def _training_job_shape() -> dict:
    # The members DescribeTrainingJob always returns (botocore's Stubber validates the response shape).
    return {
        "TrainingJobName": TRAINING_JOB,
        "TrainingJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:training-job/{TRAINING_JOB}",
        "ModelArtifacts": {"S3ModelArtifacts": "s3://artifacts/model.tar.gz"},
        "SecondaryStatus": "Training",
        "AlgorithmSpecification": {"TrainingInputMode": "File"},
        "ResourceConfig": {"VolumeSizeInGB": 30},
        "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
        "CreationTime": "2026-11-22T19:40:00Z",
    }


# ---------------------------------------------------------------- the rule, as template.yaml declares it
def test_the_template_rule_matches_aborted_and_timed_out_executions_of_the_pipeline_only():
    from moto.events.models import EventPattern

    stack = Stack(ROOT)
    (rule,) = [
        event
        for event in stack.resources["CleanupFunction"].properties["Events"].values()
        if event["Type"] == "EventBridgeRule"
    ]
    pattern = stack.resolve(rule["Properties"]["Pattern"])
    matcher = EventPattern(json.dumps(pattern), pattern)

    def event(**detail):
        changed = copy.deepcopy(EVENT)
        changed["detail"].update(detail)
        return changed

    assert stack.resolve({"Ref": "Pipeline"}) == EVENT["detail"]["stateMachineArn"]
    assert matcher.matches_event(event(status="ABORTED"))
    assert matcher.matches_event(event(status="TIMED_OUT"))
    assert not matcher.matches_event(event(status="FAILED"))
    assert not matcher.matches_event(event(status="SUCCEEDED"))
    assert not matcher.matches_event(
        event(stateMachineArn="arn:aws:states:us-east-1:123456789012:stateMachine:someone-else")
    )


def test_an_event_the_function_keeps_failing_lands_in_its_dead_letter_queue(monkeypatch):
    from conveyor.local import events as local_events

    class FailingRuntime:
        calls = 0

        def invoke(self, function, event):
            FailingRuntime.calls += 1
            return {"errorMessage": "boom"}, True

    monkeypatch.setattr(local_events, "ASYNC_RETRY_DELAYS", (0.01, 0.01))
    bus = local_events.EventBridgeBus(FailingRuntime(), "us-east-1", "123456789012")
    dead: list[dict] = []
    bus.add_rule("rule", {"source": ["aws.states"]}, "conveyor-CleanupFunction", dead.append)
    assert bus.put(EVENT) == ["conveyor-CleanupFunction"]
    bus.drain()
    assert FailingRuntime.calls == 3 and dead == [EVENT]
