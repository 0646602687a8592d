"""`conveyor doctor`: check a deployed stack, or the running local one, and say what is wrong and what to do.

Every check is a function over boto3 clients (or over data already read) that returns a `CheckResult`: a
name, what it found when all is well, and one `Problem` (what is wrong, what to do) per thing that is not.
`diagnose_stack` and `diagnose_local` run them in order and gather a `Report`; the CLI prints one line per
check (or per problem) and exits 1 when there is any problem.

Nothing here changes the stack: every call is a Describe, Get, List or Head.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    ProfileNotFound,
)

MakeClient = Callable[[str], Any]

# The stack's dead-letter queues (template.yaml logical ids), with what a message in each one is.
DEAD_LETTER_QUEUES = {
    "IngestDeadLetterQueue": "uploads that failed preprocessing three times",
    "AsyncFailuresQueue": "events CleanupFunction or ApprovalFunction gave up on after Lambda's retries",
}
# What to do about each of the template's alarms (docs/pipeline.md, "Alarms and the dashboard").
ALARM_ADVICE = {
    "IngestDeadLetterAlarm": "an upload failed preprocessing three times: see the dead-letter queue line",
    "AsyncFailuresAlarm": "CleanupFunction or ApprovalFunction gave up on an event: see the dead-letter "
    "queue line",
    "PipelineFailuresAlarm": "a pipeline execution failed: see the executions line; the `failed` "
    "notification has the cause",
    "ApiServerErrorsAlarm": "the prediction API answered 5xx: look at the endpoints' `-5xx-errors` alarms, "
    "the endpoint logs (/aws/sagemaker/Endpoints/<name>) and InferenceProxyFunction's log",
}
# The alarms the pipeline puts on every endpoint it deploys (PutErrorAlarm, PutLatencyAlarm in the ASL).
ENDPOINT_ALARM_SUFFIXES = ("-5xx-errors", "-model-latency")
# Statuses that end a pipeline execution badly; doctor reports those of the last `hours`.
FAILED_STATUSES = ("FAILED", "TIMED_OUT", "ABORTED")
# At most this many failed executions are listed one by one; the rest are counted.
MAX_LISTED_EXECUTIONS = 10
# What each error of the pipeline's failure path means to an operator (docs/pipeline.md, state by state).
ERROR_ADVICE = {
    "TrainingJobFailed": "the training script failed; the cause is its own message, the rest is in "
    "/aws/sagemaker/TrainingJobs",
    "TrainingJobStopped": "the training job hit its max runtime or spot wait: raise "
    "TrainingMaxRuntimeSeconds / TrainingMaxWaitSeconds, or use a faster TrainingInstanceType",
    "ProcessingJobFailed": "read the processing job's ExitMessage and /aws/sagemaker/ProcessingJobs",
    "PollLimitExceeded": "a job or endpoint stayed in progress for MaxPollsPerLoop polls: read its log, or "
    "raise MaxPollsPerLoop",
    "DeploymentRolledBack": "the new model failed its bake time or did not start; the old one still serves: "
    "read /aws/sagemaker/Endpoints/<name>",
    "EndpointFailed": "the model could not load (model_fn): read /aws/sagemaker/Endpoints/<name>",
    "PipelineFailed": "a Step Functions error (States.Timeout, States.Runtime, ...), named at the start of "
    "the cause",
}
_DENIED_CODES = {
    "AccessDenied",
    "AccessDeniedException",
    "AuthorizationError",
    "AuthorizationErrorException",
    "Forbidden",
    "403",
    "UnauthorizedOperation",
    "AWS.SimpleQueueService.AccessDenied",
}
_CREDENTIAL_CODES = {
    "ExpiredToken",
    "ExpiredTokenException",
    "InvalidClientTokenId",
    "InvalidAccessKeyId",
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
    "UnrecognizedClientException",
}
_NOT_AUTHORIZED = re.compile(
    r"not authorized to perform:?\s+(?P<action>[\w-]+:[\w*-]+)(?:\s+on resource:?\s+(?P<resource>[^\s,]+))?"
)
_PRINCIPAL = re.compile(r"User:\s+(?P<principal>\S+)\s+is not authorized")
_EXPLICIT_DENY = re.compile(r"with an explicit deny in (?P<policy>an? [\w -]+?(?:policy|boundary))")


# ---------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Problem:
    """Something wrong, in plain words, and what to do about it."""

    what: str
    fix: str = ""


@dataclass(frozen=True)
class CheckResult:
    """One check: its name, what it found when healthy, and its problems (none when healthy)."""

    name: str
    summary: str = ""
    problems: tuple[Problem, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """One `ok` line, or one `problem` line per problem (what is wrong → what to do)."""
        if self.ok:
            return [f"{'ok':8} {self.name}: {self.summary}"]
        return [
            f"{'problem':8} {self.name}: {p.what}" + (f" → {p.fix}" if p.fix else "") for p in self.problems
        ]


@dataclass(frozen=True)
class Report:
    """Every check's result for one stack."""

    target: str
    checks: tuple[CheckResult, ...] = ()

    @property
    def problems(self) -> list[Problem]:
        return [p for check in self.checks for p in check.problems]

    @property
    def healthy(self) -> bool:
        return not self.problems

    @property
    def exit_code(self) -> int:
        return 0 if self.healthy else 1

    def lines(self) -> list[str]:
        lines = [f"conveyor doctor: {self.target}"]
        for check in self.checks:
            lines.extend(check.lines())
        count = len(self.problems)
        lines.append(
            f"healthy: {len(self.checks)} checks passed"
            if self.healthy
            else f"{count} problem{'s' if count != 1 else ''} found"
        )
        return lines


@dataclass(frozen=True)
class StackResource:
    """One resource of the stack: its template logical id, type, and name (or URL, or ARN) in the account."""

    logical_id: str
    type: str
    physical_id: str


# ---------------------------------------------------------------------------- errors in plain words
def explain(error: BaseException, action: str = "", resource: str = "", local_endpoint: str = "") -> Problem:
    """What a failed AWS call means to the person who made it.

    Parameters
    ----------
    error
        The exception the call raised.
    action
        The IAM action the call needs (`sqs:GetQueueAttributes`), for when AWS's message does not name it.
    resource
        What it was called on, likewise.
    local_endpoint
        The local stack's AWS endpoint, when the call went there.
    """
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        message = str(error.response.get("Error", {}).get("Message", "") or "")
        if code in _CREDENTIAL_CODES:
            return Problem(
                f"the AWS credentials were refused ({code}: {message})".replace(": )", ")"),
                "refresh them (`aws sso login`, `aws configure`, or new keys) and run doctor again",
            )
        if code in _DENIED_CODES or code.endswith("AccessDenied"):
            return missing_permission(message, action or error.operation_name, resource)
        on = f" on {resource}" if resource else ""
        return Problem(
            f"{action or error.operation_name}{on} failed: {code}" + (f": {message}" if message else ""),
            "run doctor again; if it persists, the message above is AWS's own",
        )
    if isinstance(error, EndpointConnectionError):
        if local_endpoint:
            return Problem(
                f"the local stack at {local_endpoint} does not answer",
                "start it with `conveyor local up` (or pass --outputs-file of the one that runs)",
            )
        return Problem(f"cannot reach AWS: {error}", "check the network and --region")
    if isinstance(error, NoCredentialsError):
        return Problem(
            "no AWS credentials found",
            "set AWS_PROFILE, run `aws configure` or `aws sso login`, and try again",
        )
    if isinstance(error, NoRegionError):
        return Problem("no AWS region given", "pass --region, or set AWS_REGION")
    if isinstance(error, ProfileNotFound):
        return Problem(str(error), "fix AWS_PROFILE (see `aws configure list-profiles`)")
    if isinstance(error, BotoCoreError):
        return Problem(f"{action or 'the AWS call'} failed: {error}", "run doctor again with -v for details")
    return Problem(f"{action or 'the check'} failed: {type(error).__name__}: {error}")


def missing_permission(message: str, action: str, resource: str) -> Problem:
    """`missing permission <action> on <resource>`, from an AccessDenied message (or what was called)."""
    named = _NOT_AUTHORIZED.search(message)
    if named:
        said = named.group("action")
        # Some services lower-case the action in their message; keep IAM's spelling when it is the same one.
        action = action if action and said.lower() == action.lower() else said
        resource = named.group("resource") or resource
    what = f"missing permission {action or 'unknown action'}" + (f" on {resource}" if resource else "")
    principal = _PRINCIPAL.search(message)
    deny = _EXPLICIT_DENY.search(message)
    who = principal.group("principal") if principal else "the identity you run conveyor as"
    if deny:
        return Problem(what, f"an explicit deny in {deny.group('policy')} blocks it for {who}: lift it there")
    return Problem(what, f"allow {action or 'it'} to {who} (or run doctor as a role that has it)")


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


# ---------------------------------------------------------------------------- discovery
def read_stack(cloudformation: Any, stack_name: str) -> dict[str, Any]:
    """DescribeStacks of one stack (raises ClientError, e.g. ValidationError when it does not exist)."""
    stacks: list[dict[str, Any]] = cloudformation.describe_stacks(StackName=stack_name)["Stacks"]
    return stacks[0]


def read_stack_resources(cloudformation: Any, stack_name: str) -> dict[str, StackResource]:
    """The stack's resources by logical id, as CloudFormation named them."""
    resources = {}
    for page in cloudformation.get_paginator("list_stack_resources").paginate(StackName=stack_name):
        for summary in page["StackResourceSummaries"]:
            resources[summary["LogicalResourceId"]] = StackResource(
                summary["LogicalResourceId"], summary["ResourceType"], summary.get("PhysicalResourceId", "")
            )
    return resources


def local_stack_resources(stack_name: str) -> dict[str, StackResource]:
    """The local stack's resources by logical id, named as local mode names them (from template.yaml)."""
    from conveyor.local.cloud import LOCAL_PARAMETERS, project_root
    from conveyor.local.template import Stack

    # With local mode's parameters: a resource under a Condition exists locally only if they create it.
    stack = Stack(project_root(), stack_name, LOCAL_PARAMETERS)
    resources = {}
    for logical_id, resource in stack.resources.items():
        attributes = resource.attributes
        # A local queue's URL is known once created; its name is what doctor looks it up by.
        physical = attributes.get("QueueName") if resource.type == "AWS::SQS::Queue" else attributes["Ref"]
        resources[logical_id] = StackResource(logical_id, resource.type, physical or "")
    return resources


def list_stack_endpoints(sagemaker: Any, stack_name: str) -> list[dict[str, Any]]:
    """The stack's SageMaker endpoints: `<stack>-<dataset>` (common.naming.endpoint_name), as
    IdleEndpointsFunction finds them."""
    prefix = f"{stack_name}-"
    endpoints: list[dict[str, Any]] = []
    for page in sagemaker.get_paginator("list_endpoints").paginate(NameContains=prefix):
        endpoints.extend(e for e in page["Endpoints"] if e["EndpointName"].startswith(prefix))
    return sorted(endpoints, key=lambda e: e["EndpointName"])


# ---------------------------------------------------------------------------- checks
def check_credentials(sts: Any, local_endpoint: str = "") -> CheckResult:
    """Whose credentials doctor runs with (GetCallerIdentity needs no permission), or why there are none."""
    name = "local stack" if local_endpoint else "credentials"
    try:
        identity = sts.get_caller_identity()
    except (ClientError, BotoCoreError) as error:
        return CheckResult(name, problems=(explain(error, "sts:GetCallerIdentity", "", local_endpoint),))
    if local_endpoint:
        return CheckResult(name, f"{local_endpoint} answers")
    return CheckResult(name, f"{identity['Arn']} (account {identity['Account']})")


def check_stack_status(description: dict[str, Any], required_outputs: Iterable[str] = ()) -> CheckResult:
    """The stack is in a *_COMPLETE state that is not a rollback, and has the outputs the CLI reads."""
    name, status = description["StackName"], description["StackStatus"]
    reason = description.get("StackStatusReason", "")
    said = f"{name} is {status}" + (f" ({reason})" if reason else "")
    events = f"`aws cloudformation describe-stack-events --stack-name {name}`"
    problems = []
    if status.endswith("_IN_PROGRESS"):
        problems.append(
            Problem(f"{said}: a deployment is under way", "wait for it to end, then run doctor again")
        )
    elif status == "ROLLBACK_COMPLETE":
        problems.append(
            Problem(
                f"{said}: its creation failed and was rolled back, so nothing of it runs",
                f"find the first CREATE_FAILED event ({events}), fix it, then "
                f"`aws cloudformation delete-stack --stack-name {name}` and deploy again",
            )
        )
    elif status == "UPDATE_ROLLBACK_COMPLETE":
        problems.append(
            Problem(
                f"{said}: its last update failed and was rolled back; it runs the previous version",
                f"find the first UPDATE_FAILED event ({events}), fix it, and deploy again",
            )
        )
    elif status == "UPDATE_ROLLBACK_FAILED":
        problems.append(
            Problem(
                f"{said}: an update failed and so did its rollback",
                f"fix what the events name ({events}), then "
                f"`aws cloudformation continue-update-rollback --stack-name {name}`",
            )
        )
    elif status.endswith("_FAILED"):
        problems.append(
            Problem(said, f"the first *_FAILED event says why ({events}); fix it and deploy again")
        )
    elif not status.endswith("_COMPLETE") or "ROLLBACK" in status:
        problems.append(Problem(said, f"look at its events ({events})"))
    outputs = {o["OutputKey"] for o in description.get("Outputs", [])}
    missing = [key for key in required_outputs if key not in outputs]
    if missing:
        problems.append(
            Problem(
                f"the stack lacks the outputs {', '.join(missing)}: it was not deployed from this template",
                "deploy this version of template.yaml (`sam build && sam deploy`)",
            )
        )
    return CheckResult("stack", said, tuple(problems))


def check_resources(
    s3: Any, stepfunctions: Any, sns: Any, outputs: dict[str, str], local_endpoint: str = ""
) -> CheckResult:
    """Every bucket, the state machine and the topic the outputs name exist and answer these credentials."""
    redeploy = _recreate(local_endpoint)
    problems: list[Problem] = []
    found: list[str] = []
    for key in ("RawBucketName", "ProcessedBucketName", "ArtifactsBucketName"):
        bucket = outputs.get(key)
        if not bucket:
            continue
        try:
            s3.head_bucket(Bucket=bucket)
            found.append(bucket)
        except ClientError as error:
            if _code(error) in ("404", "NoSuchBucket", "NotFound"):
                problems.append(
                    Problem(
                        f"bucket {bucket} ({key}) does not exist",
                        redeploy,
                    )
                )
            else:
                # HeadBucket answers 403 without a message: its permission is s3:ListBucket.
                problems.append(explain(error, "s3:ListBucket", f"arn:aws:s3:::{bucket}", local_endpoint))
    machine = outputs.get("StateMachineArn")
    if machine:
        try:
            described = stepfunctions.describe_state_machine(stateMachineArn=machine)
            if described.get("status", "ACTIVE") != "ACTIVE":
                problems.append(Problem(f"state machine {machine} is {described['status']}", redeploy))
            else:
                found.append("the state machine")
        except ClientError as error:
            if _code(error) == "StateMachineDoesNotExist":
                problems.append(Problem(f"state machine {machine} does not exist", redeploy))
            else:
                problems.append(explain(error, "states:DescribeStateMachine", machine, local_endpoint))
    topic = outputs.get("NotificationTopicArn")
    if topic:
        try:
            attributes = sns.get_topic_attributes(TopicArn=topic)["Attributes"]
            subscribed = attributes.get("SubscriptionsConfirmed", "0")
            found.append(f"the notification topic ({subscribed} confirmed subscriptions)")
        except ClientError as error:
            if _code(error) in ("NotFound", "NotFoundException"):
                problems.append(Problem(f"notification topic {topic} does not exist", redeploy))
            else:
                problems.append(explain(error, "sns:GetTopicAttributes", topic, local_endpoint))
    return CheckResult("resources", _join(found) + " answer", tuple(problems))


def check_dead_letter_queues(
    sqs: Any, resources: dict[str, StackResource], local_endpoint: str = ""
) -> CheckResult:
    """The stack's dead-letter queues are empty; else how many messages wait and how to handle them."""
    problems: list[Problem] = []
    empty: list[str] = []
    endpoint = f" --endpoint-url {local_endpoint}" if local_endpoint else ""
    for logical_id, meaning in DEAD_LETTER_QUEUES.items():
        resource = resources.get(logical_id)
        if resource is None or not resource.physical_id:
            problems.append(Problem(f"the stack has no {logical_id}", "deploy this version of template.yaml"))
            continue
        url = resource.physical_id
        try:
            if not url.startswith(("https://", "http://")):
                url = sqs.get_queue_url(QueueName=url)["QueueUrl"]
            attributes = sqs.get_queue_attributes(
                QueueUrl=url,
                AttributeNames=[
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                    "QueueArn",
                ],
            )["Attributes"]
        except ClientError as error:
            if _code(error) in ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"):
                problems.append(
                    Problem(
                        f"{logical_id} ({resource.physical_id}) does not exist", _recreate(local_endpoint)
                    )
                )
            else:
                problems.append(explain(error, "sqs:GetQueueAttributes", _queue_arn(url), local_endpoint))
            continue
        waiting = int(attributes.get("ApproximateNumberOfMessages", 0))
        in_flight = int(attributes.get("ApproximateNumberOfMessagesNotVisible", 0))
        if waiting + in_flight == 0:
            empty.append(logical_id)
            continue
        count = f"{waiting} message{'s' if waiting != 1 else ''}" + (
            f" (and {in_flight} being read)" if in_flight else ""
        )
        read = (
            f"read them: `aws sqs receive-message{endpoint} --queue-url {url} --max-number-of-messages 10 "
            "--visibility-timeout 0`"
        )
        if logical_id == "IngestDeadLetterQueue":
            function = resources.get("PreprocessFunction")
            if local_endpoint or function is None:
                log = "PreprocessFunction's log (`conveyor -v local up` prints it)"
            else:
                log = f"/aws/lambda/{function.physical_id}"
            fix = (
                f"{read} (each is the S3 event of an upload); find why in {log}, "
                "correlation id dataset/version; "
                f"after the fix, redrive them to IngestQueue: `aws sqs start-message-move-task{endpoint} "
                f"--source-arn {attributes.get('QueueArn', _queue_arn(url))}`, or upload the files again"
            )
        else:
            fix = (
                f"{read} (each is the EventBridge event): stop the job it names by hand "
                "(`aws sagemaker stop-training-job`) or approve the package again (`conveyor approve`), then "
                f"`aws sqs purge-queue{endpoint} --queue-url {url}`"
            )
        problems.append(Problem(f"{logical_id} holds {count}: {meaning}", fix))
    return CheckResult("dead-letter queues", _join(empty) + " are empty", tuple(problems))


def check_stack_key(kms: Any, resources: dict[str, StackResource], stack_name: str) -> CheckResult:
    """With EncryptionMode SSE-KMS the stack key must be Enabled: a disabled key, or one pending deletion,
    stops every read and write of the buckets, queues and topic, and every SageMaker job."""
    key = resources.get("StackKey")
    if key is None:
        return CheckResult("stack key", "none (EncryptionMode SSE-S3: AWS-managed keys)")
    # The alias names the key locally too, where the key id is KMS's choice made at start-up.
    key_id = key.physical_id or f"alias/{stack_name}"
    metadata = kms.describe_key(KeyId=key_id)["KeyMetadata"]
    state, arn = metadata["KeyState"], metadata["Arn"]
    if state == "Enabled":
        return CheckResult("stack key", f"{arn} is Enabled")
    fixes = {
        "Disabled": f"enable it: `aws kms enable-key --key-id {arn}`",
        "PendingDeletion": f"cancel the deletion, then enable it: `aws kms cancel-key-deletion --key-id {arn}` "
        f"and `aws kms enable-key --key-id {arn}`",
    }
    return CheckResult(
        "stack key",
        problems=(
            Problem(
                f"{arn} is {state}: nothing encrypted under it (uploads, splits, models, queue messages, "
                "notifications) can be read or written",
                fixes.get(state, "see `aws kms describe-key` and the key's CloudTrail events"),
            ),
        ),
    )


def check_endpoints(sagemaker: Any, endpoints: list[dict[str, Any]], local_endpoint: str = "") -> CheckResult:
    """Every endpoint of the stack is InService; any other status with its FailureReason and what to do."""
    if not endpoints:
        return CheckResult("endpoints", "none yet (a dataset gets one when a model of it passes the gate)")
    problems: list[Problem] = []
    serving: list[str] = []
    for summary in endpoints:
        name, status = summary["EndpointName"], summary["EndpointStatus"]
        if status == "InService":
            serving.append(name)
            continue
        try:
            reason = sagemaker.describe_endpoint(EndpointName=name).get("FailureReason", "")
        except ClientError as error:
            unreadable = explain(error, "sagemaker:DescribeEndpoint", name).what
            reason = f"(its FailureReason is unreadable: {unreadable})"
        problems.append(
            Problem(f"{name} is {status}" + (f": {reason}" if reason else ""), _endpoint_fix(name, status))
        )
    summary_line = f"{_join(serving)} {'is' if len(serving) == 1 else 'are'} InService" if serving else ""
    return CheckResult("endpoints", summary_line, tuple(problems))


def _endpoint_fix(name: str, status: str) -> str:
    log = f"/aws/sagemaker/Endpoints/{name}"
    if status == "Failed":
        return (
            f"read {log}; a failed endpoint can only be deleted: "
            f"`aws sagemaker delete-endpoint --endpoint-name {name}`, then upload the dataset again "
            "(the API answers 503 for it until then)"
        )
    if status in ("Creating", "Updating", "SystemUpdating"):
        return (
            f"a deployment is under way: run doctor again later; if it stays {status} for hours, read {log}"
        )
    if status == "RollingBack":
        return (
            "an alarm fired or the new model did not start during a blue/green update: SageMaker returns "
            f"traffic to the previous model on its own; read {log} and the endpoint's alarms"
        )
    if status == "UpdateRollbackFailed":
        return (
            "both the update and its rollback failed, so it serves a mix of configs: point it at a "
            f"known-good config (`aws sagemaker update-endpoint --endpoint-name {name} "
            "--endpoint-config-name <previous>`)"
        )
    return f"read {log}"


def check_alarms(
    cloudwatch: Any,
    resources: dict[str, StackResource],
    endpoint_names: Iterable[str],
    local_endpoint: str = "",
) -> CheckResult:
    """No alarm of the stack (the template's and each endpoint's 5xx and latency alarms) is in ALARM."""
    wanted: dict[str, tuple[str, str]] = {}  # alarm name → (what it is, what to do)
    for resource in resources.values():
        if resource.type == "AWS::CloudWatch::Alarm" and resource.physical_id:
            advice = ALARM_ADVICE.get(resource.logical_id, "docs/pipeline.md#alarms-and-the-dashboard")
            wanted[resource.physical_id] = (resource.logical_id, advice)
    endpoint_alarms: set[str] = set()
    for endpoint in endpoint_names:
        log = f"/aws/sagemaker/Endpoints/{endpoint}"
        errors, latency = (endpoint + suffix for suffix in ENDPOINT_ALARM_SUFFIXES)
        wanted[errors] = ("", f"the model behind {endpoint} errs: read {log}")
        wanted[latency] = (
            "",
            f"the model behind {endpoint} is slow: read {log}; scale out (AutoScalingMaxInstances), use a "
            "larger InferenceInstanceType, or raise ModelLatencyAlarmMicroseconds",
        )
        endpoint_alarms.update((errors, latency))
    if not wanted:
        return CheckResult("alarms", "the stack has no alarms to check")
    names = list(wanted)  # the template's alarms first, then each endpoint's
    alarms: dict[str, dict[str, Any]] = {}
    try:
        for start in range(0, len(names), 100):  # DescribeAlarms takes at most 100 names
            for page in cloudwatch.get_paginator("describe_alarms").paginate(
                AlarmNames=names[start : start + 100]
            ):
                for alarm in page.get("MetricAlarms", []):
                    alarms[alarm["AlarmName"]] = alarm
    except ClientError as error:
        return CheckResult(
            "alarms", problems=(explain(error, "cloudwatch:DescribeAlarms", "*", local_endpoint),)
        )
    problems = []
    for name in names:
        logical_id, advice = wanted[name]
        label = f"{name} ({logical_id})" if logical_id and logical_id not in name else name
        alarm = alarms.get(name)
        if alarm is None:
            if name in endpoint_alarms:
                continue  # safe to delete, as docs/pipeline.md says: the next deployment puts them back
            problems.append(
                Problem(
                    f"alarm {label} does not exist, so nobody hears when it would fire",
                    _recreate(local_endpoint),
                )
            )
        elif alarm.get("StateValue") == "ALARM":
            since = alarm.get("StateUpdatedTimestamp")
            when = f" since {_when(since)}" if isinstance(since, datetime) else ""
            problems.append(
                Problem(f"alarm {label} is in ALARM{when}: {alarm.get('StateReason', '')}", advice)
            )
    missing_endpoint_alarms = sorted(endpoint_alarms - set(alarms))
    summary = f"{len(alarms)} alarm{'s' if len(alarms) != 1 else ''}, none in ALARM"
    if missing_endpoint_alarms:
        summary += f" ({_join(missing_endpoint_alarms)} absent: the next deployment puts them back)"
    return CheckResult("alarms", summary, tuple(problems))


def check_executions(
    stepfunctions: Any,
    state_machine_arn: str,
    hours: float = 24,
    now: datetime | None = None,
    local_endpoint: str = "",
) -> CheckResult:
    """No pipeline execution FAILED, TIMED_OUT or was ABORTED in the last `hours`; else each one's error."""
    now = now or datetime.now(UTC)
    since = now - timedelta(hours=hours)
    window = f"the last {hours:g} h"
    ended: list[dict[str, Any]] = []
    try:
        for status in FAILED_STATUSES:
            paginator = stepfunctions.get_paginator("list_executions")
            for page in paginator.paginate(
                stateMachineArn=state_machine_arn, statusFilter=status, PaginationConfig={"MaxItems": 1000}
            ):
                recent = [e for e in page["executions"] if _ended_at(e) >= since]
                ended.extend(recent)
                if not recent:  # newest first: a page with none in the window ends the search
                    break
    except ClientError as error:
        return CheckResult(
            "executions",
            problems=(explain(error, "states:ListExecutions", state_machine_arn, local_endpoint),),
        )
    if not ended:
        return CheckResult("executions", f"none failed, timed out or was aborted in {window}")
    ended.sort(key=_ended_at, reverse=True)
    problems = [_execution_problem(stepfunctions, e) for e in ended[:MAX_LISTED_EXECUTIONS]]
    if len(ended) > MAX_LISTED_EXECUTIONS:
        more = len(ended) - MAX_LISTED_EXECUTIONS
        problems.append(
            Problem(
                f"and {more} more ended badly in {window}",
                f"`conveyor status` lists them; `aws stepfunctions list-executions --state-machine-arn "
                f"{state_machine_arn} --status-filter FAILED`",
            )
        )
    return CheckResult("executions", problems=tuple(problems))


def _execution_problem(stepfunctions: Any, execution: dict[str, Any]) -> Problem:
    arn, status = execution["executionArn"], execution["status"]
    error = cause = ""
    try:
        described = stepfunctions.describe_execution(executionArn=arn)
        error, cause = described.get("error", ""), described.get("cause", "")
    except ClientError as failure:
        cause = f"(its error is unreadable: {explain(failure, 'states:DescribeExecution', arn).what})"
    said = {"FAILED": "failed", "TIMED_OUT": "timed out", "ABORTED": "was aborted"}[status]
    what = f"{execution['name']} {said} at {_when(_ended_at(execution))}"
    detail = ": ".join(part for part in (error, summarize_cause(cause)) if part)
    history = f"`aws stepfunctions get-execution-history --execution-arn {arn}`"
    if status == "ABORTED":
        fix = (
            "someone stopped it; CleanupFunction stopped its jobs (the `aborted` notification lists them): "
            "upload the file again to retrain"
        )
    elif status == "TIMED_OUT":
        fix = (
            "it ran past the pipeline's timeout; CleanupFunction stopped its jobs: find the slow step in "
            + history
        )
    else:
        advice = ERROR_ADVICE.get(error, "docs/pipeline.md says, state by state, what it means")
        fix = f"{advice}; the whole history: {history}"
    return Problem(what + (f": {detail}" if detail else ""), fix)


def summarize_cause(cause: str, limit: int = 240) -> str:
    """A failure cause on one short line: a Lambda error's or SageMaker's message rather than its JSON."""
    text = cause or ""
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if isinstance(document, dict):
        for key in ("errorMessage", "FailureReason", "message", "Message", "Cause", "cause"):
            if isinstance(document.get(key), str) and document[key]:
                text = document[key]
                break
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------- the whole diagnosis
def diagnose_stack(
    make_client: MakeClient, stack_name: str, *, hours: float = 24, now: datetime | None = None
) -> Report:
    """Check a deployed CloudFormation stack with the caller's credentials."""
    from conveyor.client import OUTPUT_KEYS

    checks: list[CheckResult] = []
    try:
        credentials = check_credentials(make_client("sts"))
        cloudformation = make_client("cloudformation")
    except BotoCoreError as error:
        return Report(f"stack {stack_name}", (CheckResult("credentials", problems=(explain(error),)),))
    target = f"stack {stack_name} in {cloudformation.meta.region_name}"
    checks.append(credentials)
    if not credentials.ok:
        return Report(target, tuple(checks))
    try:
        description = read_stack(cloudformation, stack_name)
    except ClientError as error:
        if _code(error) == "ValidationError" and "does not exist" in str(error):
            problem = Problem(
                f"there is no stack {stack_name} in {cloudformation.meta.region_name}",
                "check --stack and --region (`aws cloudformation list-stacks`), "
                "or deploy it (`sam deploy --guided`)",
            )
        else:
            problem = explain(error, "cloudformation:DescribeStacks", stack_name)
        checks.append(CheckResult("stack", problems=(problem,)))
        return Report(target, tuple(checks))
    checks.append(check_stack_status(description, OUTPUT_KEYS))
    outputs = {o["OutputKey"]: o["OutputValue"] for o in description.get("Outputs", [])}
    resources: dict[str, StackResource] | None
    try:
        resources = read_stack_resources(cloudformation, stack_name)
    except ClientError as error:
        checks.append(
            CheckResult(
                "stack resources", problems=(explain(error, "cloudformation:ListStackResources", stack_name),)
            )
        )
        resources = None
    checks.extend(_diagnose_resources(make_client, stack_name, outputs, resources, hours, now, ""))
    return Report(target, tuple(checks))


def diagnose_local(
    make_client: MakeClient, outputs: dict[str, str], *, hours: float = 24, now: datetime | None = None
) -> Report:
    """Check the running local stack (`conveyor local up`) whose outputs are `outputs`."""
    endpoint = outputs.get("EndpointUrl", "")
    stack_name = outputs.get("StackName", "conveyor")
    target = f"local stack {stack_name} at {endpoint}"
    reachable = check_credentials(make_client("sts"), endpoint)
    if not reachable.ok:
        return Report(target, (reachable,))
    checks = [
        reachable,
        *_diagnose_resources(
            make_client, stack_name, outputs, local_stack_resources(stack_name), hours, now, endpoint
        ),
    ]
    return Report(target, tuple(checks))


def _diagnose_resources(
    make_client: MakeClient,
    stack_name: str,
    outputs: dict[str, str],
    resources: dict[str, StackResource] | None,
    hours: float,
    now: datetime | None,
    local_endpoint: str,
) -> list[CheckResult]:
    checks = [
        _guarded(
            "resources",
            lambda: check_resources(
                make_client("s3"), make_client("stepfunctions"), make_client("sns"), outputs, local_endpoint
            ),
        )
    ]
    if resources is not None:
        checks.append(
            _guarded("stack key", lambda: check_stack_key(make_client("kms"), resources, stack_name))
        )
        checks.append(
            _guarded(
                "dead-letter queues",
                lambda: check_dead_letter_queues(make_client("sqs"), resources, local_endpoint),
            )
        )
    endpoints: list[dict[str, Any]] = []
    try:
        sagemaker = make_client("sagemaker")
        endpoints = list_stack_endpoints(sagemaker, stack_name)
        checks.append(_guarded("endpoints", lambda: check_endpoints(sagemaker, endpoints, local_endpoint)))
    except (ClientError, BotoCoreError) as error:
        checks.append(
            CheckResult(
                "endpoints",
                problems=(explain(error, "sagemaker:ListEndpoints", f"{stack_name}-*", local_endpoint),),
            )
        )
    checks.append(
        _guarded(
            "alarms",
            lambda: check_alarms(
                make_client("cloudwatch"),
                resources or {},
                [e["EndpointName"] for e in endpoints],
                local_endpoint=local_endpoint,
            ),
        )
    )
    machine = outputs.get("StateMachineArn")
    if machine:
        checks.append(
            _guarded(
                "executions",
                lambda: check_executions(make_client("stepfunctions"), machine, hours, now, local_endpoint),
            )
        )
    return checks


def _guarded(name: str, check: Callable[[], CheckResult]) -> CheckResult:
    """Run a check; an error it did not expect becomes its problem, in words, never a traceback."""
    try:
        return check()
    except (ClientError, BotoCoreError) as error:
        return CheckResult(name, problems=(explain(error),))


def stack_clients(region: str | None = None) -> MakeClient:
    """Clients for a deployed stack from the default credential chain (one session, made on first use)."""
    import boto3

    session: list[Any] = []

    def make(service: str) -> Any:
        if not session:
            session.append(boto3.session.Session(region_name=region))
        return session[0].client(service)

    return make


# ---------------------------------------------------------------------------- small helpers
def _ended_at(execution: dict[str, Any]) -> datetime:
    moment: datetime = execution.get("stopDate") or execution["startDate"]
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _recreate(local_endpoint: str) -> str:
    """What to do about a resource of the stack that is gone."""
    if local_endpoint:
        return "restart `conveyor local up`, which creates every resource again"
    return (
        "it was deleted outside CloudFormation, which does not notice (`aws cloudformation "
        "detect-stack-drift` confirms it): recreate it as the template says, or delete the stack and "
        "deploy again"
    )


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _queue_arn(url: str) -> str:
    """arn:aws:sqs:<region>:<account>:<name> from https://sqs.<region>.amazonaws.com/<account>/<name>."""
    match = re.match(r"https?://sqs\.([\w-]+)\.[^/]+/(\d+)/([^/]+)$", url)
    return f"arn:aws:sqs:{match.group(1)}:{match.group(2)}:{match.group(3)}" if match else url


def _join(items: list[str]) -> str:
    if not items:
        return "nothing"
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]
