"""A stand-in OpenID Connect issuer for the JWT authorizer tests (unit and integration): its discovery
document and key set, as https://<issuer>/.well-known/... would serve them, and tokens signed with its keys."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import requests
from cryptography.hazmat.primitives.asymmetric import rsa

ISSUER = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Example"
AUDIENCES = ("app-client-1", "app-client-2")


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class Issuer:
    """An OpenID Connect issuer's two documents, and tokens signed with its current key."""

    def __init__(self) -> None:
        self.keys = {"key-1": rsa_key()}
        self.fetched: list[str] = []

    def fetch(self, url: str) -> dict[str, Any]:
        self.fetched.append(url)
        if url == f"{ISSUER}/.well-known/openid-configuration":
            return {"issuer": ISSUER, "jwks_uri": f"{ISSUER}/.well-known/jwks.json"}
        if url == f"{ISSUER}/.well-known/jwks.json":
            keys = []
            for kid, key in self.keys.items():
                entry = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
                keys.append({**entry, "kid": kid, "use": "sig", "alg": "RS256"})
            return {"keys": keys}
        raise requests.HTTPError(f"404 for {url}")

    def token(self, kid: str = "key-1", key: Any = None, algorithm: str = "RS256", **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCES[0], "sub": "user-7", "iat": now, "exp": now + 300, **claims}
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, key or self.keys[kid], algorithm=algorithm, headers={"kid": kid})
