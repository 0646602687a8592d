"""EventBridge adapter: the "Step Functions Execution Status Change" events moto does not emit.

moto 5.2.5's Step Functions executor ends every execution (succeeded, failed, stopped by StopExecution, or
past the definition's TimeoutSeconds) through `BaseExecutionWorkerCommunication.terminated`, and sends no
event anywhere. We wrap that method: once moto has recorded the final status, the event Step Functions puts
on the default bus is built from the execution and delivered, as an asynchronous Lambda invocation, to every
function whose `EventBridgeRule` (or `CloudWatchEvent`) event in template.yaml matches it. Patterns are
matched by moto's own EventBridge matcher.
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


def execution_status_change(execution: Any, region: str, account_id: str) -> dict[str, Any]:
    """The event Step Functions sends when `execution` (moto's parser Execution) changes status."""
    status = execution.exec_status.value

    def millis(moment: datetime | None) -> int | None:
        return None if moment is None else int(moment.timestamp() * 1000)

    output = None
    if status == "SUCCEEDED" and execution.output is not None:
        output = json.dumps(execution.output, separators=(",", ":"))
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Step Functions Execution Status Change",
        "source": "aws.states",
        "account": account_id,
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": region,
        "resources": [execution.exec_arn],
        "detail": {
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
    }


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
        # For tests and debugging: every event put on the bus, and (function, event) of each delivery.
        self.emitted: list[dict[str, Any]] = []
        self.delivered: list[tuple[str, dict[str, Any]]] = []

    def add_rule(self, name: str, pattern: dict[str, Any], function: str) -> None:
        """Route events matching `pattern` (an EventBridge event pattern, intrinsics resolved) to `function`."""
        raw = json.dumps(pattern)
        # Fails on a pattern EventBridge would refuse (a scalar where a list belongs, an empty list).
        parsed = EventPatternParser(raw).parse()
        self._rules.append(Rule(name, EventPattern(raw, parsed), function))

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

    def uninstall(self) -> None:
        if self._original is not None:
            sfn_execution.BaseExecutionWorkerCommunication.terminated = self._original  # type: ignore[method-assign]
            self._original = None

    def put(self, event: dict[str, Any]) -> list[str]:
        """Deliver `event` to the function of every matching rule (asynchronously); returns their names."""
        targets = [rule.function for rule in self._rules if rule.pattern.matches_event(event)]  # type: ignore[arg-type]
        with self._lock:
            self.emitted.append(event)
        for function in targets:
            thread = threading.Thread(
                target=self._deliver, args=(function, event), name=f"events-{function}", daemon=True
            )
            with self._lock:
                self._deliveries = [t for t in self._deliveries if t.is_alive()]
                self._deliveries.append(thread)
            thread.start()
        return targets

    def _deliver(self, function: str, event: dict[str, Any]) -> None:
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

    def drain(self, timeout: float = 30.0) -> None:
        """Wait for deliveries in flight (before the emulator behind the functions goes away)."""
        with self._lock:
            pending = list(self._deliveries)
        for thread in pending:
            thread.join(timeout=timeout)
