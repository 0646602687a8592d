"""AppApi's JWT authorizer in local mode: only a token the issuer signed, for a configured audience, still
valid, reaches the integration; everything else is 401 and never runs the model."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
import requests
from jwt_issuer import AUDIENCES, ISSUER, Issuer, rsa_key

from conveyor.local.gateway import HttpApiGateway
from conveyor.local.jwt_authorizer import JwtAuthorizer
from conveyor.local.tls import make_certificates

ROUTES = [
    ("POST", "/models/{name}/predict", "POST /models/{name}/predict"),
    ("GET", "/models", "GET /models"),
]


class Integration:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> Any:
        self.events.append(event)
        return {"statusCode": 200, "body": json.dumps({"predictions": []})}


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory):
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def api(certificates) -> Iterator[tuple[HttpApiGateway, Integration, Issuer, str]]:
    ca, cert, key = certificates
    issuer, integration = Issuer(), Integration()
    gateway = HttpApiGateway(
        host="127.0.0.1",
        port=0,
        certfile=cert,
        keyfile=key,
        region="us-east-1",
        lookup_secret=lambda _: None,
        routes=ROUTES,
        invoke=integration,
        jwt_authorizer=JwtAuthorizer.of(ISSUER, AUDIENCES, fetch=issuer.fetch),
    )
    with gateway:
        yield gateway, integration, issuer, str(ca)


def post(api, authorization: str | None) -> requests.Response:
    gateway, _, _, ca = api
    headers = {"Authorization": authorization} if authorization is not None else {}
    return requests.post(
        f"{gateway.url}/models/churn/predict",
        json={"instances": [{"x": 1}]},
        headers=headers,
        verify=ca,
        timeout=10,
    )


def test_a_valid_token_reaches_the_function_with_its_claims(api):
    _, integration, issuer, _ = api
    answer = post(api, f"Bearer {issuer.token(scope='predict read')}")
    assert answer.status_code == 200, answer.text
    (event,) = integration.events
    assert event["routeKey"] == "POST /models/{name}/predict" and event["pathParameters"] == {"name": "churn"}
    authorizer = event["requestContext"]["authorizer"]
    assert set(authorizer) == {"jwt"}
    claims = authorizer["jwt"]["claims"]
    # API Gateway hands every claim over as a string.
    assert claims["sub"] == "user-7" and claims["iss"] == ISSUER and claims["exp"].isdigit()
    assert authorizer["jwt"]["scopes"] == ["predict", "read"]


def test_the_bearer_prefix_is_optional_and_an_access_token_may_name_its_client_instead(api):
    _, integration, issuer, _ = api
    assert post(api, issuer.token()).status_code == 200
    access_token = issuer.token(aud=None, client_id=AUDIENCES[1], token_use="access")
    assert post(api, f"Bearer {access_token}").status_code == 200
    assert len(integration.events) == 2


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no header", "the Authorization header is missing"),
        ("not a JWT", "the token is not a JWT"),
        ("expired", "the token has expired"),
        ("not yet valid", "the token is not valid yet"),
        ("no expiry", "the token is invalid"),
        ("another issuer", "the token's issuer is not the configured issuer"),
        ("another audience", "the token's audience is not one of the configured audiences"),
        ("signed by a stranger", "the token is invalid: Signature verification failed"),
        ("unknown kid", "the token's kid is not in the issuer's keys"),
        ("HS256 with the public key", "signing method HS256 is invalid"),
        ("unsigned", "signing method none is invalid"),
    ],
)
def test_a_bad_token_is_401_and_never_reaches_the_function(api, case, reason):
    _, integration, issuer, _ = api
    now = int(time.time())
    tokens = {
        "no header": None,
        "not a JWT": "Bearer not.a.jwt",
        "expired": f"Bearer {issuer.token(exp=now - 1, iat=now - 600)}",
        "not yet valid": f"Bearer {issuer.token(nbf=now + 600)}",
        "no expiry": f"Bearer {issuer.token(exp=None)}",
        "another issuer": f"Bearer {issuer.token(iss='https://evil.example.com')}",
        "another audience": f"Bearer {issuer.token(aud='someone-else')}",
        "signed by a stranger": f"Bearer {issuer.token(key=rsa_key())}",
        "unknown kid": f"Bearer {issuer.token(kid='key-9', key=rsa_key())}",
        "HS256 with the public key": "Bearer "
        + jwt.encode({"iss": ISSUER, "aud": AUDIENCES[0], "exp": now + 60}, "secret", algorithm="HS256"),
        "unsigned": "Bearer "
        + jwt.encode({"iss": ISSUER, "aud": AUDIENCES[0], "exp": now + 60}, None, algorithm="none"),
    }
    answer = post(api, tokens[case])
    assert answer.status_code == 401
    assert answer.json() == {"message": "Unauthorized"}
    assert reason in answer.headers["www-authenticate"]
    assert integration.events == []


def test_a_rotated_key_is_fetched_when_a_token_names_it_but_made_up_kids_do_not_flood_the_issuer(api):
    gateway, integration, issuer, _ = api
    now = [1000.0]
    gateway.jwt_authorizer.clock = lambda: now[0]
    assert post(api, f"Bearer {issuer.token()}").status_code == 200
    fetches = len(issuer.fetched)
    # Unknown kids within refetch_seconds of the last fetch: refused without asking the issuer again.
    for _ in range(3):
        assert post(api, f"Bearer {issuer.token(kid='key-9', key=rsa_key())}").status_code == 401
    assert len(issuer.fetched) == fetches
    now[0] += 31
    issuer.keys["key-2"] = rsa_key()
    assert post(api, f"Bearer {issuer.token(kid='key-2')}").status_code == 200
    assert len(issuer.fetched) == fetches + 2  # discovery document and key set, once more
    assert post(api, f"Bearer {issuer.token(kid='key-2')}").status_code == 200
    assert len(issuer.fetched) == fetches + 2  # cached from then on
    assert len(integration.events) == 3


def test_a_malformed_key_set_or_audience_is_a_401_not_a_crash(api):
    gateway, integration, issuer, _ = api
    broken = JwtAuthorizer.of(
        ISSUER, AUDIENCES, fetch=lambda url: {"jwks_uri": "x", "keys": [{"kty": "RSA"}]}
    )
    gateway.jwt_authorizer = broken
    assert post(api, f"Bearer {issuer.token()}").status_code == 401
    gateway.jwt_authorizer = JwtAuthorizer.of(ISSUER, AUDIENCES, fetch=issuer.fetch)
    assert post(api, f"Bearer {issuer.token(aud={'not': 'a string'})}").status_code == 401
    assert integration.events == []


def test_an_issuer_that_cannot_be_reached_refuses_every_token(api):
    gateway, integration, issuer, _ = api
    gateway.jwt_authorizer = JwtAuthorizer.of(
        ISSUER, AUDIENCES, fetch=lambda url: issuer.fetch(url + "/gone")
    )
    answer = post(api, f"Bearer {issuer.token()}")
    assert (
        answer.status_code == 401
        and "the issuer's keys could not be read" in answer.headers["www-authenticate"]
    )
    assert integration.events == []
