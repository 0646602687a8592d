"""SageMaker hosting adapter: endpoints are real local model servers, and InvokeEndpoint reaches them.

moto 5.2.5 marks an endpoint InService at once, has no UpdateEndpoint, and answers InvokeEndpoint with a
canned body. Here CreateEndpoint starts `conveyor.local.model_server` on the model's `model.tar.gz`
(Creating → InService once `/ping` answers, or Failed with a reason); UpdateEndpoint starts the new
config's server beside the old one and moves traffic only after the new one is healthy, otherwise it
keeps the old one serving (a rollback, visible as the old EndpointConfigName); InvokeEndpoint forwards to
the server that currently owns the endpoint.

UpdateEndpoint honours a blue/green DeploymentConfig as SageMaker's deployment guardrails do: a CANARY
sends CanarySize percent of the requests to the new (green) server for WaitIntervalInSeconds, then all of
them; ALL_AT_ONCE sends all of them at once and bakes as long; the old (blue) server then stays up for
TerminationWaitInSeconds. Throughout, the AutoRollbackConfiguration alarms (read from CloudWatch, as
PutMetricAlarm left them) are evaluated against what the green server really answered: its 5XX count
(Invocation5XXErrors) and mean latency (ModelLatency, microseconds). An alarm that trips sets that
CloudWatch alarm to ALARM, sends all traffic back to blue, stops green and leaves the endpoint InService
on its old config with a FailureReason naming the alarm, as a SageMaker rollback does.
"""

from __future__ import annotations

import http.client
import logging
import random
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from moto.cloudwatch.models import cloudwatch_backends
from moto.core.exceptions import ServiceException
from moto.core.responses import ActionResult
from moto.core.utils import utcnow
from moto.sagemaker import models as sagemaker_models
from moto.sagemaker import responses as sagemaker_responses
from moto.sagemaker.exceptions import ValidationError
from moto.sagemakerruntime import responses as runtime_responses

from conveyor.local.jobs import environ_copy
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


class ServiceUnavailable(ServiceException):
    """What InvokeEndpoint answers while an instance that stopped answering is being replaced."""

    code = "ServiceUnavailable"
    status_code = 503


@dataclass
class Server:
    endpoint_config: str
    variant: str
    port: int
    process: subprocess.Popen[bytes]
    model_dir: Path
    # What this server answered since it started: the figures its CloudWatch alarms are evaluated on.
    errors_5xx: int = 0
    latencies_us: list[float] = field(default_factory=list)
    # Times its process died and was replaced, as SageMaker replaces an unhealthy instance.
    replacements: int = 0
    replacing: bool = False
    retired: bool = False  # stopped on purpose (rolled back, superseded, the stack stopped): never replaced


@dataclass
class Canary:
    """A blue/green update in progress: `share` of the requests go to `green`, the rest to the blue server."""

    green: Server
    share: float


class RolledBack(Exception):
    """An auto-rollback alarm tripped during an update."""


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
        self._canaries: dict[str, Canary] = {}  # endpoint name → the update that shares its traffic
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

        def update_endpoint(
            backend_self: Any,
            endpoint_name: str,
            endpoint_config_name: str,
            deployment_config: dict[str, Any] | None = None,
        ) -> Any:
            endpoint = backend_self.endpoints.get(endpoint_name)
            if endpoint is None:
                raise ValidationError(message=f'Could not find endpoint "{endpoint_name}".')
            if endpoint.endpoint_status != "InService":
                raise ValidationError(
                    message=f"Cannot update endpoint {endpoint_name} while it is {endpoint.endpoint_status}."
                )
            backend_self.describe_endpoint_config(endpoint_config_name)  # raises if it does not exist
            rollout = Rollout.from_config(deployment_config or {}, adapter._alarms(backend_self))
            endpoint.endpoint_status = "Updating"
            endpoint.failure_reason = None
            adapter._in_background(
                adapter._deploy, backend_self, endpoint, endpoint_config_name, True, rollout
            )
            return endpoint

        def update_endpoint_response(response_self: Any) -> ActionResult:
            endpoint = response_self.sagemaker_backend.update_endpoint(
                endpoint_name=response_self._get_param("EndpointName"),
                endpoint_config_name=response_self._get_param("EndpointConfigName"),
                deployment_config=response_self._get_param("DeploymentConfig"),
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

    def _deploy(
        self,
        backend: Any,
        endpoint: Any,
        endpoint_config_name: str,
        is_update: bool,
        rollout: Rollout | None = None,
    ) -> None:
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
            blue = self._serving.get(name)
        if is_update and blue is not None and rollout is not None:
            try:
                self._roll_out(name, blue, server, rollout)
            except RolledBack as exc:
                log.warning("endpoint %s: %s rolled back: %s", name, endpoint_config_name, exc)
                with self._lock:
                    self._canaries.pop(name, None)
                    self._serving[name] = blue
                self._stop_server(server)
                endpoint.failure_reason = f"Rolled back {endpoint_config_name}: {exc}"[:1024]
                endpoint.last_modified_time = utcnow()
                endpoint.endpoint_status = "InService"
                return
        with self._lock:
            previous = self._serving.get(name)
            self._serving[name] = server
            self._canaries.pop(name, None)
        endpoint.endpoint_config_name = endpoint_config_name
        endpoint.production_variants = config["ProductionVariants"]
        endpoint.last_modified_time = utcnow()
        endpoint.endpoint_status = "InService"
        log.info("endpoint %s serves %s on port %d", name, endpoint_config_name, server.port)
        if previous is not None and previous is not server:
            # In-flight requests on the old server get a moment to finish before it goes.
            threading.Timer(5.0, self._stop_server, args=(previous,)).start()

    def _roll_out(self, name: str, blue: Server, green: Server, rollout: Rollout) -> None:
        """Shift traffic from blue to green as the rollout says, watching its alarms; raise RolledBack."""
        steps = [(rollout.canary_share, rollout.wait_seconds)] if rollout.canary_share < 1 else []
        steps.append((1.0, rollout.wait_seconds if not steps else 0.0))
        steps.append((1.0, rollout.termination_wait_seconds))
        for share, seconds in steps:
            with self._lock:
                self._canaries[name] = Canary(green, share)
            log.info(
                "endpoint %s: %.0f%% of traffic on %s for %.0f s", name, 100 * share, green.variant, seconds
            )
            deadline = time.monotonic() + seconds
            while True:
                for alarm in rollout.alarms:
                    if alarm.trips(green):
                        alarm.raise_in_cloudwatch(green)
                        raise RolledBack(alarm.explain(green))
                if time.monotonic() >= deadline:
                    break
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def _alarms(self, backend: Any) -> Any:
        return cloudwatch_backends[backend.account_id][backend.region_name]

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
        process, port = self._spawn(model_dir)
        server = Server(endpoint_config, variant, port, process, model_dir)
        with self._lock:
            self._all.append(server)
        try:
            self._wait_ready(process, port, model_dir)
        except TimeoutError:
            self._stop_server(server)
            raise
        return server

    def _spawn(self, model_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
        """A model server process on `model_dir` (an unpacked model.tar.gz), on a free port."""
        port = free_port()
        with (model_dir.parent / "server.log").open("ab") as log_file:  # the child keeps its own descriptor
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
                # One intra-op thread: a request's batch is small, and idle OpenMP workers spin between
                # requests, taking a core from everything else on a laptop.
                env={**environ_copy(), "OMP_NUM_THREADS": "1"},
            )
        return process, port

    def _wait_ready(self, process: subprocess.Popen[bytes], port: int, model_dir: Path) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = (model_dir.parent / "server.log").read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"the model server exited ({process.returncode}): {' | '.join(tail)}")
            if self._healthy(port):
                return
            time.sleep(0.2)
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
        with self._lock:
            server.retired = True
            process = server.process
        _terminate(process)

    def serving(self, endpoint_name: str) -> Server | None:
        """The server that takes `endpoint_name`'s traffic now (None: nothing deployed there)."""
        with self._lock:
            return self._serving.get(endpoint_name)

    def invoke(self, endpoint_name: str, body: str, accept: str) -> tuple[str, str, str]:
        with self._lock:
            server = self._serving.get(endpoint_name)
            canary = self._canaries.get(endpoint_name)
            if canary is not None and random.random() < canary.share:
                server = canary.green
            # One consistent view: a replacement publishes its process and port together.
            process, port = (server.process, server.port) if server is not None else (None, 0)
        if server is None or process is None:
            raise RuntimeValidationError(
                f"Endpoint {endpoint_name} of account 123456789012 not found or not InService."
            )
        if process.poll() is not None:
            self._replace(endpoint_name, server, process)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        started = time.perf_counter()
        try:
            connection.request(
                "POST",
                "/invocations",
                body=body.encode(),
                headers={"Content-Type": "application/json", "Accept": accept},
            )
            response = connection.getresponse()
            answer = response.read().decode()
        except OSError:
            if process.poll() is not None:
                self._replace(endpoint_name, server, process)
            server.errors_5xx += 1
            raise
        finally:
            connection.close()
        server.latencies_us.append((time.perf_counter() - started) * 1e6)
        if response.status >= 500:
            server.errors_5xx += 1
        if response.status != 200:
            raise ModelError(response.status, answer, f"/aws/sagemaker/Endpoints/{endpoint_name}")
        return answer, response.getheader("Content-Type") or "application/json", server.variant

    def _replace(self, endpoint_name: str, server: Server, dead: subprocess.Popen[bytes]) -> None:
        """`dead`, the server's process, has exited: unless the server was retired on purpose, start another
        on the same model in the background, as SageMaker replaces an instance that fails its health checks.
        Either way this request gets a retryable 503 (counted as the server's 5XX, which its alarm sees)."""
        with self._lock:
            server.errors_5xx += 1
            starting = not server.replacing and not server.retired and server.process is dead
            server.replacing = server.replacing or starting
        if starting:
            log.warning(
                "endpoint %s: the model server exited (%s); replacing it", endpoint_name, dead.returncode
            )
            threading.Thread(
                target=self._restart,
                args=(endpoint_name, server),
                daemon=True,
                name=f"replace-{endpoint_name}",
            ).start()
        raise ServiceUnavailable(
            f"Endpoint {endpoint_name}: an instance is being replaced after it stopped answering; retry shortly"
        )

    def _restart(self, endpoint_name: str, server: Server) -> None:
        process: subprocess.Popen[bytes] | None = None
        try:
            process, port = self._spawn(server.model_dir)
            self._wait_ready(process, port, server.model_dir)
            with self._lock:
                if not server.retired:
                    server.replacements += 1
                    server.process, server.port = process, port
                    process = None  # published: no longer ours to clean up
            if process is None:
                log.info("endpoint %s: model server replaced (port %d)", endpoint_name, port)
        except Exception:
            log.exception("endpoint %s: the replacement model server did not start", endpoint_name)
        finally:
            if process is not None:  # failed, or the server was retired meanwhile
                _terminate(process)
            with self._lock:
                server.replacing = False

    def stop_all(self) -> None:
        with self._lock:
            servers = list(self._all)
            self._serving.clear()
        for server in servers:
            self._stop_server(server)


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@dataclass
class Alarm:
    """One auto-rollback alarm, evaluated on what a green server answered (its one datapoint: the bake)."""

    name: str
    metric: str
    threshold: float
    comparison: str
    backend: Any

    def value(self, server: Server) -> float | None:
        if self.metric == "Invocation5XXErrors":
            return float(server.errors_5xx)
        if self.metric == "ModelLatency" and server.latencies_us:
            return sum(server.latencies_us) / len(server.latencies_us)
        return None  # missing data does not breach (TreatMissingData: notBreaching)

    def trips(self, server: Server) -> bool:
        value = self.value(server)
        if value is None:
            return False
        return {
            "GreaterThanOrEqualToThreshold": value >= self.threshold,
            "GreaterThanThreshold": value > self.threshold,
            "LessThanThreshold": value < self.threshold,
            "LessThanOrEqualToThreshold": value <= self.threshold,
        }.get(self.comparison, False)

    def explain(self, server: Server) -> str:
        return (
            f"alarm {self.name} went into ALARM: {self.metric} of {server.endpoint_config} was "
            f"{self.value(server):g}, threshold {self.threshold:g}"
        )

    def raise_in_cloudwatch(self, server: Server) -> None:
        self.backend.set_alarm_state(self.name, self.explain(server), "{}", "ALARM")


@dataclass
class Rollout:
    """A blue/green DeploymentConfig, with its alarms read from CloudWatch."""

    canary_share: float
    wait_seconds: float
    termination_wait_seconds: float
    alarms: list[Alarm]

    @classmethod
    def from_config(cls, config: dict[str, Any], cloudwatch: Any) -> Rollout:
        policy = config.get("BlueGreenUpdatePolicy") or {}
        routing = policy.get("TrafficRoutingConfiguration") or {
            "Type": "ALL_AT_ONCE",
            "WaitIntervalInSeconds": 0,
        }
        kind = routing.get("Type")
        if kind not in ("ALL_AT_ONCE", "CANARY"):
            raise ValidationError(
                message=f"Local mode supports ALL_AT_ONCE and CANARY traffic routing, not {kind}."
            )
        share = 1.0
        if kind == "CANARY":
            size = routing.get("CanarySize") or {}
            if size.get("Type") != "CAPACITY_PERCENT" or not 1 <= int(size.get("Value", 0)) <= 50:
                raise ValidationError(
                    message="CanarySize must be CAPACITY_PERCENT between 1 and 50 in local mode "
                    "(SageMaker allows at most half of the fleet as the canary)."
                )
            share = int(size["Value"]) / 100
        names = [a["AlarmName"] for a in (config.get("AutoRollbackConfiguration") or {}).get("Alarms", [])]
        found = {alarm.name: alarm for alarm in cloudwatch.get_alarms_by_alarm_names(names)}
        missing = [name for name in names if name not in found]
        if missing:
            raise ValidationError(message=f"The auto-rollback alarms {', '.join(missing)} do not exist.")
        alarms = [
            Alarm(
                name,
                found[name].metric_name,
                float(found[name].threshold),
                found[name].comparison_operator,
                cloudwatch,
            )
            for name in names
        ]
        return cls(
            canary_share=share,
            wait_seconds=float(routing.get("WaitIntervalInSeconds", 0)),
            termination_wait_seconds=float(policy.get("TerminationWaitInSeconds", 0)),
            alarms=alarms,
        )
