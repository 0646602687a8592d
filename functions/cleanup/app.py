"""CleanupFunction (EventBridge: a Pipeline execution ABORTED or TIMED_OUT): stop the SageMaker jobs the
execution left running, and tell the notification topic's subscribers, once per execution."""

from __future__ import annotations

import json
from typing import Any

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.data_classes import EventBridgeEvent, event_source
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError

from cleanup.core import clean_up, ended_execution, notification
from common import aws
from common.announce import announce
from common.config import Settings
from common.telemetry import make_metrics

logger = Logger()
tracer = Tracer()
metrics = make_metrics()
# Where each cleanup is recorded; the conditional write of this object makes a repeated event harmless.
RECORD_PREFIX = "cleanup/"


def _missing(error: ClientError) -> bool:
    """SageMaker's answer for a job that does not exist (the execution ended before it started it)."""
    code = error.response["Error"]["Code"]
    message = str(error.response["Error"].get("Message", "")).lower()
    return code == "ResourceNotFound" or (
        code == "ValidationException"
        and any(words in message for words in ("not found", "does not exist", "could not find"))
    )


class SageMakerJobs:
    """`cleanup.core.Jobs` over the SageMaker API."""

    def status(self, kind: str, name: str) -> str | None:
        sagemaker = aws.client("sagemaker")
        try:
            if kind == "training":
                return str(sagemaker.describe_training_job(TrainingJobName=name)["TrainingJobStatus"])
            return str(sagemaker.describe_processing_job(ProcessingJobName=name)["ProcessingJobStatus"])
        except ClientError as error:
            if _missing(error):
                return None
            raise

    def stop(self, kind: str, name: str) -> str:
        sagemaker = aws.client("sagemaker")
        try:
            if kind == "training":
                sagemaker.stop_training_job(TrainingJobName=name)
            else:
                sagemaker.stop_processing_job(ProcessingJobName=name)
        except ClientError as error:
            if error.response["Error"]["Code"] != "ValidationException":
                raise
            # It ended (or began stopping) between DescribeJob and StopJob: report what it is now.
            logger.info("job no longer stoppable", extra={"job": name, "reason": str(error)})
            return self.status(kind, name) or "NotStarted"
        logger.info("stopped job", extra={"kind": kind, "job": name})
        return "Stopping"


def _claim(bucket: str, key: str, body: dict[str, Any]) -> bool:
    """Write the cleanup record unless it exists; False when another delivery of the event got there first."""
    try:
        aws.client("s3").put_object(
            Bucket=bucket,
            Key=key,
            Body=json.dumps(body).encode(),
            ContentType="application/json",
            IfNoneMatch="*",
        )
    except ClientError as error:
        if error.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False
        raise
    return True


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics(raise_on_empty_metrics=False)
@event_source(data_class=EventBridgeEvent)
def handler(event: EventBridgeEvent, context: LambdaContext) -> dict[str, Any]:
    settings = Settings.from_env()
    detail = event.detail
    logger.append_keys(execution=detail.get("executionArn"), status=detail.get("status"))
    execution_input = None
    if not detail.get("input"):  # EventBridge leaves out an input over its size limit
        execution_input = aws.client("stepfunctions").describe_execution(executionArn=detail["executionArn"])[
            "input"
        ]
    execution = ended_execution(detail, execution_input)
    if execution is None:
        logger.info("nothing to clean up for this status")
        return {"outcome": None}
    logger.append_keys(dataset=execution.dataset, version=execution.version)

    # Stopping is idempotent by itself (a second pass finds the jobs Stopping); only the notice needs a guard.
    report = clean_up(execution, SageMakerJobs())
    notice = notification(execution, report)
    key = f"{RECORD_PREFIX}{execution.dataset}/{execution.name}.json"
    bucket = settings.require("artifacts_bucket")
    if not _claim(bucket, key, notice.message):
        logger.info("already cleaned up and notified (a repeated event)", extra=notice.message)
        return {**notice.message, "notified": False}
    try:
        aws.client("sns").publish(
            TopicArn=settings.require("notification_topic_arn"),
            Subject=notice.subject,
            Message=json.dumps(notice.message),
            MessageAttributes=notice.attributes,
        )
    except Exception:
        # Let the retry of this event notify: it must not find the record of a notice never sent.
        aws.client("s3").delete_object(Bucket=bucket, Key=key)
        raise
    announce(notice.message)  # the same summary on EventBridge: "Pipeline Aborted"
    metrics.add_metric("ExecutionsCleanedUp", MetricUnit.Count, 1)
    logger.info("cleaned up", extra=notice.message)
    return {**notice.message, "notified": True}
