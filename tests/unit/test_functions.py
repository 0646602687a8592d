"""The proxy's answers and the gate's inputs, with AWS stubbed at the client (botocore Stubber)."""

import copy
import io
import json
import tarfile
from pathlib import Path

import boto3
import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber

from common import aws
from evaluate.core import EvaluationError, evaluation_from_tarball, gate
from inference_proxy import app as proxy

EVENT = json.loads((Path(__file__).parents[1] / "events" / "http_api_v2_example.json").read_text())


class Context:
    function_name = "proxy"
    memory_limit_in_mb = 256
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:proxy"
    aws_request_id = "req"


def request(path: str, body, method="POST"):
    event = copy.deepcopy(EVENT)
    raw = body if isinstance(body, str) else json.dumps(body)
    name = path.split("/")[2] if path.count("/") >= 2 else None
    event.update(
        rawPath=path,
        routeKey=f"{method} /models/{{name}}/predict"
        if path.endswith("/predict")
        else f"{method} /models/{{name}}",
        body=raw,
        isBase64Encoded=False,
        pathParameters={"name": name} if name else None,
    )
    event["requestContext"]["http"].update(method=method, path=path)
    response = proxy.handler(event, Context())
    return response["statusCode"], json.loads(response["body"])


@pytest.fixture
def runtime(monkeypatch):
    monkeypatch.setenv("STACK_NAME", "conveyor")
    monkeypatch.setenv("MAX_REQUEST_BYTES", "2000")
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "true")
    clients = {
        s: boto3.client(s, region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b")
        for s in ("sagemaker-runtime", "sagemaker")
    }
    stubbers = {s: Stubber(c) for s, c in clients.items()}
    for service, client in clients.items():
        aws.set_client(service, client)
        stubbers[service].activate()
    yield stubbers
    aws.reset_clients()


def body_of(document) -> StreamingBody:
    raw = json.dumps(document).encode()
    return StreamingBody(io.BytesIO(raw), len(raw))


def test_predict_forwards_instances_and_names_the_serving_version(runtime):
    runtime["sagemaker-runtime"].add_response(
        "invoke_endpoint",
        {
            # The model names its version; the variant is AllTraffic in every endpoint config.
            "Body": body_of({"predictions": [{"value": 3.5}], "model_version": "20261122T175500Z-1a2b3c"}),
            "InvokedProductionVariant": "AllTraffic",
            "ContentType": "application/json",
        },
        {
            "EndpointName": "conveyor-churn",
            "ContentType": "application/json",
            "Accept": "application/json",
            "Body": json.dumps({"instances": [{"a": 1}]}).encode(),
        },
    )
    status, body = request("/models/churn/predict", {"instances": [{"a": 1}]})
    assert status == 200
    assert body == {"predictions": [{"value": 3.5}], "model_version": "20261122T175500Z-1a2b3c"}


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        ("not json", 400, "InvalidJson"),
        ({"instances": []}, 400, "InvalidRequest"),
        ({"instances": [1, 2]}, 400, "InvalidRequest"),
        ({"instances": [{"x": "y" * 3000}]}, 413, "PayloadTooLarge"),
    ],
)
def test_bad_requests_never_reach_the_endpoint(runtime, payload, status, code):
    answer = request("/models/churn/predict", payload)
    assert answer[0] == status
    assert answer[1]["error"]["code"] == code


@pytest.mark.parametrize(
    "original_message",
    [
        json.dumps({"error": {"message": "instance 0: missing feature column 'age'"}}),
        # SageMaker's serving toolkit puts a traceback after the message; clients get the message alone.
        "instance 0: missing feature column 'age'\nTraceback (most recent call last):\n  ...",
    ],
)
def test_model_input_errors_become_400_with_the_models_message(runtime, original_message):
    runtime["sagemaker-runtime"].add_client_error(
        "invoke_endpoint",
        service_error_code="ModelError",
        service_message="Received client error (400)",
        http_status_code=424,
        response_meta={},
        modeled_fields={"OriginalStatusCode": 400, "OriginalMessage": original_message},
    )
    status, body = request("/models/churn/predict", {"instances": [{"a": 1}]})
    assert (status, body["error"]["message"]) == (400, "instance 0: missing feature column 'age'")


def test_unknown_model_is_404_and_an_endpoint_being_created_is_503(runtime):
    for _ in range(2):
        runtime["sagemaker-runtime"].add_client_error(
            "invoke_endpoint",
            service_error_code="ValidationError",
            service_message="Endpoint not found",
            http_status_code=400,
        )
    runtime["sagemaker"].add_client_error(
        "describe_endpoint",
        service_error_code="ValidationException",
        service_message="Could not find endpoint",
        http_status_code=400,
    )
    assert request("/models/churn/predict", {"instances": [{"a": 1}]})[0] == 404
    runtime["sagemaker"].add_response(
        "describe_endpoint",
        {
            "EndpointName": "conveyor-churn",
            "EndpointArn": "arn:aws:sagemaker:us-east-1:123456789012:endpoint/x",
            "EndpointConfigName": "c",
            "EndpointStatus": "Creating",
            "CreationTime": "2026-11-22T00:00:00Z",
            "LastModifiedTime": "2026-11-22T00:00:00Z",
        },
    )
    status, body = request("/models/churn/predict", {"instances": [{"a": 1}]})
    assert (status, body["error"]["code"]) == (503, "ModelNotReady")


def evaluation(task="classification", value=0.9, baseline=0.6):
    return {
        "binary_classification_metrics": {"accuracy": {"value": value}, "f1": {"value": 0.7}},
        "conveyor": {"task": task, "metric": "accuracy", "value": value, "baseline": baseline},
    }


def test_gate_defaults_to_beating_the_baseline_and_honours_the_spec():
    decision = gate(evaluation(), None, None)
    assert {k: decision[k] for k in ("metric", "value", "threshold", "baseline", "deploy", "champion")} == {
        "metric": "accuracy",
        "value": 0.9,
        "threshold": 0.6,
        "baseline": 0.6,
        "deploy": True,
        "champion": None,
    }
    assert decision["reason"] == "accuracy = 0.9 is above the threshold 0.6; no champion yet"
    assert gate(evaluation(value=0.5), None, None)["deploy"] is False
    assert gate(evaluation(), "f1", 0.8)["value"] == 0.7
    with pytest.raises(EvaluationError, match="no baseline"):
        gate(evaluation(), "f1", None)
    with pytest.raises(EvaluationError, match="no metric"):
        gate(evaluation(), "auc", 0.5)


@pytest.mark.parametrize(
    ("value", "champion", "margin", "deploy", "says"),
    [
        (0.90, 0.85, 0.0, True, "beats the champion (version v1: 0.85)"),
        (0.90, 0.90, 0.0, True, "beats"),  # as good as the champion: not worse
        (0.88, 0.85, 0.05, False, "does not beat the champion (version v1: 0.85) by the margin 0.05"),
        (0.80, 0.85, 0.0, False, "does not beat"),
        (0.55, 0.50, 0.0, False, "not above the threshold 0.6"),  # the threshold first, champion or not
    ],
)
def test_the_gate_compares_the_challenger_with_the_champion(value, champion, margin, deploy, says):
    decision = gate(
        evaluation(value=value), None, None, champion={"value": champion, "version": "v1"}, margin=margin
    )
    assert decision["deploy"] is deploy
    assert says in decision["reason"]


def test_for_an_error_metric_lower_is_better():
    doc = evaluation()
    doc["regression_metrics"] = {"rmse": {"value": 3.0}}
    assert gate(doc, "rmse", 4.0)["deploy"] is True
    assert gate(doc, "rmse", 2.0)["deploy"] is False
    assert gate(doc, "rmse", 4.0, champion={"value": 3.5, "version": "v1"})["deploy"] is True
    assert gate(doc, "rmse", 4.0, champion={"value": 2.9, "version": "v1"})["deploy"] is False


def test_evaluation_is_read_from_the_jobs_output_tarball():
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        data = json.dumps(evaluation()).encode()
        info = tarfile.TarInfo("evaluation.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert evaluation_from_tarball(buffer.getvalue())["conveyor"]["value"] == 0.9
    with pytest.raises(EvaluationError, match=r"no evaluation\.json"):
        evaluation_from_tarball(_empty_tarball())


def _empty_tarball() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz"):
        pass
    return buffer.getvalue()


def test_the_dataset_folder_name_and_its_slug_name_the_same_model(runtime):
    for _ in range(2):
        runtime["sagemaker-runtime"].add_response(
            "invoke_endpoint",
            {"Body": body_of({"predictions": [{"value": 1.0}]}), "InvokedProductionVariant": "v"},
            {
                "EndpointName": "conveyor-my-churn-v2",
                "ContentType": "application/json",
                "Accept": "application/json",
                "Body": json.dumps({"instances": [{"a": 1}]}).encode(),
            },
        )
    assert request("/models/My_Churn.v2/predict", {"instances": [{"a": 1}]})[0] == 200
    assert request("/models/my-churn-v2/predict", {"instances": [{"a": 1}]})[0] == 200
    runtime["sagemaker-runtime"].assert_no_pending_responses()
    assert request("/models/__/predict", {"instances": [{"a": 1}]})[0] == 404


def test_no_request_or_model_payload_reaches_the_logs(runtime, caplog):
    """Requests carry customers' data: whatever the outcome, it never appears in the proxy's logs."""
    secret = "PAYLOAD-4711-do-not-log"
    instances = {"instances": [{"name": secret}]}
    runtime["sagemaker-runtime"].add_response(
        "invoke_endpoint",
        {
            "Body": body_of({"predictions": [{"label": secret}], "model_version": "v1"}),
            "ContentType": "application/json",
        },
    )
    for status, message in (
        (400, f"instance 0: column 'name' must be a number, got {secret!r}"),
        (500, f"cannot parse {secret}"),
    ):
        runtime["sagemaker-runtime"].add_client_error(
            "invoke_endpoint",
            service_error_code="ModelError",
            service_message="Received client error",
            http_status_code=424,
            modeled_fields={"OriginalStatusCode": status, "OriginalMessage": message},
        )
    assert [request("/models/churn/predict", instances)[0] for _ in range(3)] == [200, 400, 502]
    request("/models/churn/predict", f'{{"instances": [{{"name": "{secret}"')  # malformed JSON: 400
    # Every record with its structured keys, as the JSON formatter would write them.
    logged = caplog.text + "".join(str(record.__dict__) for record in caplog.records)
    assert "model failed" in logged
    assert secret not in logged
