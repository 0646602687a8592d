"""EvaluateFunction (a Step Functions task): read the finished job's evaluation, publish it for the Model
Registry, and tell the state machine what the gate and the deployment need."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlparse

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError

from common import aws
from common.config import Settings
from common.telemetry import make_metrics
from evaluate.core import EvaluationError, evaluation_from_tarball, gate, metric_value

logger = Logger()
tracer = Tracer()
metrics = make_metrics()


def _split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def _endpoint_exists(name: str) -> bool:
    try:
        aws.client("sagemaker").describe_endpoint(EndpointName=name)
    except ClientError as error:
        if error.response["Error"]["Code"] == "ValidationException" or "Could not find" in str(error):
            return False
        raise
    return True


def _ensure_model_package_group(name: str, dataset: str) -> None:
    sagemaker = aws.client("sagemaker")
    try:
        sagemaker.describe_model_package_group(ModelPackageGroupName=name)
        return
    except ClientError as error:
        if error.response["Error"]["Code"] not in ("ValidationException", "ResourceNotFound"):
            raise
    sagemaker.create_model_package_group(
        ModelPackageGroupName=name,
        ModelPackageGroupDescription=f"conveyor models of dataset {dataset}",
        Tags=[{"Key": "conveyor:dataset", "Value": dataset}],
    )
    logger.info("created model package group", extra={"group": name})


def _champion(group: str, metric: str, exclude: str | None = None) -> dict[str, Any] | None:
    """The dataset's champion: its latest Approved model package, with its value of `metric` (None when
    the group has no approved package yet, or the champion's evaluation lacks that metric); never `exclude`."""
    sagemaker = aws.client("sagemaker")
    packages = sagemaker.list_model_packages(
        ModelPackageGroupName=group,
        ModelApprovalStatus="Approved",
        SortBy="CreationTime",
        SortOrder="Descending",
        MaxResults=10,
    )["ModelPackageSummaryList"]
    if not packages:
        return None
    packages = [p for p in packages if p["ModelPackageArn"] != exclude]
    if not packages:
        return None
    latest = max(packages, key=lambda p: p["CreationTime"])  # not every emulator honours SortBy
    package = sagemaker.describe_model_package(ModelPackageName=latest["ModelPackageArn"])
    statistics = package["ModelMetrics"]["ModelQuality"]["Statistics"]["S3Uri"]
    bucket, key = _split_s3(statistics)
    evaluation = json.loads(aws.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())
    try:
        value = metric_value(evaluation, metric)
    except EvaluationError:
        logger.warning(
            "the champion has no value for the gate's metric: threshold only", extra={"metric": metric}
        )
        return None
    version = (package.get("CustomerMetadataProperties") or {}).get("version")
    return {"value": value, "version": version, "package": latest["ModelPackageArn"]}


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics(raise_on_empty_metrics=False)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    settings = Settings.from_env()
    names = event["names"]
    logger.append_keys(dataset=event["dataset"], version=event["version"])
    job = aws.client("sagemaker").describe_training_job(TrainingJobName=names["training_job"])
    model_data_url = job["ModelArtifacts"]["S3ModelArtifacts"]
    # SageMaker uploads SM_OUTPUT_DATA_DIR beside the model as output.tar.gz.
    bucket, key = _split_s3(model_data_url.rsplit("/", 1)[0] + "/output.tar.gz")
    archive = aws.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    evaluation = evaluation_from_tarball(archive)

    artifacts = settings.require("artifacts_bucket")
    evaluation_key = f"evaluations/{event['dataset']}/{event['version']}/evaluation.json"
    aws.client("s3").put_object(
        Bucket=artifacts,
        Key=evaluation_key,
        Body=json.dumps(evaluation).encode(),
        ContentType="application/json",
    )
    _ensure_model_package_group(names["model_package_group"], event["dataset"])
    metric = event["gate"].get("metric") or (evaluation.get("conveyor") or {}).get("metric")
    # A package a person approved is not its own champion: compare it with the one before it.
    approved = (event.get("approved") or {}).get("package")
    champion = _champion(names["model_package_group"], metric, exclude=approved) if metric else None
    decision = gate(
        evaluation,
        event["gate"].get("metric"),
        event["gate"].get("threshold"),
        champion=champion,
        margin=float(event["gate"].get("margin") or 0.0),
    )
    if approved:
        decision = {
            **decision,
            "deploy": True,
            "reason": f"approved in the Model Registry ({approved}); the gate said: {decision['reason']}",
        }
    result = {
        **decision,
        "model_data_url": model_data_url,
        "evaluation_uri": f"s3://{artifacts}/{evaluation_key}",
        "endpoint_exists": _endpoint_exists(names["endpoint"]),
        # For the Model Registry: which code trained it (training/train.py's code_version).
        "code_version": str((evaluation.get("conveyor") or {}).get("code_version") or "unknown")[:256],
    }
    metrics.add_metric("ModelsEvaluated", MetricUnit.Count, 1)
    metrics.add_metric("ModelsPassingGate", MetricUnit.Count, 1 if decision["deploy"] else 0)
    logger.info("evaluated", extra=result)
    return result
