"""EventBridge adapter: the "Step Functions Execution Status Change" and "SageMaker Model Package State
Change" events moto does not emit.

moto 5.2.5's Step Functions executor ends every execution (succeeded, failed, stopped by StopExecution, or
past the definition's TimeoutSeconds) through `BaseExecutionWorkerCommunication.terminated`, and sends no
event anywhere. We wrap that method: once moto has recorded the final status, the event Step Functions puts
on the default bus is built from the execution and delivered, as an asynchronous Lambda invocation, to every
function whose `EventBridgeRule` (or `CloudWatchEvent`) event in template.yaml matches it. Patterns are
matched by moto's own EventBridge matcher.

Likewise CreateModelPackage and UpdateModelPackage emit the package's state change event. UpdateModelPackage
also keeps the package's CustomerMetadataProperties when the call names none (moto 5.2.5 replaces them with
None; SageMaker keeps them, and conveyor's ApprovalFunction reads them).
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from moto.events.models import EventPattern, EventPatternParser
from moto.sagemaker import models as sagemaker_models
from moto.stepfunctions.parser.backend import execution as sfn_execution

from conveyor.local.lambdas import LambdaRuntime

log = logging.getLogger("localcloud.events")
# The event types of template.yaml that are EventBridge rules targeting the function.
RULE_EVENT_TYPES = ("EventBridgeRule", "CloudWatchEvent")
# Lambda retries a failed asynchronous invocation twice; locally after seconds instead of minutes.
ASYNC_RETRY_DELAYS = (1.0, 2.0)


@dataclass
class Rule:
    """One rule on the default bus: a pattern and the function it invokes."""

    name: str
    pattern: EventPattern
    function: str
    # Where an event goes after the function failed it three times (the function's DeadLetterQueue).
    dead_letter: Callable[[dict[str, Any]], None] | None = None


def service_event(
    source: str, detail_type: str, resource: str, detail: dict[str, Any], region: str, account_id: str
) -> dict[str, Any]:
    """An event as an AWS service puts it on the default bus: the envelope around `detail`."""
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": detail_type,
        "source": source,
        "account": account_id,
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": region,
        "resources": [resource],
        "detail": detail,
    }


def execution_status_change(execution: Any, region: str, account_id: str) -> dict[str, Any]:
    """The event Step Functions sends when `execution` (moto's parser Execution) changes status."""
    status = execution.exec_status.value

    def millis(moment: datetime | None) -> int | None:
        return None if moment is None else int(moment.timestamp() * 1000)

    output = None
    if status == "SUCCEEDED" and execution.output is not None:
        output = json.dumps(execution.output, separators=(",", ":"))
    return service_event(
        "aws.states",
        "Step Functions Execution Status Change",
        execution.exec_arn,
        {
            "executionArn": execution.exec_arn,
            "stateMachineArn": execution.state_machine.arn,
            "name": execution.name,
            "status": status,
            "startDate": millis(execution.start_date),
            "stopDate": millis(execution.stop_date),
            "input": execution.execution_input,
            "output": output,
            "inputDetails": {"included": True},
            "outputDetails": {"included": True} if output is not None else None,
            "error": execution.error,
            "cause": execution.cause,
        },
        region,
        account_id,
    )


def model_package_state_change(package: Any, region: str, account_id: str) -> dict[str, Any]:
    """The event SageMaker sends when a model package (moto's ModelPackage) is created or changes status."""
    return service_event(
        "aws.sagemaker",
        "SageMaker Model Package State Change",
        package.arn,
        {
            "ModelPackageGroupName": package.model_package_group_name,
            "ModelPackageVersion": package.model_package_version,
            "ModelPackageArn": package.arn,
            "ModelPackageStatus": "Completed",
            "ModelApprovalStatus": package.model_approval_status,
            "CustomerMetadataProperties": package.customer_metadata_properties or {},
        },
        region,
        account_id,
    )


class EventBridgeBus:
    """The default event bus, for the events local mode emits on the services' behalf."""

    def __init__(self, runtime: LambdaRuntime, region: str, account_id: str) -> None:
        self._runtime = runtime
        self._region = region
        self._account = account_id
        self._rules: list[Rule] = []
        self._deliveries: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._original: Callable[..., Any] | None = None
        self._saved_sagemaker: dict[str, Callable[..., Any]] = {}
        # For tests and debugging: every event put on the bus, and (function, event) of each delivery.
        self.emitted: list[dict[str, Any]] = []
        self.delivered: list[tuple[str, dict[str, Any]]] = []

    def add_rule(
        self,
        name: str,
        pattern: dict[str, Any],
        function: str,
        dead_letter: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """Route events matching `pattern` (an EventBridge event pattern, intrinsics resolved) to `function`."""
        raw = json.dumps(pattern)
        # Fails on a pattern EventBridge would refuse (a scalar where a list belongs, an empty list).
        parsed = EventPatternParser(raw).parse()
        self._rules.append(Rule(name, EventPattern(raw, parsed), function, dead_letter))

    def install(self) -> None:
        """Emit an execution's status change event when moto's executor ends it."""
        communication = getattr(sfn_execution, "BaseExecutionWorkerCommunication", None)
        if communication is None or not hasattr(communication, "terminated"):
            raise RuntimeError(
                "moto changed: BaseExecutionWorkerCommunication.terminated is gone; see docs/local-mode.md"
            )
        self._original = communication.terminated
        bus = self

        def terminated(communication_self: Any) -> None:
            assert bus._original is not None
            bus._original(communication_self)  # records the final status, stop date, error and cause
            try:
                event = execution_status_change(communication_self.execution, bus._region, bus._account)
            except Exception:  # never break moto's executor over an event
                log.exception("cannot build the status change event of an execution")
                return
            bus.put(event)

        communication.terminated = terminated
        self._install_model_packages()

    def _install_model_packages(self) -> None:
        backend = sagemaker_models.SageMakerModelBackend
        for name in ("create_model_package", "update_model_package"):
            if not hasattr(backend, name):
                raise RuntimeError(
                    f"moto changed: SageMakerModelBackend.{name} is gone; see docs/local-mode.md"
                )
            self._saved_sagemaker[name] = getattr(backend, name)
        bus, create, update = (
            self,
            self._saved_sagemaker["create_model_package"],
            self._saved_sagemaker["update_model_package"],
        )

        def announce(backend_self: Any, arn: str) -> None:
            package = backend_self.model_packages.get(arn)
            if package is not None:
                bus.put(model_package_state_change(package, bus._region, bus._account))

        def create_model_package(backend_self: Any, *args: Any, **kwargs: Any) -> str:
            arn = create(backend_self, *args, **kwargs)
            announce(backend_self, arn)
            return arn

        def update_model_package(
            backend_self: Any,
            model_package_arn: str,
            model_approval_status: str | None,
            approval_description: str | None,
            customer_metadata_properties: dict[str, str] | None,
            *rest: Any,
            **kwargs: Any,
        ) -> str:
            key = backend_self.model_package_name_mapping.get(model_package_arn, model_package_arn)
            package = backend_self.model_packages.get(key)
            if customer_metadata_properties is None and package is not None:
                customer_metadata_properties = package.customer_metadata_properties
            before = package.model_approval_status if package is not None else None
            arn = update(
                backend_self,
                model_package_arn,
                model_approval_status,
                approval_description,
                customer_metadata_properties,
                *rest,
                **kwargs,
            )
            if model_approval_status and model_approval_status != before:
                announce(backend_self, arn)
            return arn

        backend.create_model_package = create_model_package  # type: ignore[method-assign]
        backend.update_model_package = update_model_package  # type: ignore[method-assign]

    def uninstall(self) -> None:
        for name, original in self._saved_sagemaker.items():
            setattr(sagemaker_models.SageMakerModelBackend, name, original)
        self._saved_sagemaker.clear()
        if self._original is not None:
            sfn_execution.BaseExecutionWorkerCommunication.terminated = self._original  # type: ignore[method-assign]
            self._original = None

    def put(self, event: dict[str, Any]) -> list[str]:
        """Deliver `event` to the function of every matching rule (asynchronously); returns their names."""
        rules = [rule for rule in self._rules if rule.pattern.matches_event(event)]  # type: ignore[arg-type]
        with self._lock:
            self.emitted.append(event)
        for rule in rules:
            thread = threading.Thread(
                target=self._deliver, args=(rule, event), name=f"events-{rule.function}", daemon=True
            )
            with self._lock:
                self._deliveries = [t for t in self._deliveries if t.is_alive()]
                self._deliveries.append(thread)
            thread.start()
        return [rule.function for rule in rules]

    def _deliver(self, rule: Rule, event: dict[str, Any]) -> None:
        function = rule.function
        for attempt, delay in enumerate((0.0, *ASYNC_RETRY_DELAYS)):
            if delay:
                threading.Event().wait(delay)
            payload, errored = self._runtime.invoke(function, event)
            if not errored:
                with self._lock:
                    self.delivered.append((function, event))
                return
            log.warning(
                "%s failed on a %s event (attempt %d): %s",
                function,
                event["detail-type"],
                attempt + 1,
                payload.get("errorMessage") if isinstance(payload, dict) else payload,
            )
        log.error("%s: gave up on the %s event %s", function, event["detail-type"], event["id"])
        if rule.dead_letter is not None:
            rule.dead_letter(event)

    def drain(self, timeout: float = 30.0) -> None:
        """Wait for deliveries in flight (before the emulator behind the functions goes away)."""
        with self._lock:
            pending = list(self._deliveries)
        for thread in pending:
            thread.join(timeout=timeout)
