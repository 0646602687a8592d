"""App clients with JWTs (JwtIssuer set): AppApi serves the same routes behind a JWT authorizer, in front of
the same function and endpoints, while the IAM-authenticated API keeps working."""

from __future__ import annotations

import random
import time

import pytest
import requests
from jwt_issuer import AUDIENCES, ISSUER, Issuer
from local_stack import aws, signed_post, wait_for_execution

pytestmark = pytest.mark.integration
CLOUD_PARAMETERS = {"JwtIssuer": ISSUER, "JwtAudience": ",".join(AUDIENCES)}


def dataset(n=300, seed=3) -> bytes:
    rng = random.Random(seed)
    lines = ["size,label"] + [
        f"{rng.gauss(1.0 if (a := rng.random() < 0.5) else 2.0, 0.3):.3f},{'a' if a else 'b'}"
        for _ in range(n)
    ]
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="module")
def issuer(cloud):
    # The issuer's discovery document and keys, as https://<issuer>/.well-known/... would serve them.
    issuer = Issuer()
    cloud.app_gateway.jwt_authorizer.fetch = issuer.fetch
    return issuer


def test_an_app_client_with_a_token_predicts_and_one_without_never_reaches_the_model(cloud, issuer):
    outputs = cloud.outputs
    assert outputs["AppApiUrl"] != outputs["ApiUrl"]
    s3, sfn = aws(outputs, "s3"), aws(outputs, "stepfunctions")
    s3.put_object(Bucket=outputs["RawBucketName"], Key="datasets/sizes/data.csv", Body=dataset())
    execution = wait_for_execution(sfn, outputs["StateMachineArn"], "sizes-")
    assert execution["status"] == "SUCCEEDED", execution.get("cause")

    url, body = f"{outputs['AppApiUrl']}/models/sizes/predict", {"instances": [{"size": 1.0}, {"size": 2.1}]}
    answer = requests.post(
        url,
        json=body,
        headers={"Authorization": f"Bearer {issuer.token()}"},
        verify=outputs["CaBundle"],
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert [p["label"] for p in answer.json()["predictions"]] == ["a", "b"]
    listed = requests.get(
        f"{outputs['AppApiUrl']}/models",
        headers={"Authorization": issuer.token()},
        verify=outputs["CaBundle"],
        timeout=60,
    )
    assert listed.status_code == 200 and "sizes" in listed.text

    invocations_before = invocations(cloud)
    expired = issuer.token(exp=int(time.time()) - 5, iat=int(time.time()) - 600)
    for headers in (
        {},
        {"Authorization": f"Bearer {expired}"},
        {"Authorization": f"Bearer {issuer.token(aud='other')}"},
    ):
        refused = requests.post(url, json=body, headers=headers, verify=outputs["CaBundle"], timeout=60)
        assert refused.status_code == 401 and refused.json() == {"message": "Unauthorized"}
    # A SigV4 signature means nothing to the JWT API, and a JWT nothing to the IAM one.
    assert invocations(cloud) == invocations_before
    assert signed_post(outputs, "/models/sizes/predict", body).status_code == 200
    bearer_on_iam = requests.post(
        f"{outputs['ApiUrl']}/models/sizes/predict",
        json=body,
        headers={"Authorization": f"Bearer {issuer.token()}"},
        verify=outputs["CaBundle"],
        timeout=60,
    )
    assert bearer_on_iam.status_code == 403


def invocations(cloud) -> int:
    """How many requests the model server behind the sizes endpoint has answered."""
    server = cloud.hosting.serving("conveyor-sizes")
    return len(server.latencies_us) + server.errors_5xx
