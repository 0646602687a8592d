"""Talk to a conveyor stack, local or on AWS: upload a dataset, follow its pipeline, call the API.

A *target* is the stack's outputs: from `conveyor local up --outputs-file F` (which adds the emulator's
endpoint, credentials and CA bundle) or from a deployed CloudFormation stack.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import requests
from botocore.exceptions import ClientError

from conveyor.local.cloud import make_functions_importable
from conveyor.sigv4 import sign_request

DEFAULT_OUTPUTS = Path(".conveyor/outputs.json")
OUTPUT_KEYS = (
    "RawBucketName",
    "ProcessedBucketName",
    "ArtifactsBucketName",
    "StateMachineArn",
    "ApiUrl",
    "NotificationTopicArn",
    "DashboardUrl",
)


class ConveyorError(RuntimeError):
    """Something the user can fix; the message says what."""


@dataclass
class Target:
    outputs: dict[str, str]
    session: boto3.session.Session
    endpoint_url: str | None = None
    ca_bundle: str | None = None

    @property
    def local(self) -> bool:
        return self.endpoint_url is not None

    def client(self, service: str) -> Any:
        return self.session.client(service, endpoint_url=self.endpoint_url)


def load_target(
    outputs_file: Path | None = None, stack: str | None = None, region: str | None = None
) -> Target:
    """The stack to talk to: an outputs file, a CloudFormation stack name, or `.conveyor/outputs.json`."""
    if stack:
        session = boto3.session.Session(region_name=region)
        try:
            description = session.client("cloudformation").describe_stacks(StackName=stack)["Stacks"][0]
        except ClientError as error:
            raise ConveyorError(f"cannot read stack {stack!r}: {error}") from None
        outputs = {o["OutputKey"]: o["OutputValue"] for o in description.get("Outputs", [])}
        outputs["StackName"] = stack
        return Target(outputs, session)
    path = outputs_file or DEFAULT_OUTPUTS
    if not path.exists():
        raise ConveyorError(
            f"no stack outputs at {path}: start one with `conveyor local up --outputs-file {path}` "
            "or name a deployed stack with --stack"
        )
    outputs = json.loads(path.read_text())
    missing = [k for k in OUTPUT_KEYS if k not in outputs]
    if missing:
        raise ConveyorError(f"{path} lacks stack outputs {missing}")
    session = boto3.session.Session(
        aws_access_key_id=outputs.get("AccessKeyId"),
        aws_secret_access_key=outputs.get("SecretAccessKey"),
        region_name=outputs.get("Region", region),
    )
    return Target(outputs, session, outputs.get("EndpointUrl"), outputs.get("CaBundle"))


@dataclass
class Upload:
    dataset: str
    bucket: str
    key: str
    version_id: str | None
    etag: str
    execution_arn: str


def upload(target: Target, path: Path, dataset: str) -> Upload:
    """Put `path` under `datasets/<dataset>/` in RawBucket; return where, and which execution it will start."""
    make_functions_importable()
    from common.naming import execution_name, object_identity, slugify

    if not path.is_file():
        raise ConveyorError(f"{path} is not a file")
    bucket = target.outputs["RawBucketName"]
    key = f"datasets/{dataset}/{path.name}"
    s3 = target.client("s3")
    s3.upload_file(str(path), bucket, key)
    head = s3.head_object(Bucket=bucket, Key=key)
    identity = object_identity(bucket, key, head.get("VersionId"), head.get("ETag"))
    machine = target.outputs["StateMachineArn"]
    execution = (
        machine.replace(":stateMachine:", ":execution:") + ":" + execution_name(slugify(dataset), identity)
    )
    return Upload(slugify(dataset), bucket, key, head.get("VersionId"), head["ETag"], execution)


def follow(
    target: Target,
    upload_: Upload,
    on_progress: Callable[[str], None] = print,
    timeout: float = 1800,
) -> dict[str, Any]:
    """Wait for the upload's execution to start and finish, reporting each state it enters."""
    sfn = target.client("stepfunctions")
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    on_progress(f"waiting for preprocessing of s3://{upload_.bucket}/{upload_.key}")
    while True:
        try:
            sfn.describe_execution(executionArn=upload_.execution_arn)
            break
        except ClientError as error:
            if error.response["Error"]["Code"] != "ExecutionDoesNotExist":
                raise
        report = _quarantine_report(target, upload_.dataset)
        if report is not None and report.get("source", {}).get("key") == upload_.key:
            raise ConveyorError(f"the upload was quarantined: {report['reason']}")
        if time.monotonic() > deadline:
            raise ConveyorError("no pipeline started; check the PreprocessFunction's logs and the ingest DLQ")
        time.sleep(0.5)
    seen = 0
    reported: set[str] = set()  # a polling loop enters the same states many times: say each once
    while True:
        description = sfn.describe_execution(executionArn=upload_.execution_arn)
        events = sfn.get_execution_history(executionArn=upload_.execution_arn, maxResults=1000)["events"]
        for event in events[seen:]:
            if event["type"].endswith("StateEntered"):
                state = event["stateEnteredEventDetails"]["name"]
                if state not in reported:
                    reported.add(state)
                    on_progress(f"{time.monotonic() - started:6.1f}s  {state}")
        seen = len(events)
        if description["status"] != "RUNNING":
            output = json.loads(description.get("output") or "{}")
            return {"status": description["status"], **output}
        if time.monotonic() > deadline:
            raise ConveyorError(f"the pipeline is still running after {timeout:.0f} s")
        time.sleep(1)


def _quarantine_report(target: Target, dataset: str) -> dict[str, Any] | None:
    s3 = target.client("s3")
    bucket = target.outputs["ProcessedBucketName"]
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=f"quarantine/{dataset}/")
    newest = max(listing.get("Contents", []), key=lambda o: o["LastModified"], default=None)
    if newest is None:
        return None
    report: dict[str, Any] = json.loads(s3.get_object(Bucket=bucket, Key=newest["Key"])["Body"].read())
    return report


@dataclass
class Approval:
    dataset: str
    version: str
    package_arn: str
    execution_arn: str  # the execution ApprovalFunction starts to deploy it


def approve(target: Target, dataset: str, version: str | None = None, note: str = "") -> Approval:
    """Approve the model package of `dataset` (its `version`, else the newest) that waits in
    PendingManualApproval; SageMaker's state change event makes ApprovalFunction deploy it."""
    make_functions_importable()
    from approval.core import deployment_name
    from common.naming import ResourceNames, slugify

    slug = slugify(dataset)
    group = ResourceNames.for_version(
        target.outputs.get("StackName", "conveyor"), slug, ""
    ).model_package_group
    sagemaker = target.client("sagemaker")
    try:
        waiting = sagemaker.list_model_packages(
            ModelPackageGroupName=group, ModelApprovalStatus="PendingManualApproval", MaxResults=100
        )["ModelPackageSummaryList"]
    except ClientError as error:
        raise ConveyorError(f"cannot list the model packages of {dataset!r} ({group}): {error}") from None
    described = [sagemaker.describe_model_package(ModelPackageName=p["ModelPackageArn"]) for p in waiting]
    if version:
        described = [
            p for p in described if (p.get("CustomerMetadataProperties") or {}).get("version") == version
        ]
    if not described:
        which = f"version {version} of {dataset!r}" if version else f"{dataset!r}"
        raise ConveyorError(f"no model of {which} waits for approval (group {group})")
    package = max(described, key=lambda p: p["CreationTime"])
    metadata = package.get("CustomerMetadataProperties") or {}
    sagemaker.update_model_package(
        ModelPackageArn=package["ModelPackageArn"],
        ModelApprovalStatus="Approved",
        ApprovalDescription=(note or "approved with conveyor approve")[:1024],
    )
    trained = metadata.get("execution", "")
    deploying = f"{trained.rsplit(':', 1)[0]}:{deployment_name(trained)}"
    return Approval(slug, metadata.get("version", ""), package["ModelPackageArn"], deploying)


REPORT_FILES = (".html", ".png", ".json")


def fetch_report(target: Target, dataset: str, version: str | None, destination: Path) -> Path:
    """Download the training report of `dataset` (its `version`, else the newest training job) from the job's
    output.tar.gz into `destination`/<dataset>/<version>/; the path of its report.html."""
    import io
    import tarfile

    make_functions_importable()
    from common.naming import slugify

    slug = slugify(dataset)
    sagemaker = target.client("sagemaker")
    if version is None:
        jobs = sagemaker.list_training_jobs(
            NameContains=f"{slug}-", SortBy="CreationTime", SortOrder="Descending", StatusEquals="Completed"
        )["TrainingJobSummaries"]
        jobs = [j for j in jobs if j["TrainingJobName"].startswith(f"{slug}-")]
        if not jobs:
            raise ConveyorError(f"no completed training job of {dataset!r}: upload it first")
        job_name = jobs[0]["TrainingJobName"]
        version = job_name[len(slug) + 1 :]
    else:
        job_name = f"{slug}-{version}"[:63]
    try:
        job = sagemaker.describe_training_job(TrainingJobName=job_name)
    except ClientError as error:
        raise ConveyorError(f"no training job {job_name} ({error.response['Error']['Message']})") from None
    if job["TrainingJobStatus"] != "Completed":
        raise ConveyorError(
            f"training job {job_name} is {job['TrainingJobStatus']}: {job.get('FailureReason', '')}"
        )
    model_uri = job["ModelArtifacts"]["S3ModelArtifacts"]
    bucket, key = model_uri.removeprefix("s3://").split("/", 1)
    output_key = key.rsplit("/", 1)[0] + "/output.tar.gz"
    try:
        body = target.client("s3").get_object(Bucket=bucket, Key=output_key)["Body"].read()
    except ClientError as error:
        raise ConveyorError(f"cannot read s3://{bucket}/{output_key}: {error}") from None
    folder = destination / slug / version
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as archive:
        for member in archive.getmembers():
            name = Path(member.name).name
            if member.isfile() and name.endswith(REPORT_FILES):
                handle = archive.extractfile(member)
                if handle is not None:
                    (folder / name).write_bytes(handle.read())
    report = folder / "report.html"
    if not report.exists():
        raise ConveyorError(
            f"s3://{bucket}/{output_key} has no report.html (trained before reports existed?)"
        )
    return report


def follow_execution(target: Target, execution_arn: str, timeout: float = 1800) -> dict[str, Any]:
    """Wait for an execution to exist and finish; its status and output."""
    sfn = target.client("stepfunctions")
    deadline = time.monotonic() + timeout
    while True:
        try:
            description = sfn.describe_execution(executionArn=execution_arn)
        except ClientError as error:
            if error.response["Error"]["Code"] != "ExecutionDoesNotExist":
                raise
            description = None
        if description is not None and description["status"] != "RUNNING":
            return {"status": description["status"], **json.loads(description.get("output") or "{}")}
        if time.monotonic() > deadline:
            raise ConveyorError(f"{execution_arn} has not finished after {timeout:.0f} s")
        time.sleep(1)


def api_request(target: Target, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """A SigV4-signed request to the stack's HTTP API (IAM authorization); returns (status, JSON)."""
    url = target.outputs["ApiUrl"].rstrip("/") + path
    data = b"" if body is None else json.dumps(body).encode()
    credentials = target.session.get_credentials()
    if credentials is None:
        raise ConveyorError("no AWS credentials to sign the request with")
    frozen = credentials.get_frozen_credentials()
    headers = sign_request(
        method,
        url,
        data,
        (frozen.access_key, frozen.secret_key, frozen.token),
        target.session.region_name or "us-east-1",
        headers={"Content-Type": "application/json"} if body is not None else None,
    )
    response = requests.request(
        method, url, data=data, headers=headers, verify=target.ca_bundle or True, timeout=60
    )
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, {"error": {"code": "NotJson", "message": response.text[:500]}}


def predict(target: Target, dataset: str, instances: list[dict[str, Any]]) -> dict[str, Any]:
    status, answer = api_request(target, "POST", f"/models/{dataset}/predict", {"instances": instances})
    if status != 200:
        error = answer.get("error", answer) if isinstance(answer, dict) else answer
        raise ConveyorError(f"prediction failed ({status}): {error}")
    return answer  # type: ignore[no-any-return]
