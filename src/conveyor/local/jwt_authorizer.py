"""A local stand-in for an HTTP API's JWT authorizer (template.yaml's AppApi, when JwtIssuer is set).

It checks what API Gateway checks (its "Validating JWTs" steps) before a request reaches the integration:

1. the token, from the ``Authorization`` header (``Bearer`` prefix optional), is a JWT signed with an RSA
   algorithm by a key of the issuer's JWKS: ``<issuer>/.well-known/openid-configuration`` names its
   ``jwks_uri``; a ``kid`` not in the cached set fetches it again (at most every ``refetch_seconds``), as a
   key rotation would need;
2. ``exp`` is in the future, ``nbf`` and ``iat`` (when present) in the past;
3. ``iss`` is the configured issuer;
4. ``aud``, or ``client_id`` for an access token without ``aud``, is one of the configured audiences.

Any failure is ``401 {"message": "Unauthorized"}`` with a ``www-authenticate`` header saying why, and the
integration never runs. The claims reach the Lambda as ``requestContext.authorizer.jwt.claims``, every value
a string, as API Gateway passes them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
import requests

RSA_ALGORITHMS = ("RS256", "RS384", "RS512")


def fetch_json(url: str) -> dict[str, Any]:
    """GET a JSON document over HTTPS (the issuer's discovery document and key set)."""
    response = requests.get(url, timeout=10)
    response.raise_for_status()
    document: dict[str, Any] = response.json()
    return document


@dataclass(frozen=True)
class JwtVerdict:
    """The authorizer's answer: the claims of a valid token, or why it was refused."""

    claims: dict[str, str] | None = None
    scopes: list[str] | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.claims is not None

    @property
    def challenge(self) -> str:
        """The ``www-authenticate`` header API Gateway sends with a 401."""
        return f'Bearer scope="" error="invalid_token" error_description="{self.reason}"'


@dataclass
class JwtAuthorizer:
    """Verifies bearer tokens against one issuer and its audiences, as AppApi's authorizer does."""

    issuer: str
    audiences: tuple[str, ...]
    fetch: Callable[[str], dict[str, Any]] = fetch_json
    clock: Callable[[], float] = time.time
    # A token naming an unknown kid fetches the key set again, but not more often than this: a client sending
    # made-up kids must not make every request wait on the issuer.
    refetch_seconds: float = 30.0
    _keys: dict[str, Any] = field(default_factory=dict, repr=False)
    _fetched_at: float | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def of(cls, issuer: str, audiences: Iterable[str], **kwargs: Any) -> JwtAuthorizer:
        return cls(issuer=issuer, audiences=tuple(a for a in audiences if a), **kwargs)

    def verify(self, headers: Mapping[str, str]) -> JwtVerdict:
        authorization = next((v for k, v in headers.items() if k.lower() == "authorization"), "").strip()
        if not authorization:
            return JwtVerdict(reason="the Authorization header is missing")
        token = (
            authorization[len("bearer ") :].strip()
            if authorization.lower().startswith("bearer ")
            else authorization
        )
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return JwtVerdict(reason="the token is not a JWT")
        algorithm = header.get("alg", "")
        if algorithm not in RSA_ALGORITHMS:
            return JwtVerdict(reason=f"signing method {algorithm or 'none'} is invalid")
        try:
            key = self._key(str(header.get("kid", "")))
        except (
            requests.RequestException,
            ValueError,
            KeyError,
            TypeError,
            jwt.PyJWTError,
            jwt.PyJWKError,
        ) as error:
            return JwtVerdict(reason=f"the issuer's keys could not be read: {error}")
        if key is None:
            return JwtVerdict(reason="the token's kid is not in the issuer's keys")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=self.issuer,
                options={"require": ["exp"], "verify_aud": False, "verify_iat": True},
                leeway=0,
            )
        except jwt.ExpiredSignatureError:
            return JwtVerdict(reason="the token has expired")
        except jwt.ImmatureSignatureError:
            return JwtVerdict(reason="the token is not valid yet")
        except jwt.InvalidIssuerError:
            return JwtVerdict(reason="the token's issuer is not the configured issuer")
        except jwt.PyJWTError as error:
            return JwtVerdict(reason=f"the token is invalid: {error}")
        audience = claims.get("aud", claims.get("client_id"))
        offered = audience if isinstance(audience, list) else [audience]
        if not {a for a in offered if isinstance(a, str)} & set(self.audiences):
            return JwtVerdict(reason="the token's audience is not one of the configured audiences")
        scope = claims.get("scope")
        return JwtVerdict(
            claims={name: _claim_text(value) for name, value in claims.items()},
            scopes=scope.split() if isinstance(scope, str) and scope else None,
        )

    def _key(self, kid: str) -> Any:
        with self._lock:
            stale = self._fetched_at is None or self.clock() - self._fetched_at >= self.refetch_seconds
            if kid not in self._keys and stale:
                self._fetched_at = self.clock()
                self._keys = self._fetch_keys()
            return self._keys.get(kid)

    def _fetch_keys(self) -> dict[str, Any]:
        discovery = self.fetch(self.issuer.rstrip("/") + "/.well-known/openid-configuration")
        keys = {}
        for entry in self.fetch(discovery["jwks_uri"]).get("keys", []):
            if entry.get("kty") == "RSA" and entry.get("use", "sig") == "sig":
                keys[str(entry.get("kid", ""))] = jwt.PyJWK(entry).key
        return keys


def _claim_text(value: Any) -> str:
    """A claim as API Gateway hands it to the integration: strings as they are, lists as "[a b]", other
    values as their JSON text."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "[" + " ".join(_claim_text(v) for v in value) + "]"
    return json.dumps(value)
