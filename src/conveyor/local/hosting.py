"""SageMaker hosting adapter: endpoints are real local model servers, and InvokeEndpoint reaches them.

moto 5.2.5 marks an endpoint InService at once, has no UpdateEndpoint, and answers InvokeEndpoint with a
canned body. Here CreateEndpoint starts `conveyor.local.model_server` on the model's `model.tar.gz`
(Creating → InService once `/ping` answers, or Failed with a reason); UpdateEndpoint starts the new
config's server beside the old one and moves traffic only after the new one is healthy, otherwise it
keeps the old one serving (a rollback, visible as the old EndpointConfigName); InvokeEndpoint forwards to
the server that currently owns the endpoint.
"""

from __future__ import annotations

import http.client
import logging
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from moto.core.exceptions import ServiceException
from moto.core.responses import ActionResult
from moto.core.utils import utcnow
from moto.sagemaker import models as sagemaker_models
from moto.sagemaker import responses as sagemaker_responses
from moto.sagemaker.exceptions import ValidationError
from moto.sagemakerruntime import responses as runtime_responses

from conveyor.local.training import split_s3

log = logging.getLogger("localcloud.hosting")
READY_TIMEOUT = 180


class ModelError(ServiceException):
    """What SageMaker raises when the model container answers with an error."""

    code = "ModelError"

    def __init__(self, status: int, body: str, log_stream: str) -> None:
        super().__init__(f'Received client error ({status}) from primary with message "{body}".')
        self.OriginalStatusCode = status
        self.OriginalMessage = body
        self.LogStreamArn = log_stream


class RuntimeValidationError(ServiceException):
    code = "ValidationError"


@dataclass
class Server:
    endpoint_config: str
    variant: str
    port: int
    process: subprocess.Popen[bytes]
    model_dir: Path


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class HostingAdapter:
    def __init__(self, s3_factory: Callable[[], Any], workdir: Path, python: str = sys.executable) -> None:
        self._s3_factory = s3_factory
        self._workdir = workdir
        self._python = python
        self._serving: dict[str, Server] = {}  # endpoint name → the server that takes its traffic
        self._all: list[Server] = []
        self._lock = threading.Lock()
        self._saved: dict[tuple[type, str], Any] = {}

    # ------------------------------------------------------------------ hooks
    def install(self) -> None:
        backend = sagemaker_models.SageMakerModelBackend
        runtime_response = runtime_responses.SageMakerRuntimeResponse
        for owner, name in (
            (backend, "create_endpoint"),
            (backend, "describe_endpoint_config"),
            (runtime_response, "invoke_endpoint"),
        ):
            if not hasattr(owner, name):
                raise RuntimeError(f"moto changed: {owner.__name__}.{name} is gone; see docs/local-mode.md")
            self._saved[(owner, name)] = getattr(owner, name)
        responses = sagemaker_responses.SageMakerResponse
        self._saved[(responses, "update_endpoint")] = getattr(responses, "update_endpoint", None)
        self._saved[(backend, "update_endpoint")] = getattr(backend, "update_endpoint", None)
        adapter = self
        original_create = self._saved[(backend, "create_endpoint")]

        def create_endpoint(
            backend_self: Any, endpoint_name: str, endpoint_config_name: str, tags: Any
        ) -> Any:
            if endpoint_name in backend_self.endpoints:
                raise ValidationError(message=f'Cannot create already existing endpoint "{endpoint_name}".')
            endpoint = original_create(backend_self, endpoint_name, endpoint_config_name, tags)
            endpoint.endpoint_status = "Creating"
            adapter._in_background(adapter._deploy, backend_self, endpoint, endpoint_config_name, False)
            return endpoint

        def update_endpoint(backend_self: Any, endpoint_name: str, endpoint_config_name: str) -> Any:
            endpoint = backend_self.endpoints.get(endpoint_name)
            if endpoint is None:
                raise ValidationError(message=f'Could not find endpoint "{endpoint_name}".')
            if endpoint.endpoint_status != "InService":
                raise ValidationError(
                    message=f"Cannot update endpoint {endpoint_name} while it is {endpoint.endpoint_status}."
                )
            backend_self.describe_endpoint_config(endpoint_config_name)  # raises if it does not exist
            endpoint.endpoint_status = "Updating"
            adapter._in_background(adapter._deploy, backend_self, endpoint, endpoint_config_name, True)
            return endpoint

        def update_endpoint_response(response_self: Any) -> ActionResult:
            endpoint = response_self.sagemaker_backend.update_endpoint(
                endpoint_name=response_self._get_param("EndpointName"),
                endpoint_config_name=response_self._get_param("EndpointConfigName"),
            )
            return ActionResult({"EndpointArn": endpoint.arn})

        def invoke_endpoint_response(response_self: Any) -> tuple[int, dict[str, str], str]:
            # InvokeEndpoint is rest-json: the endpoint name is in the path (/endpoints/<name>/invocations),
            # where moto 5.2.5's handler does not look (it hands its backend None), so this handler is
            # replaced rather than the backend method behind it.
            name = unquote(response_self.path.split("/")[2])
            body = response_self.body
            text = body.decode() if isinstance(body, bytes) else (body or "")
            accept = response_self.headers.get("Accept") or "application/json"
            answer, content_type, variant = adapter.invoke(name, text, accept)
            return 200, {"Content-Type": content_type, "x-Amzn-Invoked-Production-Variant": variant}, answer

        backend.create_endpoint = create_endpoint  # type: ignore[method-assign]
        backend.update_endpoint = update_endpoint  # type: ignore[attr-defined]
        responses.update_endpoint = update_endpoint_response  # type: ignore[attr-defined]
        runtime_response.invoke_endpoint = invoke_endpoint_response  # type: ignore[method-assign]

    def uninstall(self) -> None:
        for (owner, name), value in self._saved.items():
            if value is None:
                if hasattr(owner, name):
                    delattr(owner, name)
            else:
                setattr(owner, name, value)
        self._saved.clear()

    # ------------------------------------------------------------------ behaviour
    def _in_background(self, target: Callable[..., None], *args: Any) -> None:
        threading.Thread(
            target=target, args=args, daemon=True, name=f"endpoint-{args[1].endpoint_name}"
        ).start()

    def _deploy(self, backend: Any, endpoint: Any, endpoint_config_name: str, is_update: bool) -> None:
        name = endpoint.endpoint_name
        try:
            config = backend.describe_endpoint_config(endpoint_config_name)
            variant = config["ProductionVariants"][0]
            model = backend.describe_model(variant["ModelName"]).response_object
            container = model.get("PrimaryContainer") or model["Containers"][0]
            server = self._start_server(
                name, endpoint_config_name, variant["VariantName"], container["ModelDataUrl"]
            )
        except Exception as exc:
            log.warning("endpoint %s: %s could not start: %s", name, endpoint_config_name, exc)
            endpoint.failure_reason = f"{endpoint_config_name}: {exc}"[:1024]
            endpoint.last_modified_time = utcnow()
            # A failed update leaves the old config serving, as a SageMaker rollback does.
            endpoint.endpoint_status = "InService" if is_update else "Failed"
            return
        with self._lock:
            previous = self._serving.get(name)
            self._serving[name] = server
        endpoint.endpoint_config_name = endpoint_config_name
        endpoint.production_variants = config["ProductionVariants"]
        endpoint.last_modified_time = utcnow()
        endpoint.endpoint_status = "InService"
        log.info("endpoint %s serves %s on port %d", name, endpoint_config_name, server.port)
        if previous is not None:
            # In-flight requests on the old server get a moment to finish before it goes.
            threading.Timer(5.0, self._stop_server, args=(previous,)).start()

    def _start_server(self, endpoint: str, endpoint_config: str, variant: str, model_data_url: str) -> Server:
        model_dir = self._workdir / "endpoints" / endpoint / endpoint_config / "model"
        if model_dir.exists():
            shutil.rmtree(model_dir)
        model_dir.mkdir(parents=True)
        archive = model_dir.parent / "model.tar.gz"
        self._s3_factory().download_file(*split_s3(model_data_url), str(archive))
        with tarfile.open(archive) as tar:
            tar.extractall(model_dir, filter="data")
        if not (model_dir / "code" / "inference.py").exists():
            raise ValueError("model.tar.gz has no code/inference.py")
        port = free_port()
        log_file = (model_dir.parent / "server.log").open("wb")
        process = subprocess.Popen(
            [
                self._python,
                "-m",
                "conveyor.local.model_server",
                "--model-dir",
                str(model_dir),
                "--port",
                str(port),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        server = Server(endpoint_config, variant, port, process, model_dir)
        with self._lock:
            self._all.append(server)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = (model_dir.parent / "server.log").read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"the model server exited ({process.returncode}): {' | '.join(tail)}")
            if self._healthy(port):
                return server
            time.sleep(0.2)
        self._stop_server(server)
        raise TimeoutError(f"the model server did not answer /ping within {READY_TIMEOUT} s")

    @staticmethod
    def _healthy(port: int) -> bool:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/ping")
            healthy = connection.getresponse().status == 200
            connection.close()
            return healthy
        except OSError:
            return False

    def _stop_server(self, server: Server) -> None:
        if server.process.poll() is None:
            server.process.terminate()
            try:
                server.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.process.kill()

    def invoke(self, endpoint_name: str, body: str, accept: str) -> tuple[str, str, str]:
        with self._lock:
            server = self._serving.get(endpoint_name)
        if server is None:
            raise RuntimeValidationError(
                f"Endpoint {endpoint_name} of account 123456789012 not found or not InService."
            )
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        try:
            connection.request(
                "POST",
                "/invocations",
                body=body.encode(),
                headers={"Content-Type": "application/json", "Accept": accept},
            )
            response = connection.getresponse()
            answer = response.read().decode()
        finally:
            connection.close()
        if response.status != 200:
            raise ModelError(response.status, answer, f"/aws/sagemaker/Endpoints/{endpoint_name}")
        return answer, response.getheader("Content-Type") or "application/json", server.variant

    def stop_all(self) -> None:
        with self._lock:
            servers = list(self._all)
            self._serving.clear()
        for server in servers:
            self._stop_server(server)
