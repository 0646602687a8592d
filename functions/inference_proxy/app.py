"""InferenceProxyFunction: the HTTP API's routes in front of the SageMaker endpoints.

Validates the request shape and size here, where a bad request is cheap, and lets the model's own
`input_fn` check values against the training schema.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response
from aws_lambda_powertools.event_handler.exceptions import ServiceError
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError

from common import aws
from common.config import Settings
from common.naming import endpoint_name, slugify
from common.telemetry import make_metrics

logger = Logger()
tracer = Tracer()
metrics = make_metrics()
app = APIGatewayHttpResolver()
MAX_INSTANCES = 10_000


class ApiError(ServiceError):
    """An error answered as `{"error": {"code", "message"}}`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status, message)
        self.code = code


# Routes that answer a client error by raising ApiError are not wrapped in tracer.capture_method: it logs
# every exception with its message (which can quote the request) and adds it to the trace. The handler's
# segment and the patched boto3 calls still trace them.
@app.exception_handler(ApiError)
def _api_error(error: ApiError) -> Response:
    return _json(error.status_code, {"error": {"code": error.code, "message": error.msg}})


def _json(status: int, body: dict[str, Any]) -> Response:
    return Response(status_code=status, content_type="application/json", body=json.dumps(body))


def _endpoint_for(name: str, settings: Settings) -> str:
    # The dataset's folder name (datasets/Iris_Data/) and its slug (iris-data) both name the model.
    try:
        slug = slugify(name)
    except ValueError:
        raise ApiError(404, "ModelNotFound", f"no model named {name!r}") from None
    return endpoint_name(settings.stack_name, slug)


def _body_bytes() -> bytes:
    event = app.current_event
    body = event.body or ""
    return base64.b64decode(body) if event.is_base64_encoded else body.encode()


def _parse_instances(raw: bytes, limit: int) -> list[dict[str, Any]]:
    if len(raw) > limit:
        raise ApiError(413, "PayloadTooLarge", f"request body is {len(raw)} bytes; the limit is {limit}")
    try:
        document = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "InvalidJson", f"request body is not valid JSON: {exc}") from None
    instances = document.get("instances") if isinstance(document, dict) else None
    if not isinstance(instances, list) or not instances:
        raise ApiError(400, "InvalidRequest", 'expected {"instances": [{"<column>": <value>, ...}, ...]}')
    if len(instances) > MAX_INSTANCES:
        raise ApiError(
            413, "TooManyInstances", f"{len(instances)} instances; at most {MAX_INSTANCES} per request"
        )
    for i, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise ApiError(400, "InvalidRequest", f"instance {i} is not a JSON object of column values")
    return instances


def _describe(endpoint: str, name: str) -> dict[str, Any]:
    try:
        return aws.client("sagemaker").describe_endpoint(EndpointName=endpoint)  # type: ignore[no-any-return]
    except ClientError as error:
        if "Could not find" in str(error) or error.response["Error"]["Code"] in (
            "ValidationException",
            "ValidationError",
        ):
            raise ApiError(404, "ModelNotFound", f"no model named {name!r}") from None
        raise


_DATA_VERSION = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}$")


def _model_summary(name: str, description: dict[str, Any]) -> dict[str, Any]:
    # Endpoint configs are named <dataset>-<data version>; the one in service says which model serves.
    found = _DATA_VERSION.search(description.get("EndpointConfigName") or "")
    return {
        "name": name,
        "status": description["EndpointStatus"],
        "model_version": found.group(0) if found else None,
    }


@app.post("/models/<name>/predict")
def predict(name: str) -> Response:
    settings = Settings.from_env()
    endpoint = _endpoint_for(name, settings)
    instances = _parse_instances(_body_bytes(), settings.max_request_bytes)
    try:
        answer = aws.client("sagemaker-runtime").invoke_endpoint(
            EndpointName=endpoint,
            ContentType="application/json",
            Accept="application/json",
            Body=json.dumps({"instances": instances}).encode(),
        )
    except ClientError as error:
        raise _invoke_error(error, endpoint, name) from None
    body = json.loads(answer["Body"].read())
    # The model names its own version (the variant keeps one name across blue/green deployments).
    version = body.get("model_version") or answer.get("InvokedProductionVariant")
    metrics.add_metric("PredictedInstances", MetricUnit.Count, len(instances))
    return _json(200, {"predictions": body["predictions"], "model_version": version})


def _invoke_error(error: ClientError, endpoint: str, name: str) -> ApiError:
    code = error.response["Error"]["Code"]
    if code == "ModelError":
        original = error.response.get("OriginalStatusCode") or 500
        message = error.response.get("OriginalMessage") or error.response["Error"].get("Message", "")
        try:
            message = json.loads(message)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            # SageMaker's serving toolkit puts a traceback after the message; the client needs the message.
            message = (str(message).strip().splitlines() or [""])[0]
        if 400 <= int(original) < 500:
            return ApiError(400, "InvalidInput", str(message))
        # Not the model's message: it may quote the request, and no payload goes to these logs.
        logger.error("model failed", extra={"endpoint": endpoint, "model_status": int(original)})
        metrics.add_metric("ModelFailures", MetricUnit.Count, 1)
        return ApiError(502, "ModelFailed", "the model failed to answer; see the endpoint's logs")
    if code in ("ThrottlingException", "TooManyRequestsException"):
        return ApiError(429, "Throttled", "too many requests; retry with backoff")
    if code in ("ValidationError", "ValidationException"):
        status = _describe(endpoint, name)["EndpointStatus"]  # raises 404 when there is no endpoint
        return ApiError(503, "ModelNotReady", f"model {name!r} is {status}; retry when it is InService")
    if code in ("ServiceUnavailable", "InternalFailure"):
        return ApiError(503, "ServiceUnavailable", "SageMaker is unavailable; retry with backoff")
    raise error


@app.get("/models")
@tracer.capture_method
def list_models() -> Response:
    settings = Settings.from_env()
    prefix = f"{settings.stack_name}-"
    sagemaker = aws.client("sagemaker")
    models = []
    for page in sagemaker.get_paginator("list_endpoints").paginate(NameContains=prefix):
        for summary in page["Endpoints"]:
            endpoint = summary["EndpointName"]
            if endpoint.startswith(prefix):
                name = endpoint[len(prefix) :]
                models.append(_model_summary(name, sagemaker.describe_endpoint(EndpointName=endpoint)))
    return _json(200, {"models": sorted(models, key=lambda m: m["name"])})


@app.get("/models/<name>")
def describe_model(name: str) -> Response:
    endpoint = _endpoint_for(name, Settings.from_env())
    return _json(200, _model_summary(name, _describe(endpoint, name)))


@app.not_found
def _not_found(_: Exception) -> Response:
    return _json(404, {"error": {"code": "NotFound", "message": "no such route"}})


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics(raise_on_empty_metrics=False)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
