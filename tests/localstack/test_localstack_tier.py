"""Issue 7's LocalStack tier: conveyor's stack, read from template.yaml, on LocalStack (community, no Docker).

`make test-localstack` (scripts/localstack_tier.sh) starts LocalStack on a free port and runs this module with
LOCALSTACK_ENDPOINT set; without it every test here is skipped. What LocalStack runs here (S3, SQS, SNS, IAM,
EventBridge, Step Functions) is deployed and exercised; what it cannot run here (SageMaker, Lambda, the HTTP
API) is probed and skipped with LocalStack's own answer as the reason (docs/localstack.md).
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from botocore.exceptions import ClientError
from localstack_client.session import Session
from localstack_stack import Deployed, deploy

from common.config import Settings
from conveyor.local.template import Stack
from preprocess.resources import training_resources

ROOT = Path(__file__).resolve().parents[2]
ENDPOINT = os.environ.get("LOCALSTACK_ENDPOINT", "")

pytestmark = [
    pytest.mark.localstack,
    pytest.mark.skipif(
        not ENDPOINT,
        reason="LOCALSTACK_ENDPOINT is not set: the LocalStack tier runs under `make test-localstack`",
    ),
]


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def stack() -> Stack:
    # LocalStack takes a 12-digit access key id as the account id: ARNs match the ones Stack resolves.
    return Stack(ROOT, stack_name="conveyor")


@pytest.fixture(scope="module")
def session(stack: Stack) -> Session:
    # localstack-client prefers AWS_ENDPOINT_URL over the host it is given; this tier talks to LocalStack only.
    saved = os.environ.pop("AWS_ENDPOINT_URL", None)
    try:
        return Session(
            aws_access_key_id=stack.account_id,
            aws_secret_access_key="test",
            region_name=stack.region,
            localstack_host=urlsplit(ENDPOINT).netloc,
        )
    finally:
        if saved is not None:
            os.environ["AWS_ENDPOINT_URL"] = saved


@pytest.fixture(scope="module")
def deployed(stack: Stack, session: Session) -> Deployed:
    return deploy(stack, session)


def receive_all(sqs: Any, url: str, wait: float = 5.0, **kwargs: Any) -> list[dict]:
    """Messages from `url` until none arrives for a second (or `wait` seconds pass with none at all)."""
    messages: list[dict] = []
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        batch = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1, **kwargs)
        messages += batch.get("Messages", [])
        if messages and not batch.get("Messages"):
            break
    return messages


def s3_records(messages: list[dict]) -> list[dict]:
    """The S3 event records in queue messages (S3's s3:TestEvent, sent on configuration, has none)."""
    return [record for m in messages for record in json.loads(m["Body"]).get("Records", [])]


def subscriber_queue(session: Session, name: str) -> tuple[str, str]:
    sqs = session.client("sqs")
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return url, arn


def execution_input(stack: Stack, dataset: str, version: str, **extra: Any) -> dict:
    """An execution input as PreprocessFunction writes it (docs/contracts.md §6)."""
    processed = stack.resources["ProcessedBucket"].attributes["Ref"]
    artifacts = stack.resources["ArtifactsBucket"].attributes["Ref"]
    raw = stack.resources["RawBucket"].attributes["Ref"]
    prefix = f"s3://{processed}/{dataset}/{version}"
    return {
        "dataset": dataset,
        "version": version,
        "source": {
            "bucket": raw,
            "key": f"datasets/{dataset}/{dataset}.csv",
            "version_id": "v1",
            "etag": "e",
        },
        "task": "classification",
        "target": "label",
        "data": {
            "manifest": f"{prefix}/manifest.json",
            "train": f"{prefix}/train/",
            "validation": f"{prefix}/validation/",
            "test": f"{prefix}/test/",
        },
        "names": {
            "training_job": f"{dataset}-{version}".lower(),
            "model": f"{dataset}-{version}".lower(),
            "endpoint_config": f"{dataset}-{version}".lower(),
            "endpoint": f"{stack.stack_name}-{dataset}",
            "model_package_group": f"{stack.stack_name}-{dataset}",
            "variant": "AllTraffic",
        },
        "training": {
            "hyperparameters": {
                "epochs": "1",
                "sagemaker_program": "train.py",
                "sagemaker_submit_directory": f"s3://{artifacts}/code/training/sourcedir.tar.gz",
            },
            "output_path": f"s3://{artifacts}/training/{dataset}/",
            # Where the job runs: the template's defaults, resolved as PreprocessFunction resolves them.
            "resources": training_resources(
                {}, Settings.from_env(stack.function_environment("PreprocessFunction"))
            ),
            # No base model: the job's channels without the `base` one (TrainingJobEncryption's first variant).
            "base": {"index": 0, "uri": ""},
        },
        "gate": {"metric": "accuracy", "threshold": None, "margin": 0.0},
        **extra,
    }


# What PreprocessFunction adds for an upload too big for Lambda (docs/contracts.md §6).
PROCESSING_BLOCK = {
    "mode": "processing",
    "job_name": "conveyor-tier-processing-20261130T000000Z-abcdef",
    "input": "s3://conveyor-raw/datasets/tier-processing/big.csv.gz",
    "source": {
        "bucket": "conveyor-raw",
        "key": "datasets/tier-processing/big.csv.gz",
        "version_id": "v1",
        "etag": "e",
        "size": 3221225472,
    },
    "spec": {"target": None, "task": None, "metric": None, "threshold": None, "drop_duplicates": True},
    "code": "s3://conveyor-artifacts/code/preprocessing/",
    "job_document": "s3://conveyor-artifacts/preprocessing/tier-processing/v/job.json",
    "output": {
        "processed": "s3://conveyor-processed/tier-processing/v/",
        "quarantine": "s3://conveyor-processed/quarantine/tier-processing/v/",
    },
    "volume_size_gb": 341,
}


def task_failure(sfn: Any, execution_arn: str) -> dict:
    """The error and cause of the first Task that failed in an execution."""
    events = sfn.get_execution_history(executionArn=execution_arn, maxResults=1000)["events"]
    failed = [e["taskFailedEventDetails"] for e in events if e["type"] == "TaskFailed"]
    # No Task failed: the execution stopped before one ran (a States.Runtime error in a Pass or Choice, say).
    assert failed, f"no Task failed; the execution ended with {events[-1]['type']}: {events[-1]}"
    return failed[0]


def wait_for(sfn: Any, execution_arn: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        description = sfn.describe_execution(executionArn=execution_arn)
        if description["status"] != "RUNNING":
            return description
        time.sleep(0.5)
    raise AssertionError(f"{execution_arn} still RUNNING after {timeout} s")


def states_entered(sfn: Any, execution_arn: str) -> list[str]:
    events = sfn.get_execution_history(executionArn=execution_arn, maxResults=1000)["events"]
    return [e["stateEnteredEventDetails"]["name"] for e in events if e["type"].endswith("StateEntered")]


def unavailable(session: Session, service: str, call: str) -> str | None:
    """LocalStack's answer to one read-only call of `service`, when it is an error (None when it works)."""
    try:
        getattr(session.client(service), call)()
    except ClientError as error:
        return f"{error.response['Error'].get('Code')}: {error.response['Error'].get('Message')}"
    except Exception as error:  # a closed connection, a parse error: LocalStack does not serve it either
        return f"{type(error).__name__}: {error}"
    return None


# ---------------------------------------------------------------------------------------------- S3
def test_buckets_are_versioned_encrypted_and_private(stack: Stack, session: Session, deployed: Deployed):
    s3 = session.client("s3")
    buckets = stack.of_type("AWS::S3::Bucket")
    assert {b.logical_id for b in buckets} == set(deployed.buckets)
    assert set(deployed.buckets) >= {"RawBucket", "ProcessedBucket", "ArtifactsBucket"}
    for bucket in buckets:
        name, props = deployed.buckets[bucket.logical_id], bucket.properties
        if props.get("VersioningConfiguration", {}).get("Status") == "Enabled":
            assert s3.get_bucket_versioning(Bucket=name)["Status"] == "Enabled"
        rules = s3.get_bucket_encryption(Bucket=name)["ServerSideEncryptionConfiguration"]["Rules"]
        expected_rules = stack.bucket_encryption(bucket)["Rules"]
        assert [r["ApplyServerSideEncryptionByDefault"] for r in rules] == [
            r["ApplyServerSideEncryptionByDefault"] for r in expected_rules
        ]
        # EncryptionMode SSE-KMS, the default: the stack key LocalStack made.
        assert rules[0]["ApplyServerSideEncryptionByDefault"]["KMSMasterKeyID"] == deployed.keys["StackKey"]
        block = s3.get_public_access_block(Bucket=name)["PublicAccessBlockConfiguration"]
        assert block == props["PublicAccessBlockConfiguration"]
    # An object under versioning gets a version id: what the pipeline's idempotency key is made of.
    raw = deployed.buckets["RawBucket"]
    put = s3.put_object(Bucket=raw, Key="notes/versioned.txt", Body=b"one")
    assert put.get("VersionId") not in (None, "null")
    head = s3.head_object(Bucket=raw, Key="notes/versioned.txt")
    assert (head["ServerSideEncryption"], head["SSEKMSKeyId"]) == ("aws:kms", deployed.keys["StackKey"])


def test_an_upload_under_datasets_reaches_the_ingest_queue_and_nothing_else_does(
    stack: Stack, session: Session, deployed: Deployed
):
    s3, sqs = session.client("s3"), session.client("sqs")
    raw, queue = deployed.buckets["RawBucket"], deployed.queues["IngestQueue"]
    (configuration,) = stack.resources["RawBucket"].properties["NotificationConfiguration"][
        "QueueConfigurations"
    ]
    assert stack.resolve(configuration["Queue"]).endswith(
        ":" + stack.resources["IngestQueue"].attributes["QueueName"]
    )
    receive_all(sqs, queue, wait=2)  # S3's s3:TestEvent and anything earlier tests caused
    s3.put_object(Bucket=raw, Key="notes/readme.txt", Body=b"not a dataset")
    put = s3.put_object(Bucket=raw, Key="datasets/churn/churn.csv", Body=b"a,label\n1,yes\n")

    messages = receive_all(sqs, queue)
    records = s3_records(messages)
    assert [r["s3"]["object"]["key"] for r in records] == ["datasets/churn/churn.csv"]
    (record,) = records
    assert record["eventName"].startswith("ObjectCreated:")
    assert record["s3"]["bucket"]["name"] == raw
    assert record["s3"]["object"]["versionId"] == put["VersionId"]
    for message in messages:
        sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])


def test_a_message_that_fails_max_receive_count_times_lands_in_the_dead_letter_queue(
    stack: Stack, session: Session, deployed: Deployed
):
    sqs = session.client("sqs")
    redrive = stack.resolve(stack.resources["IngestQueue"].properties["RedrivePolicy"])
    dlq_logical_id = next(
        q.logical_id
        for q in stack.of_type("AWS::SQS::Queue")
        if q.attributes["Arn"] == redrive["deadLetterTargetArn"]
    )
    queue, dlq = deployed.queues["IngestQueue"], deployed.queues[dlq_logical_id]
    attributes = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])["Attributes"]
    assert json.loads(attributes["RedrivePolicy"]) == {
        "deadLetterTargetArn": redrive["deadLetterTargetArn"],
        "maxReceiveCount": int(redrive["maxReceiveCount"]),
    }
    assert attributes["VisibilityTimeout"] == str(
        stack.resources["IngestQueue"].properties["VisibilityTimeout"]
    )
    assert attributes.get("SqsManagedSseEnabled") == "true"

    receive_all(sqs, queue, wait=2)
    body = json.dumps({"poison": str(uuid.uuid4())})
    sqs.send_message(QueueUrl=queue, MessageBody=body)
    # A consumer that fails: it receives the message and never deletes it. VisibilityTimeout=0 on the receive
    # stands in for the queue's 5400 s, so each failure is retried at once.
    for attempt in range(int(redrive["maxReceiveCount"])):
        got = sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=5, VisibilityTimeout=0)["Messages"]
        assert [m["Body"] for m in got] == [body], f"receive {attempt + 1}"
    assert sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=1).get("Messages", []) == []
    dead = receive_all(sqs, dlq)
    assert [m["Body"] for m in dead] == [body]


# ---------------------------------------------------------------------------------------------- SNS, IAM
def test_the_notification_topic_is_encrypted_and_delivers_to_a_subscriber(
    stack: Stack, session: Session, deployed: Deployed
):
    sns = session.client("sns")
    (topic,) = stack.of_type("AWS::SNS::Topic")
    arn = deployed.topics[topic.logical_id]
    assert arn == stack.resolve({"Ref": topic.logical_id})
    attributes = sns.get_topic_attributes(TopicArn=arn)["Attributes"]
    assert attributes.get("KmsMasterKeyId") == deployed.keys["StackKey"]
    url, queue_arn = subscriber_queue(session, "tier-topic-subscriber")
    sns.subscribe(TopicArn=arn, Protocol="sqs", Endpoint=queue_arn)
    sns.publish(TopicArn=arn, Message=json.dumps({"outcome": "test"}))
    (message,) = receive_all(session.client("sqs"), url)
    assert json.loads(json.loads(message["Body"])["Message"]) == {"outcome": "test"}


def test_the_templates_roles_exist_with_their_trust_and_inline_policies(
    stack: Stack, session: Session, deployed: Deployed
):
    iam = session.client("iam")
    roles = stack.of_type("AWS::IAM::Role")
    assert roles, "template.yaml declares no AWS::IAM::Role"
    for role in roles:
        props = stack.resolve(role.properties)
        name = role.attributes["Ref"]
        found = iam.get_role(RoleName=name)["Role"]
        assert found["Arn"] == deployed.roles[role.logical_id] == role.attributes["Arn"]
        assert found["AssumeRolePolicyDocument"] == props["AssumeRolePolicyDocument"]
        for policy in props.get("Policies", []):
            stored = iam.get_role_policy(RoleName=name, PolicyName=policy["PolicyName"])["PolicyDocument"]
            assert stored == policy["PolicyDocument"]


# ---------------------------------------------------------------------------------------------- Step Functions
def test_localstack_accepts_the_pipeline_definition(stack: Stack, session: Session, deployed: Deployed):
    sfn = session.client("stepfunctions")
    (machine,) = stack.of_type("AWS::Serverless::StateMachine")
    arn = deployed.state_machines[machine.logical_id]
    assert arn == machine.attributes["Arn"]
    description = sfn.describe_state_machine(stateMachineArn=arn)
    assert json.loads(description["definition"]) == json.loads(
        stack.state_machine_definition(machine.logical_id)
    )
    assert description["type"] == machine.properties.get("Type", "STANDARD")
    # CreateStateMachine parses the ASL (state types, intrinsic functions, service integrations: every Resource
    # of the pipeline is one LocalStack knows) and refuses what it cannot parse. It does not check that each
    # Next names a state (measured): the definition's own graph is tests/unit/test_infrastructure.py's job.
    for state, change in [
        ("Configure", {"Type": "Bogus"}),
        ("Configure", {"Parameters": {"x.$": "States.NoSuchFunction($.a)"}}),
        ("StartTrainingJob", {"Resource": "arn:aws:states:::nosuchservice:createTrainingJob"}),
    ]:
        broken = json.loads(description["definition"])
        broken["States"][state].update(change)
        try:
            sfn.create_state_machine(
                name="broken", definition=json.dumps(broken), roleArn=description["roleArn"]
            )
        except ClientError as refused:
            assert refused.response["Error"]["Code"] == "InvalidDefinition", change
        else:
            pytest.fail(f"LocalStack accepted the pipeline with {state} changed to {change}")


@pytest.mark.parametrize(
    ("branch", "extra", "first_task"),
    [
        ("training", {}, "StartTrainingJob"),
        (
            "processing",
            {"preprocessing": PROCESSING_BLOCK},
            "StartProcessingJob",
        ),
    ],
    ids=["training", "processing"],
)
def test_an_execution_runs_until_sagemaker_then_fails_notifies_and_announces(
    stack: Stack, session: Session, deployed: Deployed, branch: str, extra: dict, first_task: str
):
    """Configure, the Choices and the first SageMaker task run; SageMaker is not in LocalStack community, so
    that task fails, and the Catch path runs for real: SummarizeFailure, the SNS notification, the
    EventBridge event, then the Fail state, as on AWS when SageMaker refuses a job."""
    sfn, sqs, events = (session.client(s) for s in ("stepfunctions", "sqs", "events"))
    (machine,) = stack.of_type("AWS::Serverless::StateMachine")
    inbox_url, inbox_arn = subscriber_queue(session, f"tier-notifications-{branch}")
    session.client("sns").subscribe(
        TopicArn=deployed.topics["NotificationTopic"], Protocol="sqs", Endpoint=inbox_arn
    )
    bus_url, bus_arn = subscriber_queue(session, f"tier-events-{branch}")
    dataset = f"tier-{branch}"
    events.put_rule(
        Name=f"tier-{branch}",
        EventPattern=json.dumps({"source": ["conveyor"], "detail": {"dataset": [dataset]}}),
    )
    events.put_targets(Rule=f"tier-{branch}", Targets=[{"Id": "queue", "Arn": bus_arn}])

    name = f"{dataset}-{uuid.uuid4().hex[:8]}"
    document = execution_input(stack, dataset, "20261130T000000Z-abcdef", **extra)
    started = time.monotonic()
    arn = sfn.start_execution(
        stateMachineArn=deployed.state_machines[machine.logical_id], name=name, input=json.dumps(document)
    )["executionArn"]
    result = wait_for(sfn, arn)
    elapsed = time.monotonic() - started
    entered = states_entered(sfn, arn)
    failure = task_failure(sfn, arn)
    print(
        f"{branch}: {result['status']} in {elapsed:.1f} s through {' → '.join(entered)}; "
        f"{first_task} failed with {failure.get('error')}: {failure.get('cause', '')[:200]}"
    )

    # Each job's encryption Pass state picks the request parts with the stack key (ArrayGetItem in LocalStack).
    assert entered[: entered.index(first_task) + 1] == [
        "Configure",
        "Approved?",
        "PreprocessingJob?",
        first_task.replace("Start", "") + "Encryption",
        first_task,
    ]
    # The Fail state a States.* error ends in differs (a Fail state may not raise States.*): FailedHow? decides.
    ending = (
        ["DescribeStatesError", "FailedInStepFunctions"]
        if failure["error"].startswith("States.")
        else ["Failed"]
    )
    assert entered[entered.index(first_task) + 1 :] == [
        "SummarizeFailure",
        "NotifyFailed",
        "AnnounceFailed",
        "FailedHow?",
        *ending,
    ]
    assert result["status"] == "FAILED"
    (notification,) = receive_all(sqs, inbox_url)
    summary = json.loads(json.loads(notification["Body"])["Message"])
    assert summary["outcome"] == "failed"
    assert summary["dataset"] == dataset
    assert summary["error"] == failure["error"]
    assert summary["execution"] == arn
    (event,) = receive_all(sqs, bus_url)
    event = json.loads(event["Body"])
    assert event["detail-type"] == "Pipeline Failed"
    assert event["detail"] == summary

    # Each object version trains once: the same execution name again is ExecutionAlreadyExists, which
    # PreprocessFunction counts as success.
    with pytest.raises(ClientError) as again:
        sfn.start_execution(
            stateMachineArn=deployed.state_machines[machine.logical_id], name=name, input=json.dumps(document)
        )
    assert again.value.response["Error"]["Code"] == "ExecutionAlreadyExists"


# ---------------------------------------------------------------------------------------------- not here
@pytest.mark.parametrize(
    ("service", "call", "what"),
    [
        (
            "sagemaker",
            "list_training_jobs",
            "training, processing jobs, the evaluation gate's Model Registry and endpoints (the pipeline past "
            "its first SageMaker task)",
        ),
        ("apigatewayv2", "get_apis", "the IAM-authorized HTTP API in front of InferenceProxyFunction"),
    ],
    ids=["sagemaker", "apigatewayv2"],
)
def test_paid_services_localstack_does_not_offer(session: Session, service: str, call: str, what: str):
    answer = unavailable(session, service, call)
    if answer is not None:
        pytest.skip(
            f"{service}: {what} — not in LocalStack's community edition; it answered {call} with {answer}"
        )
    pytest.fail(f"LocalStack now serves {service} ({call} answered): extend the tier to run {what}")


def test_the_preprocess_function_runs_on_localstack_lambda(
    stack: Stack, session: Session, deployed: Deployed
):
    """The template's PreprocessFunction as LocalStack would run it: created from functions/ with the template's
    runtime, handler and environment, then invoked with an S3 test event. LocalStack runs Lambda code in Docker
    or in a runtime it downloads at first use; here there is neither (measured: the function goes to Failed)."""
    lam = session.client("lambda")
    function = stack.resources["PreprocessFunction"]
    props = function.properties
    code = io.BytesIO()
    with zipfile.ZipFile(code, "w") as archive:
        source = ROOT / props["CodeUri"]
        for path in sorted(source.rglob("*.py")):
            archive.write(path, path.relative_to(source).as_posix())
    lam.create_function(
        FunctionName=function.attributes["Ref"],
        Runtime=props["Runtime"],
        Role=deployed.roles["SageMakerExecutionRole"],  # any role: LocalStack community does not enforce IAM
        Handler=props["Handler"],
        Code={"ZipFile": code.getvalue()},
        Timeout=int(props.get("Timeout", 3)),
        Environment={"Variables": stack.function_environment(function.logical_id)},
    )
    deadline = time.monotonic() + 60
    configuration = lam.get_function(FunctionName=function.attributes["Ref"])["Configuration"]
    while configuration.get("State") == "Pending" and time.monotonic() < deadline:
        time.sleep(0.5)
        configuration = lam.get_function(FunctionName=function.attributes["Ref"])["Configuration"]
    if configuration.get("State") != "Active":
        pytest.skip(
            "lambda: PreprocessFunction (and every function: the queue consumer, Evaluate, Cleanup, Approval, "
            f"InferenceProxy) cannot run here — LocalStack left it {configuration.get('State')}: "
            f"{configuration.get('StateReason')} (no Docker, and the runtime download is refused)"
        )
    answer = lam.invoke(FunctionName=function.attributes["Ref"], Payload=b'{"Records": []}')
    pytest.fail(
        f"LocalStack now runs Lambda code here (invoke answered {answer['StatusCode']}): extend the tier to "
        "run the functions on the ingest queue and in the pipeline"
    )
