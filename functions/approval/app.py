"""ApprovalFunction (EventBridge: a conveyor model package's approval status changed): when a person
approves a package that waits for them (conveyor.json `"approval": "manual"`), start its deployment."""

from __future__ import annotations

import json
from typing import Any

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.data_classes import EventBridgeEvent, event_source
from aws_lambda_powertools.utilities.typing import LambdaContext

from approval.core import deployment, package_to_deploy
from common import aws
from common.config import Settings
from common.telemetry import make_metrics

logger = Logger()
tracer = Tracer()
metrics = make_metrics()


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics(raise_on_empty_metrics=False)
@event_source(data_class=EventBridgeEvent)
def handler(event: EventBridgeEvent, context: LambdaContext) -> dict[str, Any]:
    settings = Settings.from_env()
    arn = event.detail.get("ModelPackageArn") or (event.resources or [None])[0]
    logger.append_keys(model_package=arn)
    sagemaker = aws.client("sagemaker")
    package = sagemaker.describe_model_package(ModelPackageName=arn)
    why_not = package_to_deploy(event.detail, package)
    if why_not:
        logger.info("nothing to deploy", extra={"reason": why_not})
        return {"started": None, "reason": why_not}
    metadata = package["CustomerMetadataProperties"]
    logger.append_keys(dataset=metadata.get("dataset"), version=metadata.get("version"))
    stepfunctions = aws.client("stepfunctions")
    trained = stepfunctions.describe_execution(executionArn=metadata["execution"])
    run = deployment(arn, metadata["execution"], trained["input"])
    try:
        started = stepfunctions.start_execution(
            stateMachineArn=settings.require("state_machine_arn"), name=run.name, input=json.dumps(run.input)
        )["executionArn"]
    except stepfunctions.exceptions.ExecutionAlreadyExists:
        logger.info("its deployment was started already (a repeated event)", extra={"execution": run.name})
        return {"started": None, "reason": "already started", "execution": run.name}
    metrics.add_metric("ApprovedDeploymentsStarted", MetricUnit.Count, 1)
    logger.info("deploying the approved package", extra={"execution": started})
    return {"started": started}
