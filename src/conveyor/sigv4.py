"""AWS Signature Version 4 for the HTTP API: signing (the CLI) and verification (local mode's gateway).

Both sides use botocore's ``SigV4Auth``, the signer every AWS SDK for Python uses, so a request signed
here is accepted by API Gateway's IAM authorization and a request from any SDK is accepted by local
mode. Verification mirrors what API Gateway checks and answers with API Gateway's status codes and
error messages, so a client sees the same failures locally as in the cloud.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import quote, unquote, urlsplit

import requests
from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.compat import HTTPHeaders
from botocore.credentials import Credentials

ALGORITHM = "AWS4-HMAC-SHA256"
DEFAULT_SERVICE = "execute-api"
MAX_SKEW_SECONDS = 300

SIGNATURE_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. Consult the service documentation for details."
)


class CredentialTuple(NamedTuple):
    """Plain AWS credentials, as read from a profile or the environment."""

    access_key: str
    secret_key: str
    token: str | None = None


CredentialsLike = CredentialTuple | tuple[str, str] | tuple[str, str, str | None] | Any


@dataclass(frozen=True)
class VerificationResult:
    """Outcome of checking a request's SigV4 signature.

    Attributes
    ----------
    ok : bool
        True when the signature is valid; the request may proceed.
    status : int
        200 when ``ok``; otherwise the HTTP status API Gateway answers with (401 or 403).
    message : str
        Empty when ``ok``; otherwise the ``{"message": ...}`` text API Gateway would return.
    error_type : str or None
        The ``x-amzn-ErrorType`` API Gateway would send, e.g. ``"InvalidSignatureException"``.
    access_key : str or None
        The access key id that signed the request (known once the header parses).
    security_token : str or None
        The ``x-amz-security-token`` of temporary credentials, when it was signed.
    """

    ok: bool
    status: int
    message: str = ""
    error_type: str | None = None
    access_key: str | None = None
    security_token: str | None = None

    def __bool__(self) -> bool:
        return self.ok


def sign_request(
    method: str,
    url: str,
    body: bytes | str | None,
    credentials: CredentialsLike,
    region: str,
    service: str = DEFAULT_SERVICE,
    headers: Mapping[str, str] | None = None,
    *,
    now: dt.datetime | None = None,
) -> dict[str, str]:
    """Sign a request for API Gateway IAM authorization.

    Parameters
    ----------
    method : str
        HTTP method, e.g. ``"POST"``.
    url : str
        The full URL, including any query string. It is put in the form ``requests`` sends on the
        wire (percent-encoding spaces and the like) before signing, so send it with ``requests``.
    body : bytes, str or None
        The exact payload that will be sent; ``str`` is encoded as UTF-8.
    credentials : tuple or botocore credentials
        ``(access_key, secret_key, token_or_None)`` or any object with ``access_key``,
        ``secret_key`` and ``token`` attributes (boto3's ``session.get_credentials()``).
    region : str
        Region of the API, part of the credential scope.
    service : str
        Signing name; ``"execute-api"`` for API Gateway.
    headers : mapping, optional
        Extra headers to send and sign, e.g. ``Content-Type``.
    now : datetime, optional
        Signing time (timezone-aware, or naive UTC); defaults to the current time.

    Returns
    -------
    dict
        The headers to send: ``headers`` plus ``X-Amz-Date``, ``Authorization`` and, for temporary
        credentials, ``X-Amz-Security-Token``. ``Host`` is signed but left for the HTTP client to set.
    """
    payload = body.encode("utf-8") if isinstance(body, str) else (body or b"")
    request = AWSRequest(method=method.upper(), url=_wire_url(url), data=payload, headers=dict(headers or {}))
    signer = _Signer(_as_credentials(credentials), service, region)
    signer.sign(request, _timestamp(now))
    return dict(request.headers.items())


class RequestsSigV4Auth(requests.auth.AuthBase):
    """``requests`` authentication that signs each prepared request with SigV4.

    Signing the prepared request signs exactly the URL and body that go on the wire.

    Parameters
    ----------
    credentials : tuple or botocore credentials
        As for :func:`sign_request`.
    region : str
        Region of the API.
    service : str
        Signing name; ``"execute-api"`` for API Gateway.
    """

    def __init__(self, credentials: CredentialsLike, region: str, service: str = DEFAULT_SERVICE):
        self.credentials = credentials
        self.region = region
        self.service = service

    def __call__(self, prepared: requests.PreparedRequest) -> requests.PreparedRequest:
        body = prepared.body
        if body is not None and not isinstance(body, bytes | str):
            raise TypeError("SigV4 signing needs the whole body; streaming bodies are not supported")
        extra = {
            name: value if isinstance(value, str) else value.decode("latin-1")
            for name, value in prepared.headers.items()
            if name.lower() == "content-type"
        }
        prepared.headers.update(
            sign_request(
                prepared.method or "GET",
                prepared.url or "",
                body,
                self.credentials,
                self.region,
                self.service,
                extra,
            )
        )
        return prepared


def verify_request(
    method: str,
    path_with_query: str,
    headers: Mapping[str, str] | Any,
    body: bytes,
    lookup_secret: Callable[[str], str | None],
    region: str,
    service: str = DEFAULT_SERVICE,
    now: dt.datetime | None = None,
    max_skew_seconds: int = MAX_SKEW_SECONDS,
) -> VerificationResult:
    """Check a received request's SigV4 signature the way API Gateway IAM authorization does.

    Parameters
    ----------
    method : str
        HTTP method as received.
    path_with_query : str
        The request target exactly as received (still percent-encoded), e.g.
        ``"/models/my%20model/predict?verbose=1"``.
    headers : mapping
        Received headers. Any object whose ``items()`` yields ``(name, value)`` pairs works,
        including ``http.server``'s message object, which keeps repeated headers.
    body : bytes
        The received payload.
    lookup_secret : callable
        Maps an access key id to its secret access key, or ``None`` when the key is unknown.
    region : str
        Region the API lives in; the credential scope must name it.
    service : str
        Signing name the credential scope must name.
    now : datetime, optional
        Current time (timezone-aware, or naive UTC), for tests; defaults to the clock.
    max_skew_seconds : int
        How far ``X-Amz-Date`` may be from ``now``; API Gateway allows 5 minutes.

    Returns
    -------
    VerificationResult
        ``ok`` with the access key, or the status (401 when no credentials were presented, 403
        otherwise), error type and message API Gateway would answer with.
    """
    received = _HeaderView(headers)
    authorization = received.get("authorization")
    if authorization is None:
        return _fail(401, "MissingAuthenticationTokenException", "Missing Authentication Token")

    parsed = _parse_authorization(authorization)
    if isinstance(parsed, VerificationResult):
        return parsed
    access_key, scope_date, scope_region, scope_service, signed_headers, signature = parsed

    def fail(message: str, error_type: str = "InvalidSignatureException") -> VerificationResult:
        return _fail(403, error_type, message, access_key)

    if scope_region != region:
        return fail(f"Credential should be scoped to a valid region, not '{scope_region}'. ")
    if scope_service != service:
        return fail(f"Credential should be scoped to correct service: '{service}'. ")
    if "host" not in signed_headers:
        return fail("'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.")
    if "x-amz-date" not in signed_headers:
        return fail(
            "Authorization header requires existence of a 'X-Amz-Date' header, and it must be a "
            "'SignedHeader'.",
            "IncompleteSignatureException",
        )
    missing = [name for name in signed_headers if received.get(name) is None]
    if missing:
        return fail(
            f"The request lists {', '.join(missing)} in SignedHeaders but does not carry "
            f"{'it' if len(missing) == 1 else 'them'}.",
            "IncompleteSignatureException",
        )

    amz_date = received.get("x-amz-date") or ""
    try:
        signed_at = dt.datetime.strptime(amz_date, SIGV4_TIMESTAMP).replace(tzinfo=dt.UTC)
    except ValueError:
        return fail(
            f"X-Amz-Date '{amz_date}' is not in the ISO 8601 basic format YYYYMMDD'T'HHMMSS'Z'.",
            "IncompleteSignatureException",
        )
    if scope_date != amz_date[:8]:
        return fail(
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: "
            f"'{scope_date}' != '{amz_date[:8]}', from '{amz_date}'."
        )
    current = _aware(now) if now is not None else dt.datetime.now(dt.UTC)
    skew = dt.timedelta(seconds=max_skew_seconds)
    if signed_at < current - skew:
        return fail(
            f"Signature expired: {amz_date} is now earlier than {_basic(current - skew)} "
            f"({_basic(current)} - {max_skew_seconds // 60} min.)"
        )
    if signed_at > current + skew:
        return fail(
            f"Signature not yet current: {amz_date} is still later than {_basic(current + skew)} "
            f"({_basic(current)} + {max_skew_seconds // 60} min.)"
        )

    secret = lookup_secret(access_key)
    if secret is None:
        return fail("The security token included in the request is invalid.", "UnrecognizedClientException")

    claimed_hash = received.get("x-amz-content-sha256")
    if claimed_hash is not None and claimed_hash != hashlib.sha256(body).hexdigest():
        return fail("The provided 'x-amz-content-sha256' header does not match what was computed.")

    # The URL only feeds the canonical path and query; the scheme keeps botocore hashing the body.
    request = AWSRequest(
        method=method.upper(), url=f"https://{received.get('host')}{path_with_query}", data=body
    )
    for name, values in received.items():
        for value in values:
            request.headers[name] = value
    signer = _Signer(Credentials(access_key, secret), service, region, signed_headers=signed_headers)
    expected = signer.signature_for(request, amz_date)
    if not hmac.compare_digest(expected.encode("ascii"), signature.lower().encode("ascii")):
        return fail(SIGNATURE_MISMATCH)

    token = received.get("x-amz-security-token") if "x-amz-security-token" in signed_headers else None
    return VerificationResult(ok=True, status=200, access_key=access_key, security_token=token)


class _Signer(SigV4Auth):
    """botocore's SigV4 with the clock, the signed header set and query canonicalisation pinned.

    ``SigV4Auth.add_auth`` reads the wall clock and signs every header it finds; a verifier must
    instead sign exactly the client's ``SignedHeaders`` at the client's ``X-Amz-Date``.
    """

    def __init__(
        self,
        credentials: Credentials,
        service_name: str,
        region_name: str,
        signed_headers: Iterable[str] | None = None,
    ):
        super().__init__(credentials, service_name, region_name)
        self._signed_headers = list(signed_headers) if signed_headers is not None else None

    def headers_to_sign(self, request: AWSRequest) -> HTTPHeaders:
        if self._signed_headers is None:
            return super().headers_to_sign(request)
        selected = HTTPHeaders()
        for name in self._signed_headers:
            for value in request.headers.get_all(name) or ():
                selected[name] = value
        return selected

    def canonical_query_string(self, request: AWSRequest) -> str:
        # botocore canonicalises a URL's query as sent; SigV4 (and API Gateway) decode and re-encode
        # each name and value, so "a=b c" signed and "a=b%20c" sent still agree.
        pairs = []
        for piece in urlsplit(request.url).query.split("&"):
            if not piece:
                continue
            name, _, value = piece.partition("=")
            pairs.append((quote(unquote(name), safe="-_.~"), quote(unquote(value), safe="-_.~")))
        return "&".join(f"{name}={value}" for name, value in sorted(pairs))

    def signature_for(self, request: AWSRequest, timestamp: str) -> str:
        request.context["timestamp"] = timestamp
        canonical_request = self.canonical_request(request)
        return self.signature(self.string_to_sign(request, canonical_request), request)

    def sign(self, request: AWSRequest, timestamp: str) -> None:
        for name in ("Authorization", "X-Amz-Date", "X-Amz-Security-Token"):
            del request.headers[name]
        request.headers["X-Amz-Date"] = timestamp
        if self.credentials.token:
            request.headers["X-Amz-Security-Token"] = self.credentials.token
        signature = self.signature_for(request, timestamp)
        signed = self.signed_headers(self.headers_to_sign(request))
        request.headers["Authorization"] = (
            f"{ALGORITHM} Credential={self.scope(request)}, SignedHeaders={signed}, Signature={signature}"
        )


class _HeaderView:
    """Received headers by lower-cased name, keeping repeated headers in order."""

    def __init__(self, headers: Mapping[str, str] | Any):
        self._values: dict[str, list[str]] = {}
        for name, value in headers.items():
            self._values.setdefault(name.lower(), []).append(value)

    def get(self, name: str) -> str | None:
        values = self._values.get(name)
        return ",".join(values) if values else None

    def items(self) -> Iterable[tuple[str, list[str]]]:
        return self._values.items()


def _parse_authorization(
    authorization: str,
) -> tuple[str, str, str, str, list[str], str] | VerificationResult:
    algorithm, _, rest = authorization.strip().partition(" ")
    if algorithm != ALGORITHM:
        return _fail(
            403,
            "IncompleteSignatureException",
            f"Authorization header requires the '{ALGORITHM}' algorithm, not '{algorithm}'.",
        )
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, _, value = part.strip().partition("=")
        if name:
            fields[name] = value.strip()
    missing = [name for name in ("Credential", "SignedHeaders", "Signature") if not fields.get(name)]
    if missing:
        return _fail(
            403,
            "IncompleteSignatureException",
            " ".join(f"Authorization header requires '{name}' parameter." for name in missing)
            + f" Authorization={authorization}",
        )
    scope = fields["Credential"].split("/")
    if len(scope) != 5 or scope[4] != "aws4_request" or not scope[0]:
        return _fail(
            403,
            "IncompleteSignatureException",
            "Credential must have the form <access key>/<YYYYMMDD>/<region>/<service>/aws4_request, "
            f"not '{fields['Credential']}'.",
        )
    access_key, scope_date, scope_region, scope_service, _ = scope
    signed_headers = [name.strip().lower() for name in fields["SignedHeaders"].split(";") if name.strip()]
    return access_key, scope_date, scope_region, scope_service, signed_headers, fields["Signature"]


def _fail(status: int, error_type: str, message: str, access_key: str | None = None) -> VerificationResult:
    return VerificationResult(
        ok=False, status=status, message=message, error_type=error_type, access_key=access_key
    )


def _as_credentials(credentials: CredentialsLike) -> Credentials:
    # Tuples include botocore's ReadOnlyCredentials (a namedtuple) and CredentialTuple.
    if not isinstance(credentials, tuple):
        return Credentials(
            credentials.access_key, credentials.secret_key, getattr(credentials, "token", None)
        )
    access_key, secret_key, *rest = credentials
    return Credentials(access_key, secret_key, rest[0] if rest else None)


def _wire_url(url: str) -> str:
    prepared = requests.PreparedRequest()
    prepared.prepare_url(url, None)
    return prepared.url or url


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)


def _basic(moment: dt.datetime) -> str:
    return moment.strftime(SIGV4_TIMESTAMP)


def _timestamp(now: dt.datetime | None) -> str:
    return _basic(_aware(now) if now is not None else dt.datetime.now(dt.UTC))
