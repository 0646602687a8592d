"""`conveyor doctor`: a healthy stack is all ok (exit 0); each kind of trouble is one plain-words problem
with what to do (exit 1), and a missing permission is named as such, never a traceback.

AWS is moto (`mock_aws`, with its Step Functions executor on); CloudFormation, which moto cannot fill with
the stack's alarms and state machine, is botocore's Stubber answering what `sam deploy` would have made.
"""

import json
import time
from datetime import UTC, datetime, timedelta

import boto3
import pytest
from botocore.exceptions import ClientError, NoCredentialsError, NoRegionError, ProfileNotFound
from botocore.stub import Stubber
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID
from moto.sagemaker.models import sagemaker_backends

from conveyor import cli, doctor
from conveyor.local.cloud import project_root
from conveyor.local.template import load_template

REGION = "us-east-1"
ACCOUNT = DEFAULT_ACCOUNT_ID
STACK = "conveyor"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/conveyor-states"
# Ends in a Fail state with the pipeline's own error and a Lambda-style cause when the input says so.
DEFINITION = {
    "StartAt": "Fails?",
    "States": {
        "Fails?": {
            "Type": "Choice",
            "Choices": [{"Variable": "$.fail", "BooleanEquals": True, "Next": "Failed"}],
            "Default": "Wait",
        },
        "Wait": {"Type": "Wait", "Seconds": 60, "Next": "Done"},
        "Done": {"Type": "Succeed"},
        "Failed": {
            "Type": "Fail",
            "Error": "TrainingJobFailed",
            "Cause": json.dumps({"errorMessage": "column 'churned' has  only one class"}),
        },
    },
}
TEMPLATE_ALARMS = (
    "IngestDeadLetterAlarm",
    "AsyncFailuresAlarm",
    "PipelineFailuresAlarm",
    "ApiServerErrorsAlarm",
)


class DeployedStack:
    """What `sam deploy` made, in moto, named as CloudFormation names things; CloudFormation is stubbed."""

    def __init__(self) -> None:
        self.status = "UPDATE_COMPLETE"
        self.clients: dict[str, object] = {}
        s3, sqs, sns, sfn, cloudwatch = (
            self.client(s) for s in ("s3", "sqs", "sns", "stepfunctions", "cloudwatch")
        )
        self.buckets = {
            "RawBucketName": f"{STACK}-raw-{ACCOUNT}-{REGION}",
            "ProcessedBucketName": f"{STACK}-processedbucket-1a2b3c",
            "ArtifactsBucketName": f"{STACK}-artifactsbucket-4d5e6f",
        }
        for bucket in self.buckets.values():
            s3.create_bucket(Bucket=bucket)
        self.queues = {
            logical_id: sqs.create_queue(QueueName=f"{STACK}-{logical_id}-Q1W2E3")["QueueUrl"]
            for logical_id in ("IngestQueue", "IngestDeadLetterQueue", "AsyncFailuresQueue")
        }
        self.topic = sns.create_topic(Name=f"{STACK}-NotificationTopic-R4T5")["TopicArn"]
        self.machine = sfn.create_state_machine(
            name="Pipeline-Y6U7", definition=json.dumps(DEFINITION), roleArn=ROLE
        )["stateMachineArn"]
        self.key = self.client("kms").create_key(Description="conveyor stack key")["KeyMetadata"]
        self.alarms = {logical_id: f"{STACK}-{logical_id}-I8O9" for logical_id in TEMPLATE_ALARMS}
        for name in self.alarms.values():
            put_alarm(cloudwatch, name)
        self.outputs = {
            **self.buckets,
            "StateMachineArn": self.machine,
            "ApiUrl": f"https://abc123.execute-api.{REGION}.amazonaws.com",
            "NotificationTopicArn": self.topic,
            "DashboardUrl": f"https://{REGION}.console.aws.amazon.com/cloudwatch/home#dashboards:name=c",
        }

    def client(self, service: str):
        if service not in self.clients:
            self.clients[service] = boto3.client(service, region_name=REGION)
        return self.clients[service]

    def resources(self) -> list[tuple[str, str, str]]:
        return [
            ("RawBucket", "AWS::S3::Bucket", self.buckets["RawBucketName"]),
            ("ProcessedBucket", "AWS::S3::Bucket", self.buckets["ProcessedBucketName"]),
            ("ArtifactsBucket", "AWS::S3::Bucket", self.buckets["ArtifactsBucketName"]),
            *((logical_id, "AWS::SQS::Queue", url) for logical_id, url in self.queues.items()),
            ("NotificationTopic", "AWS::SNS::Topic", self.topic),
            ("StackKey", "AWS::KMS::Key", self.key["KeyId"]),
            ("Pipeline", "AWS::StepFunctions::StateMachine", self.machine),
            ("PreprocessFunction", "AWS::Lambda::Function", f"{STACK}-PreprocessFunction-P0A1"),
            *((logical_id, "AWS::CloudWatch::Alarm", name) for logical_id, name in self.alarms.items()),
        ]

    def cloudformation(self):
        """A CloudFormation client that answers DescribeStacks and ListStackResources for this stack."""
        client = boto3.client("cloudformation", region_name=REGION)
        stubber = Stubber(client)
        now = datetime.now(UTC)
        stubber.add_response(
            "describe_stacks",
            {
                "Stacks": [
                    {
                        "StackName": STACK,
                        "CreationTime": now,
                        "StackStatus": self.status,
                        "Outputs": [{"OutputKey": k, "OutputValue": v} for k, v in self.outputs.items()],
                    }
                ]
            },
            {"StackName": STACK},
        )
        stubber.add_response(
            "list_stack_resources",
            {
                "StackResourceSummaries": [
                    {
                        "LogicalResourceId": logical_id,
                        "PhysicalResourceId": physical_id,
                        "ResourceType": kind,
                        "LastUpdatedTimestamp": now,
                        "ResourceStatus": "UPDATE_COMPLETE",
                    }
                    for logical_id, kind, physical_id in self.resources()
                ]
            },
            {"StackName": STACK},
        )
        stubber.activate()
        return client

    def make_client(self, service: str):
        return self.cloudformation() if service == "cloudformation" else self.client(service)

    def deploy_endpoint(self, dataset: str) -> str:
        """An endpoint as the pipeline leaves it: InService, with its 5xx and latency alarms."""
        name = f"{STACK}-{dataset}"
        sagemaker, cloudwatch = self.client("sagemaker"), self.client("cloudwatch")
        sagemaker.create_model(ModelName=name, ExecutionRoleArn=ROLE)
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
        for suffix in doctor.ENDPOINT_ALARM_SUFFIXES:
            put_alarm(cloudwatch, name + suffix)
        return name

    def run_execution(self, name: str, fail: bool) -> str:
        sfn = self.client("stepfunctions")
        arn = sfn.start_execution(stateMachineArn=self.machine, name=name, input=json.dumps({"fail": fail}))[
            "executionArn"
        ]
        deadline = time.monotonic() + 10
        # moto runs an execution in a thread of its own, which may not have begun yet: stopping it before then
        # fails inside moto (its worker has no environment). Its first history event says it has.
        while not sfn.get_execution_history(executionArn=arn, maxResults=1)["events"]:
            assert time.monotonic() < deadline, "moto's executor did not start the execution"
            time.sleep(0.05)
        if fail:
            while sfn.describe_execution(executionArn=arn)["status"] == "RUNNING":
                assert time.monotonic() < deadline, "moto's executor did not fail the execution"
                time.sleep(0.05)
        return arn

    def diagnose(self, **kwargs) -> doctor.Report:
        return doctor.diagnose_stack(self.make_client, STACK, **kwargs)


def put_alarm(cloudwatch, name: str) -> None:
    cloudwatch.put_metric_alarm(
        AlarmName=name,
        Namespace="AWS/SageMaker",
        MetricName="Invocation5XXErrors",
        Statistic="Sum",
        Period=60,
        EvaluationPeriods=1,
        Threshold=1,
        ComparisonOperator="GreaterThanOrEqualToThreshold",
    )


def problems(report: doctor.Report) -> list[str]:
    return [line for line in report.lines() if line.startswith("problem")]


def deny(client, operation: str, message: str, code: str = "AccessDenied") -> None:
    """Make `client` refuse `operation` as IAM would (the call never reaches moto)."""

    def refuse(**_):
        raise ClientError({"Error": {"Code": code, "Message": message}}, operation)

    client.meta.events.register(f"before-call.*.{operation}", refuse)


@pytest.fixture
def stack(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        yield DeployedStack()


# ---------------------------------------------------------------------------- healthy
def test_a_healthy_stack_is_all_ok_and_exits_0(stack):
    stack.deploy_endpoint("churn")
    stack.run_execution("churn-1", fail=False)
    report = stack.diagnose()

    assert report.healthy and report.exit_code == 0, report.lines()
    lines = report.lines()
    assert lines[0] == f"conveyor doctor: stack {STACK} in {REGION}"
    assert [line.split(":")[0].split()[-1] for line in lines[1:-1]] == [
        "credentials",
        "stack",
        "resources",
        "key",
        "queues",
        "endpoints",
        "alarms",
        "executions",
    ]
    assert all(line.startswith("ok ") for line in lines[1:-1])
    assert f"ok       stack: {STACK} is UPDATE_COMPLETE" in lines
    assert "ok       endpoints: conveyor-churn is InService" in lines
    assert "ok       alarms: 6 alarms, none in ALARM" in lines
    assert f"ok       stack key: {stack.key['Arn']} is Enabled" in lines
    assert "IngestDeadLetterQueue and AsyncFailuresQueue are empty" in report.lines()[5]
    assert lines[-1] == "healthy: 8 checks passed"


@pytest.mark.parametrize(
    ("state", "fix"),
    [("Disabled", "aws kms enable-key"), ("PendingDeletion", "aws kms cancel-key-deletion")],
)
def test_a_stack_key_that_is_not_enabled_is_a_problem_that_says_how_to_undo_it(stack, state, fix):
    kms = stack.client("kms")
    if state == "Disabled":
        kms.disable_key(KeyId=stack.key["KeyId"])
    else:
        kms.schedule_key_deletion(KeyId=stack.key["KeyId"], PendingWindowInDays=7)
    (line,) = problems(stack.diagnose())
    assert line.startswith(f"problem  stack key: {stack.key['Arn']} is {state}: nothing encrypted under it")
    assert fix in line


def test_a_stack_without_a_key_uses_aws_managed_keys():
    assert doctor.check_stack_key(None, {}, STACK).summary == "none (EncryptionMode SSE-S3: AWS-managed keys)"


def test_endpoints_of_other_stacks_are_not_this_stacks_business(stack):
    stack.deploy_endpoint("churn")
    sagemaker = stack.client("sagemaker")
    sagemaker.create_endpoint_config(
        EndpointConfigName="other",
        ProductionVariants=[
            {"VariantName": "AllTraffic", "ModelName": "conveyor-churn", "InstanceType": "ml.m5.large"}
        ],
    )
    sagemaker.create_endpoint(EndpointName="conveyorx-churn", EndpointConfigName="other")
    sagemaker_backends[ACCOUNT][REGION].endpoints["conveyorx-churn"].endpoint_status = "Failed"

    assert stack.diagnose().healthy


# ---------------------------------------------------------------------------- problems
def test_a_message_in_the_ingest_dead_letter_queue_says_how_many_and_how_to_redrive(stack):
    sqs = stack.client("sqs")
    sqs.send_message(QueueUrl=stack.queues["IngestDeadLetterQueue"], MessageBody="{}")
    sqs.send_message(QueueUrl=stack.queues["IngestDeadLetterQueue"], MessageBody="{}")
    report = stack.diagnose()

    assert report.exit_code == 1
    (line,) = problems(report)
    assert line.startswith(
        "problem  dead-letter queues: IngestDeadLetterQueue holds 2 messages: uploads that failed "
        "preprocessing"
    )
    assert f"aws sqs receive-message --queue-url {stack.queues['IngestDeadLetterQueue']}" in line
    assert "/aws/lambda/conveyor-PreprocessFunction-P0A1" in line
    dlq_arn = f"arn:aws:sqs:{REGION}:{ACCOUNT}:{STACK}-IngestDeadLetterQueue-Q1W2E3"
    assert f"aws sqs start-message-move-task --source-arn {dlq_arn}" in line


def test_a_message_in_the_async_failures_queue_says_what_to_do_by_hand(stack):
    stack.client("sqs").send_message(QueueUrl=stack.queues["AsyncFailuresQueue"], MessageBody="{}")
    (line,) = problems(stack.diagnose())
    assert "AsyncFailuresQueue holds 1 message: events CleanupFunction or ApprovalFunction gave up on" in line
    assert "stop-training-job" in line and "conveyor approve" in line and "purge-queue" in line


def test_an_alarm_in_alarm_is_named_with_its_reason_and_what_to_do(stack):
    endpoint = stack.deploy_endpoint("churn")
    cloudwatch = stack.client("cloudwatch")
    cloudwatch.set_alarm_state(
        AlarmName=f"{endpoint}-5xx-errors",
        StateValue="ALARM",
        StateReason="Threshold Crossed: 1 datapoint [3.0] was greater than or equal to the threshold (1.0).",
    )
    cloudwatch.set_alarm_state(
        AlarmName=stack.alarms["PipelineFailuresAlarm"], StateValue="ALARM", StateReason="Threshold Crossed"
    )
    report = stack.diagnose()

    assert report.exit_code == 1
    pipeline_line, endpoint_line = problems(report)
    assert endpoint_line.startswith(f"problem  alarms: alarm {endpoint}-5xx-errors is in ALARM since ")
    assert ": Threshold Crossed: 1 datapoint [3.0]" in endpoint_line
    assert f"the model behind {endpoint} errs: read /aws/sagemaker/Endpoints/{endpoint}" in endpoint_line
    assert f"alarm {stack.alarms['PipelineFailuresAlarm']} is in ALARM" in pipeline_line
    assert "see the executions line" in pipeline_line


def test_a_deleted_template_alarm_is_a_problem_and_a_deleted_endpoint_alarm_is_not(stack):
    endpoint = stack.deploy_endpoint("churn")
    cloudwatch = stack.client("cloudwatch")
    cloudwatch.delete_alarms(AlarmNames=[f"{endpoint}-model-latency"])
    report = stack.diagnose()
    assert report.healthy
    assert (
        f"ok       alarms: 5 alarms, none in ALARM ({endpoint}-model-latency absent: the next deployment "
        "puts them back)"
    ) in report.lines()

    cloudwatch.delete_alarms(AlarmNames=[stack.alarms["ApiServerErrorsAlarm"]])
    (line,) = problems(stack.diagnose())
    assert f"alarm {stack.alarms['ApiServerErrorsAlarm']} does not exist, so nobody hears" in line


@pytest.mark.parametrize(
    ("status", "reason", "fix"),
    [
        (
            "Failed",
            "The primary container for production variant AllTraffic did not pass the ping health check.",
            "aws sagemaker delete-endpoint --endpoint-name conveyor-churn",
        ),
        ("Updating", "", "a deployment is under way"),
        ("RollingBack", "Alarm conveyor-churn-5xx-errors fired", "returns traffic to the previous model"),
    ],
)
def test_an_endpoint_not_in_service_is_reported_with_its_failure_reason(stack, status, reason, fix):
    endpoint = stack.deploy_endpoint("churn")
    fake = sagemaker_backends[ACCOUNT][REGION].endpoints[endpoint]
    fake.endpoint_status, fake.failure_reason = status, reason or None
    report = stack.diagnose()

    assert report.exit_code == 1
    (line,) = problems(report)
    assert line.startswith(
        f"problem  endpoints: {endpoint} is {status}" + (f": {reason}" if reason else " →")
    )
    assert fix in line


def test_a_failed_execution_is_reported_with_its_error_and_cause(stack):
    arn = stack.run_execution("churn-0123abcd", fail=True)
    stack.run_execution("iris-4567", fail=False)
    report = stack.diagnose()

    assert report.exit_code == 1
    (line,) = problems(report)
    assert line.startswith("problem  executions: churn-0123abcd failed at ")
    # The Lambda-style JSON cause is summarized to its message, on one line.
    assert ": TrainingJobFailed: column 'churned' has only one class →" in line
    assert "the training script failed" in line
    assert f"aws stepfunctions get-execution-history --execution-arn {arn}" in line


def test_an_aborted_execution_is_reported_and_old_failures_are_not(stack):
    arn = stack.run_execution("churn-89ef", fail=False)
    stack.client("stepfunctions").stop_execution(executionArn=arn, error="Stopped", cause="by hand")
    (line,) = problems(stack.diagnose())
    assert "churn-89ef was aborted at " in line and "CleanupFunction stopped its jobs" in line

    later = datetime.now(UTC) + timedelta(hours=25)
    assert stack.diagnose(now=later).healthy
    assert not stack.diagnose(now=later, hours=48).healthy


def test_many_failed_executions_are_listed_up_to_a_limit_and_counted(stack):
    for i in range(doctor.MAX_LISTED_EXECUTIONS + 2):
        stack.run_execution(f"churn-{i:04d}", fail=True)
    lines = problems(stack.diagnose())
    assert len(lines) == doctor.MAX_LISTED_EXECUTIONS + 1
    assert "and 2 more ended badly in the last 24 h" in lines[-1]


# ---------------------------------------------------------------------------- the stack itself
def test_a_stack_that_does_not_exist_is_one_problem_that_says_so(stack):
    def make_client(service):
        if service != "cloudformation":
            return stack.client(service)
        client = boto3.client("cloudformation", region_name=REGION)
        stubber = Stubber(client)
        stubber.add_client_error(
            "describe_stacks", "ValidationError", "Stack with id nope does not exist", 400
        )
        stubber.activate()
        return client

    report = doctor.diagnose_stack(make_client, "nope")
    assert report.exit_code == 1
    assert problems(report) == [
        f"problem  stack: there is no stack nope in {REGION} → check --stack and --region "
        "(`aws cloudformation list-stacks`), or deploy it (`sam deploy --guided`)"
    ]


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("CREATE_COMPLETE", None),
        ("UPDATE_COMPLETE", None),
        ("UPDATE_ROLLBACK_COMPLETE", "its last update failed and was rolled back"),
        ("ROLLBACK_COMPLETE", "its creation failed and was rolled back"),
        ("UPDATE_ROLLBACK_FAILED", "continue-update-rollback"),
        ("CREATE_FAILED", "the first *_FAILED event says why"),
        ("UPDATE_IN_PROGRESS", "a deployment is under way"),
    ],
)
def test_only_a_complete_state_that_is_not_a_rollback_is_ok(status, expected):
    result = doctor.check_stack_status(
        {"StackName": STACK, "StackStatus": status, "StackStatusReason": "Resource Pipeline failed"}
    )
    if expected is None:
        assert result.ok
    else:
        (problem,) = result.problems
        assert problem.what.startswith(f"{STACK} is {status} (Resource Pipeline failed)")
        assert expected in problem.what + problem.fix


def test_a_rolled_back_stack_is_a_problem_yet_the_other_checks_still_run(stack):
    stack.status = "UPDATE_ROLLBACK_COMPLETE"
    report = stack.diagnose()
    (line,) = problems(report)
    assert line.startswith(f"problem  stack: {STACK} is UPDATE_ROLLBACK_COMPLETE")
    assert len(report.checks) == 8


def test_missing_outputs_mean_another_template():
    result = doctor.check_stack_status(
        {"StackName": STACK, "StackStatus": "CREATE_COMPLETE", "Outputs": []}, ["RawBucketName"]
    )
    assert "lacks the outputs RawBucketName" in result.problems[0].what


# ---------------------------------------------------------------------------- permissions
def test_access_denied_is_reported_as_the_missing_permission(stack):
    deny(
        stack.client("sqs"),
        "GetQueueAttributes",
        f"User: arn:aws:iam::{ACCOUNT}:user/ops is not authorized to perform: sqs:getqueueattributes on "
        f"resource: arn:aws:sqs:{REGION}:{ACCOUNT}:conveyor-IngestDeadLetterQueue-Q1W2E3 because no "
        "identity-based policy allows the sqs:getqueueattributes action",
    )
    deny(stack.client("s3"), "HeadBucket", "Forbidden", code="403")  # HEAD: no body, no message
    deny(
        stack.client("cloudwatch"),
        "DescribeAlarms",
        f"User: arn:aws:sts::{ACCOUNT}:assumed-role/ops/me is not authorized to perform: "
        "cloudwatch:DescribeAlarms with an explicit deny in a service control policy",
    )
    report = stack.diagnose()

    assert report.exit_code == 1
    text = "\n".join(problems(report))
    assert "Traceback" not in text
    for bucket in stack.buckets.values():
        assert f"missing permission s3:ListBucket on arn:aws:s3:::{bucket}" in text
    assert (
        f"missing permission sqs:GetQueueAttributes on arn:aws:sqs:{REGION}:{ACCOUNT}:"
        "conveyor-IngestDeadLetterQueue-Q1W2E3 → "
        f"allow sqs:GetQueueAttributes to arn:aws:iam::{ACCOUNT}:user/ops"
    ) in text
    assert (
        "missing permission cloudwatch:DescribeAlarms on * → an explicit deny in a service control policy"
        in text
    )


def test_a_denied_stack_description_is_a_missing_permission(stack):
    def make_client(service):
        if service != "cloudformation":
            return stack.client(service)
        client = boto3.client("cloudformation", region_name=REGION)
        deny(client, "DescribeStacks", "User: arn:aws:iam::123456789012:user/ops is not authorized")
        return client

    (line,) = problems(doctor.diagnose_stack(make_client, STACK))
    assert line.startswith(f"problem  stack: missing permission cloudformation:DescribeStacks on {STACK} →")


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        ("ExpiredToken", "The security token included in the request is expired", "credentials were refused"),
        ("AccessDeniedException", "", "missing permission sagemaker:ListEndpoints on conveyor-*"),
        ("ThrottlingException", "Rate exceeded", "sagemaker:ListEndpoints on conveyor-* failed: Throttling"),
    ],
)
def test_errors_are_explained_in_words(code, message, expected):
    error = ClientError({"Error": {"Code": code, "Message": message}}, "ListEndpoints")
    assert expected in doctor.explain(error, "sagemaker:ListEndpoints", "conveyor-*").what


# ---------------------------------------------------------------------------- local mode and the CLI
def test_the_local_stack_is_checked_by_the_names_local_mode_gives(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    resources = doctor.local_stack_resources(STACK)
    assert resources["IngestDeadLetterQueue"].physical_id == f"{STACK}-IngestDeadLetterQueue"
    with mock_aws():
        sqs, cloudwatch, kms = boto3.client("sqs"), boto3.client("cloudwatch"), boto3.client("kms")
        # The key's id is KMS's choice when the local stack starts: doctor finds it by its alias.
        kms.create_alias(AliasName=f"alias/{STACK}", TargetKeyId=kms.create_key()["KeyMetadata"]["KeyId"])
        for resource in resources.values():
            if resource.type == "AWS::SQS::Queue":
                sqs.create_queue(QueueName=resource.physical_id)
            if resource.type == "AWS::CloudWatch::Alarm":
                put_alarm(cloudwatch, resource.physical_id)
        url = sqs.get_queue_url(QueueName=resources["AsyncFailuresQueue"].physical_id)["QueueUrl"]
        sqs.send_message(QueueUrl=url, MessageBody="{}")
        outputs = {"StackName": STACK, "EndpointUrl": "http://127.0.0.1:4566"}
        report = doctor.diagnose_local(lambda service: boto3.client(service), outputs)

    assert report.lines()[0] == f"conveyor doctor: local stack {STACK} at http://127.0.0.1:4566"
    (line,) = problems(report)
    assert "AsyncFailuresQueue holds 1 message" in line
    assert "--endpoint-url http://127.0.0.1:4566" in line


def test_a_local_stack_that_is_not_running_says_how_to_start_it(tmp_path, capsys):
    from conveyor.local.hosting import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    outputs = tmp_path / "outputs.json"
    outputs.write_text(
        json.dumps(
            {key: "x" for key in cli.client.OUTPUT_KEYS}
            | {"EndpointUrl": endpoint, "Region": REGION, "AccessKeyId": "AKIA", "SecretAccessKey": "s"}
        )
    )
    assert cli.main(["doctor", "--outputs-file", str(outputs)]) == 1
    out = capsys.readouterr().out
    assert f"problem  local stack: the local stack at {endpoint} does not answer → start it with" in out


def test_the_cli_without_a_stack_says_where_to_find_one(tmp_path, capsys):
    assert cli.main(["doctor", "--outputs-file", str(tmp_path / "none.json")]) == 1
    out = capsys.readouterr().out
    assert "problem  local stack: no stack outputs at" in out and "conveyor local up" in out


def test_the_cli_checks_a_deployed_stack_and_exits_by_its_health(stack, monkeypatch, capsys):
    monkeypatch.setattr(doctor, "stack_clients", lambda region: stack.make_client)
    assert cli.main(["doctor", "--stack", STACK, "--region", REGION]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "healthy: 8 checks passed"

    stack.run_execution("churn-dead", fail=True)
    assert cli.main(["doctor", "--stack", STACK, "--hours", "1"]) == 1
    assert "1 problem found" in capsys.readouterr().out


# ---------------------------------------------------------------------------- the names doctor relies on
def test_the_resources_doctor_names_are_the_templates():
    resources = load_template(project_root() / "template.yaml")["Resources"]
    for logical_id in doctor.DEAD_LETTER_QUEUES:
        assert resources[logical_id]["Type"] == "AWS::SQS::Queue"
    for logical_id in doctor.ALARM_ADVICE:
        assert resources[logical_id]["Type"] == "AWS::CloudWatch::Alarm"
    assert {k for k, v in resources.items() if v["Type"] == "AWS::CloudWatch::Alarm"} == set(
        doctor.ALARM_ADVICE
    )


def test_the_endpoint_alarms_doctor_looks_for_are_the_ones_the_pipeline_puts():
    definition = (project_root() / "infra" / "statemachine" / "pipeline.asl.json").read_text()
    for suffix in doctor.ENDPOINT_ALARM_SUFFIXES:
        assert f"States.Format('{{}}{suffix}', $.names.endpoint)" in definition


def test_a_bucket_deleted_behind_the_stacks_back_is_named(stack):
    stack.client("s3").delete_bucket(Bucket=stack.buckets["ArtifactsBucketName"])
    (line,) = problems(stack.diagnose())
    bucket = stack.buckets["ArtifactsBucketName"]
    assert line.startswith(f"problem  resources: bucket {bucket} (ArtifactsBucketName) does not exist")
    assert "detect-stack-drift" in line


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (NoCredentialsError(), "no AWS credentials found → set AWS_PROFILE"),
        (NoRegionError(), "no AWS region given → pass --region"),
        (ProfileNotFound(profile="prod"), "The config profile (prod) could not be found → fix AWS_PROFILE"),
    ],
)
def test_no_credentials_region_or_profile_is_said_so(error, expected):
    problem = doctor.explain(error)
    assert f"{problem.what} → {problem.fix}".startswith(expected)
