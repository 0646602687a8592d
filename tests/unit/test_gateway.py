"""Local mode's HTTP API: TLS, SigV4 (IAM auth) and the Lambda proxy payload format 2.0.

The event fixture ``http_api_v2_example.json`` is AWS's documented payload format 2.0 example
(Amazon API Gateway Developer Guide, "Working with AWS Lambda proxy integrations for HTTP APIs",
awsdocs/amazon-api-gateway-developer-guide, doc_source/http-api-develop-integrations-lambda.md).
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import socket
import ssl
import stat
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from cryptography import x509

from conveyor.local.gateway import HttpApiGateway, Route
from conveyor.local.tls import make_certificates
from conveyor.sigv4 import RequestsSigV4Auth, sign_request, verify_request

REGION = "us-east-1"
ACCESS_KEY = "AKIDEXAMPLELOCAL"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
CREDENTIALS = (ACCESS_KEY, SECRET_KEY, None)
ROUTES = [
    ("POST", "/models/{name}/predict", "POST /models/{name}/predict"),
    ("GET", "/models", "GET /models"),
    Route("GET", "/models/{name}"),
]


class Integration:
    """Stands in for the Lambda proxy: records events and answers what the test asks."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.respond: Callable[[dict[str, Any]], Any] = lambda event: {"ok": True}

    def __call__(self, event: dict[str, Any]) -> Any:
        self.events.append(event)
        return self.respond(event)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory):
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def running(certificates) -> Iterator[tuple[HttpApiGateway, Integration]]:
    _, cert, key = certificates
    integration = Integration()
    gateway = HttpApiGateway(
        host="127.0.0.1",
        port=0,
        certfile=cert,
        keyfile=key,
        region=REGION,
        lookup_secret=lambda key_id: SECRET_KEY if key_id == ACCESS_KEY else None,
        routes=ROUTES,
        invoke=integration,
    )
    with gateway:
        yield gateway, integration


@pytest.fixture
def gateway(running) -> HttpApiGateway:
    return running[0]


@pytest.fixture
def integration(running) -> Integration:
    running[1].events.clear()
    running[1].respond = lambda event: {"ok": True}
    return running[1]


@pytest.fixture
def ca_bundle(certificates) -> str:
    return str(certificates[0])


def signed(
    method: str,
    url: str,
    body: bytes = b"",
    *,
    credentials: tuple[str, str, str | None] = CREDENTIALS,
    headers: dict[str, str] | None = None,
    now: dt.datetime | None = None,
) -> dict[str, str]:
    return sign_request(method, url, body, credentials, REGION, headers=headers, now=now)


def test_signed_post_reaches_the_integration_as_a_v2_event(gateway, integration, ca_bundle, event_fixture):
    integration.respond = lambda event: {
        "statusCode": 201,
        "headers": {"Content-Type": "application/json", "X-Model-Version": "v7"},
        "cookies": ["session=abc; Secure"],
        "body": json.dumps({"predictions": [1], "model_version": "v7"}),
        "isBase64Encoded": False,
    }
    url = f"{gateway.url}/models/churn/predict?explain=true"
    body = json.dumps({"instances": [[1, 2]]}).encode()
    headers = signed("POST", url, body, headers={"Content-Type": "application/json"})
    headers["Cookie"] = "a=1; b=2"

    response = requests.post(url, data=body, headers=headers, verify=ca_bundle, timeout=5)

    assert response.status_code == 201
    assert response.json() == {"predictions": [1], "model_version": "v7"}
    assert response.headers["X-Model-Version"] == "v7"
    assert response.headers["Set-Cookie"] == "session=abc; Secure"
    [event] = integration.events
    assert response.headers["apigw-requestid"] == event["requestContext"]["requestId"]
    assert response.headers["x-amzn-RequestId"] == event["requestContext"]["requestId"]

    example = event_fixture("http_api_v2_example.json")
    # stageVariables appear only when the stage defines some; authentication only with mutual TLS.
    assert set(event) == set(example) - {"stageVariables"}
    assert set(event["requestContext"]) == set(example["requestContext"]) - {"authentication"}
    assert set(event["requestContext"]["http"]) == set(example["requestContext"]["http"])
    assert set(event["requestContext"]["authorizer"]["iam"]) == {
        "accessKey",
        "accountId",
        "callerId",
        "cognitoIdentity",
        "principalOrgId",
        "userArn",
        "userId",
    }
    assert event["version"] == "2.0"
    assert event["routeKey"] == event["requestContext"]["routeKey"] == "POST /models/{name}/predict"
    assert event["rawPath"] == "/models/churn/predict"
    assert event["rawQueryString"] == "explain=true"
    assert event["queryStringParameters"] == {"explain": "true"}
    assert event["pathParameters"] == {"name": "churn"}
    assert event["cookies"] == ["a=1", "b=2"]
    assert json.loads(event["body"]) == {"instances": [[1, 2]]}
    assert event["isBase64Encoded"] is False
    assert all(name == name.lower() for name in event["headers"])
    assert "cookie" not in event["headers"]
    assert event["headers"]["content-type"] == "application/json"
    context = event["requestContext"]
    assert context["stage"] == "$default"
    assert context["http"]["method"] == "POST"
    assert context["http"]["sourceIp"] == "127.0.0.1"
    assert context["authorizer"]["iam"]["accessKey"] == ACCESS_KEY
    assert context["authorizer"]["iam"]["accountId"] == context["accountId"]
    received = dt.datetime.strptime(context["time"], "%d/%b/%Y:%H:%M:%S %z")
    assert abs(received.timestamp() * 1000 - context["timeEpoch"]) < 1000


def test_a_client_without_the_ca_bundle_rejects_the_certificate(gateway, integration):
    url = f"{gateway.url}/models"
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(url, headers=signed("GET", url), verify=True, timeout=5)
    assert integration.events == []


def test_the_certificate_covers_localhost(gateway, integration, ca_bundle):
    url = f"https://localhost:{gateway.port}/models"
    response = requests.get(url, headers=signed("GET", url), verify=ca_bundle, timeout=5)
    assert response.status_code == 200


def test_unsigned_request_is_401_and_never_invoked(gateway, integration, ca_bundle):
    response = requests.post(f"{gateway.url}/models/churn/predict", data=b"{}", verify=ca_bundle, timeout=5)
    assert response.status_code == 401
    assert response.json() == {"message": "Missing Authentication Token"}
    assert integration.events == []


def test_wrong_secret_is_403_and_never_invoked(gateway, integration, ca_bundle):
    url = f"{gateway.url}/models/churn/predict"
    headers = signed("POST", url, b"{}", credentials=(ACCESS_KEY, "not-the-secret", None))
    response = requests.post(url, data=b"{}", headers=headers, verify=ca_bundle, timeout=5)
    assert response.status_code == 403
    assert response.json()["message"].startswith("The request signature we calculated does not match")
    assert response.headers["x-amzn-ErrorType"] == "InvalidSignatureException"
    assert integration.events == []


def test_unknown_access_key_is_403(gateway, integration, ca_bundle):
    url = f"{gateway.url}/models"
    headers = signed("GET", url, credentials=("AKIDUNKNOWN", SECRET_KEY, None))
    response = requests.get(url, headers=headers, verify=ca_bundle, timeout=5)
    assert response.status_code == 403
    assert response.json() == {"message": "The security token included in the request is invalid."}
    assert integration.events == []


def test_body_changed_after_signing_is_403(gateway, integration, ca_bundle):
    url = f"{gateway.url}/models/churn/predict"
    headers = signed("POST", url, b'{"instances": [[1]]}')
    response = requests.post(url, data=b'{"instances": [[2]]}', headers=headers, verify=ca_bundle, timeout=5)
    assert response.status_code == 403
    assert integration.events == []


def test_signature_older_than_five_minutes_is_403(gateway, integration, ca_bundle):
    url = f"{gateway.url}/models"
    stale = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=6)
    response = requests.get(url, headers=signed("GET", url, now=stale), verify=ca_bundle, timeout=5)
    assert response.status_code == 403
    assert response.json()["message"].startswith("Signature expired")
    assert integration.events == []


def test_unknown_route_and_wrong_method_are_404(gateway, integration, ca_bundle):
    for method, path in (("GET", "/nowhere"), ("DELETE", "/models/churn"), ("GET", "/models/churn/predict")):
        url = f"{gateway.url}{path}"
        response = requests.request(method, url, headers=signed(method, url), verify=ca_bundle, timeout=5)
        assert response.status_code == 404, (method, path)
        assert response.json() == {"message": "Not Found"}
    assert integration.events == []


def test_body_over_10_mb_is_413_without_being_read(gateway, integration, ca_bundle):
    context = ssl.create_default_context(cafile=ca_bundle)
    connection = http.client.HTTPSConnection("127.0.0.1", gateway.port, context=context, timeout=5)
    try:
        # Headers only: the gateway must answer from Content-Length alone.
        connection.putrequest("POST", "/models/churn/predict")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(10 * 1024 * 1024 + 1))
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 413
        assert json.loads(response.read()) == {"message": "Request Entity Too Large"}
    finally:
        connection.close()
    assert integration.events == []


def test_signed_get_with_encoded_path_and_query_string(gateway, integration, ca_bundle):
    integration.respond = lambda event: {"name": event["pathParameters"]["name"], "status": "InService"}
    url = f"{gateway.url}/models/my%20model?verbose=1&tag=a&tag=b%2Fc"

    response = requests.get(url, headers=signed("GET", url), verify=ca_bundle, timeout=5)

    # A result without statusCode is API Gateway's shortcut for a 200 JSON body.
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"name": "my model", "status": "InService"}
    [event] = integration.events
    assert event["routeKey"] == "GET /models/{name}"
    assert event["pathParameters"] == {"name": "my model"}
    assert event["rawPath"] == "/models/my model"
    assert event["rawQueryString"] == "verbose=1&tag=a&tag=b%2Fc"
    assert event["queryStringParameters"] == {"verbose": "1", "tag": "a,b/c"}
    assert "body" not in event


def test_requests_auth_signs_what_goes_on_the_wire(gateway, integration, ca_bundle):
    auth = RequestsSigV4Auth(CREDENTIALS, REGION)
    response = requests.get(
        f"{gateway.url}/models/a b", params={"q": "x y"}, auth=auth, verify=ca_bundle, timeout=5
    )
    assert response.status_code == 200
    assert integration.events[0]["pathParameters"] == {"name": "a b"}


def test_the_most_specific_route_wins(certificates, ca_bundle):
    _, cert, key = certificates
    events: list[dict[str, Any]] = []
    routes = [("GET", "/models/{proxy+}"), ("GET", "/models/{name}"), ("GET", "/models/latest")]
    with HttpApiGateway(
        "127.0.0.1", 0, cert, key, REGION, lambda k: SECRET_KEY, routes, events.append
    ) as api:
        for path in ("/models/latest", "/models/churn", "/models/churn/v1"):
            url = f"{api.url}{path}"
            assert requests.get(url, headers=signed("GET", url), verify=ca_bundle, timeout=5).ok
    assert [event["routeKey"] for event in events] == [
        "GET /models/latest",
        "GET /models/{name}",
        "GET /models/{proxy+}",
    ]
    assert events[2]["pathParameters"] == {"proxy": "churn/v1"}


def test_integration_failure_is_500(gateway, integration, ca_bundle):
    def explode(event):
        raise RuntimeError("boom")

    integration.respond = explode
    url = f"{gateway.url}/models"
    response = requests.get(url, headers=signed("GET", url), verify=ca_bundle, timeout=5)
    assert response.status_code == 500
    assert response.json() == {"message": "Internal Server Error"}


def test_binary_bodies_travel_base64_both_ways(gateway, integration, ca_bundle):
    integration.respond = lambda event: {
        "statusCode": 200,
        "headers": {"Content-Type": "application/octet-stream"},
        "body": event["body"],
        "isBase64Encoded": True,
    }
    url = f"{gateway.url}/models/churn/predict"
    body = bytes(range(256))
    headers = signed("POST", url, body, headers={"Content-Type": "application/octet-stream"})
    response = requests.post(url, data=body, headers=headers, verify=ca_bundle, timeout=5)
    assert response.status_code == 200
    assert response.content == body
    assert integration.events[0]["isBase64Encoded"] is True


def test_temporary_credentials_are_signed_and_accepted(gateway, integration, ca_bundle):
    url = f"{gateway.url}/models"
    headers = signed("GET", url, credentials=(ACCESS_KEY, SECRET_KEY, "session-token"))
    assert headers["X-Amz-Security-Token"] == "session-token"
    assert "x-amz-security-token" in headers["Authorization"]
    response = requests.get(url, headers=headers, verify=ca_bundle, timeout=5)
    assert response.status_code == 200


def test_stop_closes_the_port(certificates):
    _, cert, key = certificates
    gateway = HttpApiGateway("127.0.0.1", 0, cert, key, REGION, lambda key_id: None, [], lambda e: {})
    gateway.start()
    port = gateway.port
    gateway.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


# SigV4 verification on its own: the cases the gateway tests do not reach.
def _verify(method: str, url: str, headers: dict[str, str], body: bytes = b"", **kwargs: Any):
    target = url.split("://", 1)[1]
    host, _, path = target.partition("/")
    received = {"Host": host, **headers}
    return verify_request(
        method, "/" + path, received, body, lambda key_id: SECRET_KEY, kwargs.pop("region", REGION), **kwargs
    )


def test_aws_sigv4_test_suite_get_vanilla_signs_and_verifies():
    # AWS's published SigV4 test suite, case "get-vanilla": an independent check of both directions.
    secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
    when = dt.datetime(2015, 8, 30, 12, 36, tzinfo=dt.UTC)
    expected = (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        "SignedHeaders=host;x-amz-date, "
        "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
    )
    headers = sign_request(
        "GET",
        "https://example.amazonaws.com/",
        b"",
        ("AKIDEXAMPLE", secret),
        "us-east-1",
        "service",
        now=when,
    )
    assert headers["Authorization"] == expected
    received = {"Host": "example.amazonaws.com", "X-Amz-Date": "20150830T123600Z", "Authorization": expected}
    result = verify_request(
        "GET", "/", received, b"", lambda key_id: secret, "us-east-1", "service", now=when
    )
    assert result.ok, result.message


def test_verify_accepts_what_botocore_itself_signs():
    url = "https://api.example.com/models/my%20model/predict?b=2&a=1"
    request = AWSRequest(method="POST", url=url, data=b"{}", headers={"Content-Type": "application/json"})
    SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "execute-api", REGION).add_auth(request)
    result = _verify("POST", url, dict(request.headers.items()), b"{}")
    assert result.ok, result.message


def test_verify_accepts_a_percent_encoded_path_and_query():
    url = "https://api.example.com/models/my%20model/predict?b=2&a=1&a=0"
    result = _verify("POST", url, signed("POST", url, b"{}"), b"{}")
    assert result.ok, result.message
    assert result.access_key == ACCESS_KEY


def test_verify_rejects_a_changed_query_string():
    url = "https://api.example.com/models?limit=1"
    headers = signed("GET", url)
    assert not _verify("GET", "https://api.example.com/models?limit=2", headers).ok


def test_verify_rejects_another_region_in_the_scope():
    url = "https://api.example.com/models"
    result = _verify("GET", url, signed("GET", url), region="eu-west-1")
    assert result.status == 403
    assert "region" in result.message


def test_verify_rejects_a_payload_hash_that_does_not_match_the_body():
    url = "https://api.example.com/models/x/predict"
    headers = signed("POST", url, b"{}", headers={"X-Amz-Content-SHA256": "0" * 64})
    assert _verify("POST", url, headers, b"{}").status == 403


def test_verify_requires_host_to_be_signed():
    url = "https://api.example.com/models"
    headers = signed("GET", url)
    headers["Authorization"] = headers["Authorization"].replace("SignedHeaders=host;", "SignedHeaders=")
    result = _verify("GET", url, headers)
    assert result.status == 403
    assert "Host" in result.message


def test_verify_rejects_a_malformed_authorization_header():
    result = _verify("GET", "https://api.example.com/models", {"Authorization": "AWS4-HMAC-SHA256 nonsense"})
    assert result.status == 403
    assert result.error_type == "IncompleteSignatureException"


# Certificates.
def test_certificates_are_reused_and_the_key_is_private(tmp_path):
    ca_path, cert_path, key_path = make_certificates(tmp_path)
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    first = cert_path.read_bytes()
    assert make_certificates(tmp_path) == (ca_path, cert_path, key_path)
    assert cert_path.read_bytes() == first

    cert = x509.load_pem_x509_certificate(first)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} >= {"127.0.0.1", "::1"}
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca)
    remaining = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=29) < remaining <= dt.timedelta(days=30)


def test_certificates_are_regenerated_for_new_hosts_or_a_lost_key(tmp_path):
    _, cert_path, key_path = make_certificates(tmp_path)
    first = cert_path.read_bytes()
    key_path.unlink()
    make_certificates(tmp_path)
    second = cert_path.read_bytes()
    assert second != first
    make_certificates(tmp_path, hosts=("localhost", "127.0.0.1", "conveyor.test"))
    assert cert_path.read_bytes() != second
