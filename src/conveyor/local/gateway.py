"""A local stand-in for an API Gateway HTTP API: HTTPS, IAM (SigV4) or JWT auth, Lambda proxy payload 2.0.

What a client sees matches the deployed API closely enough that the CLI and tests run unchanged against
either: the same TLS + SigV4 handshake, the same 401/403/404/413/500 answers with ``{"message": ...}``
bodies, and the same ``apigw-requestid`` header. What the Lambda sees is the payload format 2.0 event
API Gateway builds, including ``requestContext.authorizer.iam``.

Behaviour chosen to match API Gateway HTTP APIs:

- the signature is checked before routing, and a failed check never reaches the integration;
- a request without an ``Authorization`` header gets ``401 {"message": "Missing Authentication
  Token"}``; any other authentication failure (malformed header, unknown key, wrong scope, clock skew
  over 5 minutes, unsigned ``host``/``x-amz-date``, bad signature) gets 403 with API Gateway's message;
- a request that matches no route, including a known path with another method, gets
  ``404 {"message": "Not Found"}`` (HTTP APIs do not answer 405); when several routes match, the
  most specific wins (literal segments over ``{variables}`` over ``{greedy+}``), as in API Gateway;
- ``rawPath``, ``requestContext.http.path`` and ``pathParameters`` are percent-decoded, as HTTP APIs
  deliver them (REST APIs and function URLs keep the encoding); ``rawQueryString`` is kept as sent;
- bodies over 10 MB get ``413`` before they are read.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import functools
import http.server
import json
import logging
import os
import re
import socket
import socketserver
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote

from conveyor.sigv4 import verify_request

if TYPE_CHECKING:
    from conveyor.local.jwt_authorizer import JwtAuthorizer

log = logging.getLogger("localcloud.gateway")

MAX_PAYLOAD_BYTES = 10 * 1024 * 1024
DEFAULT_ACCOUNT_ID = "123456789012"
HANDSHAKE_TIMEOUT_SECONDS = 10
# A client that stalls mid-request must not pin a worker thread for ever.
REQUEST_TIMEOUT_SECONDS = 60

NOT_FOUND = {"message": "Not Found"}
INTERNAL_ERROR = {"message": "Internal Server Error"}
TOO_LARGE = {"message": "Request Entity Too Large"}
UNAUTHORIZED = {"message": "Unauthorized"}
BAD_REQUEST = {"message": "Bad Request"}

# Media types API Gateway passes to the integration as text rather than base64.
_TEXT_SUBTYPES = ("json", "xml", "javascript", "yaml", "x-www-form-urlencoded", "graphql")


@dataclass(frozen=True)
class Route:
    """One HTTP API route: a method, a path template and the route key the event carries.

    Parameters
    ----------
    method : str
        HTTP method, or ``"ANY"``.
    path : str
        Template such as ``"/models/{name}/predict"``; ``{proxy+}`` as the last segment is greedy.
    route_key : str, optional
        Defaults to ``"<METHOD> <path>"``, as API Gateway writes it.
    """

    method: str
    path: str
    route_key: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", self.method.upper())
        if not self.route_key:
            object.__setattr__(self, "route_key", f"{self.method} {self.path}")

    def match(self, method: str, segments: Sequence[str]) -> dict[str, str] | None:
        """Path parameters when this route takes ``method`` on the decoded path ``segments``."""
        if self.method not in ("ANY", method):
            return None
        return _match_template(_compile_template(self.path), segments)


@dataclass(frozen=True)
class CallerIdentity:
    """Who signed a request, as ``requestContext.authorizer.iam`` reports it."""

    account_id: str
    user_id: str
    user_arn: str
    caller_id: str | None = None
    principal_org_id: str | None = None


RouteLike = Route | tuple[str, str] | tuple[str, str, str]


class HttpApiGateway:
    """An HTTPS server that authenticates like API Gateway IAM auth and invokes a Lambda proxy.

    Parameters
    ----------
    host : str
        Address to bind, e.g. ``"127.0.0.1"``.
    port : int
        Port to bind; 0 picks a free one (read it back from :attr:`port` or :attr:`url`).
    certfile, keyfile : path
        PEM server certificate and key, e.g. from :func:`conveyor.local.tls.make_certificates`.
    region : str
        Region the credential scope of every request must name.
    lookup_secret : callable
        Access key id → secret access key, or ``None`` for an unknown key.
    routes : iterable of Route or tuple
        ``Route`` objects or ``(method, path_template[, route_key])`` tuples.
    invoke : callable
        Receives the payload format 2.0 event and returns the Lambda's result (a dict, or any
        JSON value for the "no statusCode" shortcut). Exceptions become 500.
    account_id : str
        Account the API belongs to (``requestContext.accountId``).
    api_id : str
        ``requestContext.apiId``.
    lookup_identity : callable, optional
        Access key id → :class:`CallerIdentity` for ``authorizer.iam``. By default the key is
        reported as an IAM user of ``account_id`` named after the key.
    max_payload_bytes : int
        Largest request body accepted; API Gateway's limit is 10 MB.
    jwt_authorizer : JwtAuthorizer, optional
        Authenticate with bearer JWTs instead of SigV4 (an API whose routes have a JWT authorizer): a
        refused token is ``401 {"message": "Unauthorized"}``; the claims reach the integration as
        ``requestContext.authorizer.jwt``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        certfile: str | Path,
        keyfile: str | Path,
        region: str,
        lookup_secret: Callable[[str], str | None],
        routes: Iterable[RouteLike],
        invoke: Callable[[dict[str, Any]], Any],
        *,
        account_id: str = DEFAULT_ACCOUNT_ID,
        api_id: str = "local",
        lookup_identity: Callable[[str], CallerIdentity | None] | None = None,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
        jwt_authorizer: JwtAuthorizer | None = None,
    ) -> None:
        self.host = host
        self.region = region
        self.lookup_secret = lookup_secret
        # API Gateway picks the most specific matching route, whatever order routes were declared in.
        self.routes = sorted((_as_route(route) for route in routes), key=_specificity)
        self.invoke = invoke
        self.account_id = account_id
        self.api_id = api_id
        self.lookup_identity = lookup_identity
        self.max_payload_bytes = max_payload_bytes
        self.jwt_authorizer = jwt_authorizer

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(certfile=str(certfile), keyfile=str(keyfile))
        self._server = _TlsHttpServer((host, port), _Handler, context, self)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the one picked when constructed with port 0)."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL clients call, e.g. ``https://127.0.0.1:8443``."""
        host = self.host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"https://{host}:{self.port}"

    def start(self) -> HttpApiGateway:
        """Serve in a daemon thread; returns ``self`` so ``HttpApiGateway(...).start()`` reads well."""
        if self._thread is None:
            self._thread = threading.Thread(
                # A short poll keeps stop() quick; the loop costs nothing noticeable meanwhile.
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"http-api-gateway:{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting requests, close the socket and wait for the serving thread."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()
        self._server.close_connections()

    def __enter__(self) -> HttpApiGateway:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # What one request goes through; the handler only moves bytes.
    def _handle(self, request: _Request) -> _Response:
        """Authenticate, route, invoke and translate one request (the HTTP API's behaviour)."""
        if self.jwt_authorizer is not None:
            token = self.jwt_authorizer.verify(request.headers)
            if not token.ok:
                return _json_response(401, UNAUTHORIZED, {"www-authenticate": token.challenge})
            authorizer: dict[str, Any] = {"jwt": {"claims": token.claims, "scopes": token.scopes}}
        else:
            verdict = verify_request(
                request.method,
                request.target,
                request.headers,
                request.body,
                self.lookup_secret,
                self.region,
            )
            if not verdict.ok:
                return _json_response(
                    verdict.status,
                    {"message": verdict.message},
                    {"x-amzn-ErrorType": verdict.error_type or "ForbiddenException"},
                )
            assert verdict.access_key is not None
            authorizer = {"iam": self._iam_context(verdict.access_key)}

        raw_path, _, raw_query = request.target.partition("?")
        # Segments are decoded one by one so an encoded "/" stays inside its path parameter.
        segments = [unquote(segment) for segment in raw_path.split("/")[1:]]
        for route in self.routes:
            parameters = route.match(request.method, segments)
            if parameters is not None:
                break
        else:
            return _json_response(404, NOT_FOUND)

        event = self._build_event(request, route, parameters, raw_query, authorizer)
        try:
            result = self.invoke(event)
            return _from_lambda_result(result)
        except Exception:
            log.exception("integration failed for %s %s (request %s)", request.method, raw_path, request.id)
            return _json_response(500, INTERNAL_ERROR)

    def _build_event(
        self,
        request: _Request,
        route: Route,
        path_parameters: Mapping[str, str],
        raw_query: str,
        authorizer: dict[str, Any],
    ) -> dict[str, Any]:
        """The payload format 2.0 event API Gateway would send the integration for ``request``."""
        headers: dict[str, str] = {}
        cookies: list[str] = []
        for name, value in request.headers.items():
            name = name.lower()
            if name == "cookie":
                cookies.extend(part.strip() for part in value.split(";") if part.strip())
            else:
                headers[name] = f"{headers[name]},{value}" if name in headers else value
        host = headers.get("host", f"{self.host}:{self.port}")
        # API Gateway's load balancer adds these; handlers that log the caller look for them.
        headers.setdefault("x-forwarded-for", request.source_ip)
        headers.setdefault("x-forwarded-port", str(self.port))
        headers.setdefault("x-forwarded-proto", "https")
        headers.setdefault("x-amzn-trace-id", request.trace_id)
        headers["content-length"] = str(len(request.body))

        domain_name = _strip_port(host)
        path = unquote(request.target.partition("?")[0])
        event: dict[str, Any] = {
            "version": "2.0",
            "routeKey": route.route_key,
            "rawPath": path,
            "rawQueryString": raw_query,
        }
        if cookies:
            event["cookies"] = cookies
        event["headers"] = headers
        if raw_query:
            query: dict[str, str] = {}
            for name, value in parse_qsl(raw_query, keep_blank_values=True):
                query[name] = f"{query[name]},{value}" if name in query else value
            event["queryStringParameters"] = query
        event["requestContext"] = {
            "accountId": self.account_id,
            "apiId": self.api_id,
            "authorizer": authorizer,
            "domainName": domain_name,
            "domainPrefix": domain_name.split(".")[0],
            "http": {
                "method": request.method,
                "path": path,
                "protocol": request.protocol,
                "sourceIp": request.source_ip,
                "userAgent": headers.get("user-agent", ""),
            },
            "requestId": request.id,
            "routeKey": route.route_key,
            "stage": "$default",
            "time": request.received_at.strftime("%d/%b/%Y:%H:%M:%S +0000"),
            "timeEpoch": int(request.received_at.timestamp() * 1000),
        }
        if path_parameters:
            event["pathParameters"] = dict(path_parameters)
        if request.body:
            text = _as_text(request.body, headers.get("content-type", ""))
            event["body"] = text if text is not None else base64.b64encode(request.body).decode("ascii")
            event["isBase64Encoded"] = text is None
        else:
            event["isBase64Encoded"] = False
        return event

    def _iam_context(self, access_key: str) -> dict[str, Any]:
        """``requestContext.authorizer.iam`` for a request signed with ``access_key``."""
        identity = self._identity(access_key)
        return {
            "accessKey": access_key,
            "accountId": identity.account_id,
            "callerId": identity.caller_id or identity.user_id,
            "cognitoIdentity": None,
            "principalOrgId": identity.principal_org_id,
            "userArn": identity.user_arn,
            "userId": identity.user_id,
        }

    def _identity(self, access_key: str) -> CallerIdentity:
        if self.lookup_identity is not None:
            identity = self.lookup_identity(access_key)
            if identity is not None:
                return identity
        return CallerIdentity(
            account_id=self.account_id,
            user_id=access_key,
            user_arn=f"arn:aws:iam::{self.account_id}:user/{access_key}",
        )


@dataclass
class _Request:
    method: str
    target: str
    protocol: str
    headers: Any
    body: bytes
    source_ip: str
    id: str
    trace_id: str
    received_at: dt.datetime


@dataclass
class _Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


class _PayloadTooLarge(Exception):
    pass


class _TlsHttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[http.server.BaseHTTPRequestHandler],
        context: ssl.SSLContext,
        gateway: HttpApiGateway,
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.ssl_context = context
        self.gateway = gateway
        self._connections: set[ssl.SSLSocket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name with getfqdn, which can stall on machines
        # without reverse DNS; the name is never used.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs here, in the request's own thread, so a client that connects and
        # never speaks cannot block the accept loop.
        request.settimeout(HANDSHAKE_TIMEOUT_SECONDS)
        with self.ssl_context.wrap_socket(request, server_side=True) as tls:
            tls.settimeout(REQUEST_TIMEOUT_SECONDS)
            with self._connections_lock:
                self._connections.add(tls)
            try:
                super().finish_request(tls, client_address)
            finally:
                with self._connections_lock:
                    self._connections.discard(tls)

    def close_connections(self) -> None:
        """End kept-alive connections, which would otherwise outlive the server."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            # socket.shutdown on the raw socket, not SSLSocket.shutdown, which would tear down the
            # TLS state under the thread still reading from it; that thread just sees EOF.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(connection, socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that reject our certificate or hang up are routine, not server faults.
        log.debug("connection from %s ended abnormally", client_address[0], exc_info=True)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: with Nagle's algorithm a kept-alive client's next request
    # waits for a delayed ACK (about 40 ms) before the answer's body leaves.
    disable_nagle_algorithm = True
    server: _TlsHttpServer
    server_version = "conveyor-local-apigateway"
    sys_version = ""

    def _serve(self) -> None:
        started = time.perf_counter()
        gateway = self.server.gateway
        request_id = _request_id()
        try:
            body = self._read_body(gateway.max_payload_bytes)
        except _PayloadTooLarge:
            # The rest of the body is never read, so this connection cannot carry another request.
            self.close_connection = True
            response = _json_response(413, TOO_LARGE)
        except ValueError:
            self.close_connection = True
            response = _json_response(400, BAD_REQUEST)
        else:
            request = _Request(
                method=self.command,
                target=self.path,
                protocol=self.request_version,
                headers=self.headers,
                body=body,
                source_ip=self.client_address[0],
                id=request_id,
                trace_id=_trace_id(),
                received_at=dt.datetime.now(dt.UTC),
            )
            try:
                response = gateway._handle(request)
            except Exception:
                log.exception("gateway failed on %s %s", self.command, self.path)
                response = _json_response(500, INTERNAL_ERROR)
        self._send(response, request_id)
        log.info(
            "%s %s %d %.1fms",
            self.command,
            self.path.partition("?")[0],
            response.status,
            (time.perf_counter() - started) * 1000,
        )

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _serve

    def handle_expect_100(self) -> bool:
        # A client that asks before sending (curl does for large bodies) learns of the limit
        # without uploading anything.
        try:
            too_large = int(self.headers.get("Content-Length") or 0) > self.server.gateway.max_payload_bytes
        except ValueError:
            too_large = False
        if not too_large:
            return super().handle_expect_100()
        self.close_connection = True
        self._send(_json_response(413, TOO_LARGE), _request_id())
        log.info("%s %s %d %.1fms", self.command, self.path.partition("?")[0], 413, 0.0)
        return False

    def _read_body(self, limit: int) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._read_chunked(limit)
        declared = self.headers.get("Content-Length")
        if declared is None:
            return b""
        length = int(declared)
        if length < 0:
            raise ValueError(declared)
        if length > limit:
            raise _PayloadTooLarge
        return self.rfile.read(length)

    def _read_chunked(self, limit: int) -> bytes:
        chunks: list[bytes] = []
        size_so_far = 0
        while True:
            size = int(self.rfile.readline(1024).split(b";")[0].strip(), 16)
            if size == 0:
                # Trailers end with an empty line.
                while self.rfile.readline(1024).strip():
                    pass
                return b"".join(chunks)
            size_so_far += size
            if size_so_far > limit:
                raise _PayloadTooLarge
            chunks.append(self.rfile.read(size))
            self.rfile.readline(1024)

    def _send(self, response: _Response, request_id: str) -> None:
        self.send_response(response.status)
        names = {name.lower() for name, _ in response.headers}
        for name, value in response.headers:
            self.send_header(name, value)
        if "content-type" not in names and response.body:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("apigw-requestid", request_id)
        self.send_header("x-amzn-RequestId", request_id)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        # Access lines come from _serve; http.server's own chatter would go to stderr.
        log.debug("%s " + format, self.client_address[0], *args)


def _specificity(route: Route) -> tuple[tuple[int, ...], int]:
    rank = {"literal": 0, "variable": 1, "greedy": 2}
    return tuple(rank[kind] for kind, _ in _compile_template(route.path)), route.method == "ANY"


def _as_route(route: RouteLike) -> Route:
    if isinstance(route, Route):
        return route
    return Route(*route)


@functools.cache
def _compile_template(template: str) -> tuple[tuple[str, str], ...]:
    parts: list[tuple[str, str]] = []
    for segment in template.strip("/").split("/") if template.strip("/") else []:
        variable = re.fullmatch(r"\{([A-Za-z0-9_.-]+)(\+?)\}", segment)
        if variable is None:
            parts.append(("literal", segment))
        else:
            parts.append(("greedy" if variable.group(2) else "variable", variable.group(1)))
    return tuple(parts)


def _match_template(pattern: tuple[tuple[str, str], ...], segments: Sequence[str]) -> dict[str, str] | None:
    if segments == [""]:
        segments = []
    parameters: dict[str, str] = {}
    for index, (kind, value) in enumerate(pattern):
        if kind == "greedy":
            rest = segments[index:]
            if not rest or not rest[0]:
                return None
            parameters[value] = "/".join(rest)
            return parameters
        if index >= len(segments):
            return None
        segment = segments[index]
        if kind == "literal":
            if segment != value:
                return None
        elif not segment:
            return None
        else:
            parameters[value] = segment
    return parameters if len(segments) == len(pattern) else None


def _from_lambda_result(result: Any) -> _Response:
    """Turn what the Lambda returned into HTTP, following payload format 2.0's response rules."""
    if not (isinstance(result, dict) and "statusCode" in result):
        # Without a statusCode, API Gateway treats the whole result as a 200 JSON body.
        return _Response(200, [("Content-Type", "application/json")], json.dumps(result).encode())
    status = int(result["statusCode"])
    headers = [(str(name), str(value)) for name, value in (result.get("headers") or {}).items()]
    for name, values in (result.get("multiValueHeaders") or {}).items():
        headers.extend((str(name), str(value)) for value in values)
    headers.extend(("Set-Cookie", str(cookie)) for cookie in result.get("cookies") or [])
    body = result.get("body")
    if body is None:
        payload = b""
    elif result.get("isBase64Encoded"):
        try:
            payload = base64.b64decode(body, validate=True)
        except (binascii.Error, TypeError) as error:
            raise ValueError(
                "the integration returned isBase64Encoded with a body that is not base64"
            ) from error
    else:
        payload = (body if isinstance(body, str) else json.dumps(body)).encode("utf-8")
    return _Response(status, headers, payload)


def _json_response(status: int, document: Any, headers: Mapping[str, str] | None = None) -> _Response:
    return _Response(
        status,
        [("Content-Type", "application/json"), *(headers or {}).items()],
        json.dumps(document).encode(),
    )


def _as_text(body: bytes, content_type: str) -> str | None:
    media_type = content_type.split(";")[0].strip().lower()
    main, _, sub = media_type.partition("/")
    if main != "text" and not any(sub == kind or sub.endswith("+" + kind) for kind in _TEXT_SUBTYPES):
        return None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _strip_port(host: str) -> str:
    if host.startswith("[") and "]" in host:
        return host[1 : host.index("]")]
    # Exactly one colon is host:port; more is a bare IPv6 address.
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _request_id() -> str:
    # The shape of API Gateway HTTP API request ids, e.g. "Ix8ZJhSBPHcEMRA=".
    return base64.b64encode(os.urandom(11)).decode("ascii")


def _trace_id() -> str:
    return f"Root=1-{int(time.time()):08x}-{uuid.uuid4().hex[:24]}"
