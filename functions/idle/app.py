"""IdleEndpointsFunction (a daily schedule): delete the stack's endpoints that nobody called for
IDLE_ENDPOINT_DAYS days (0, the default, keeps every endpoint), and say so on the notification topic."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from common import aws
from common.config import Settings
from common.telemetry import make_metrics
from idle.core import Endpoint, idle

logger = Logger()
tracer = Tracer()
metrics = make_metrics()


def _invocations(name: str, since: datetime, now: datetime) -> float:
    """Sum of the endpoint's Invocations (all variants) since `since`."""
    answer = aws.client("cloudwatch").get_metric_data(
        MetricDataQueries=[
            {
                "Id": "invocations",
                "Expression": (
                    f'SUM(SEARCH(\'{{AWS/SageMaker,EndpointName,VariantName}} MetricName="Invocations" '
                    f"EndpointName=\"{name}\"', 'Sum', 86400))"
                ),
                "ReturnData": True,
            }
        ],
        StartTime=since,
        EndTime=now,
    )
    return float(sum(value for result in answer["MetricDataResults"] for value in result.get("Values", [])))


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics(raise_on_empty_metrics=False)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    settings = Settings.from_env()
    days = settings.idle_endpoint_days
    if days <= 0:
        return {"deleted": [], "reason": "IdleEndpointDays is 0: endpoints are kept"}
    now = datetime.now(UTC)
    sagemaker = aws.client("sagemaker")
    deleted = []
    prefix = f"{settings.stack_name}-"
    for page in sagemaker.get_paginator("list_endpoints").paginate(NameContains=prefix):
        for summary in page["Endpoints"]:
            if not summary["EndpointName"].startswith(prefix):
                continue
            endpoint = Endpoint(
                summary["EndpointName"],
                summary["EndpointStatus"],
                summary["LastModifiedTime"],
                _invocations(summary["EndpointName"], now - timedelta(days=days), now),
            )
            reason = idle(endpoint, days, now)
            if reason is None:
                continue
            sagemaker.delete_endpoint(EndpointName=endpoint.name)
            logger.info("deleted an idle endpoint", extra={"endpoint": endpoint.name, "reason": reason})
            deleted.append({"endpoint": endpoint.name, "reason": reason})
            if settings.notification_topic_arn:
                aws.client("sns").publish(
                    TopicArn=settings.notification_topic_arn,
                    Subject=f"conveyor: endpoint {endpoint.name} deleted (idle)"[:100],
                    Message=json.dumps({"outcome": "endpoint_deleted", **deleted[-1]}),
                    MessageAttributes={"outcome": {"DataType": "String", "StringValue": "endpoint_deleted"}},
                )
    metrics.add_metric("IdleEndpointsDeleted", MetricUnit.Count, len(deleted))
    return {"deleted": deleted}
