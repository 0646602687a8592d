"""Lambda adapter: moto records functions; this runs their real handlers, in this process.

moto 5.2.5 needs Docker to run Lambda code. We replace `LambdaFunction._invoke_lambda` (the one place every
invoke goes through: the Invoke API and Step Functions `lambda:invoke` tasks) with a call of the handler that
template.yaml names, under the function's environment and with a Lambda-like context. The SQS event source
is emulated by `SqsEventSource` (moto's own delivers synchronously and ignores partial batch responses).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moto.awslambda import models as lambda_models

log = logging.getLogger("localcloud.lambda")


@dataclass
class FunctionSpec:
    """What a function needs to run: where its code is and what its environment holds."""

    name: str
    handler: str  # "preprocess.app.handler"
    code_dir: Path
    environment: dict[str, str]
    timeout: int = 60
    memory: int = 128


class LambdaContext:
    """The attributes and method of the context object the Lambda Python runtime passes."""

    def __init__(self, spec: FunctionSpec, arn: str) -> None:
        self.function_name = spec.name
        self.function_version = "$LATEST"
        self.invoked_function_arn = arn
        self.memory_limit_in_mb = spec.memory
        self.aws_request_id = str(uuid.uuid4())
        self.log_group_name = f"/aws/lambda/{spec.name}"
        self.log_stream_name = time.strftime("%Y/%m/%d/[$LATEST]") + uuid.uuid4().hex
        self._deadline = time.monotonic() + spec.timeout

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


class LambdaRuntime:
    """Runs registered functions in-process.

    One invocation at a time: handlers read settings from `os.environ`, which is per process, so the
    function's environment is put in place for its call (`_FunctionEnvironment`).
    """

    def __init__(self, base_environment: dict[str, str], region: str, account_id: str) -> None:
        self._functions: dict[str, FunctionSpec] = {}
        self._environment = _FunctionEnvironment()
        self._base = base_environment
        self._region = region
        self._account = account_id
        self._lock = threading.RLock()
        self._original: Callable[..., Any] | None = None

    def register(self, spec: FunctionSpec) -> None:
        self._functions[spec.name] = spec
        # The code directory is to the handler what /var/task is in Lambda: first on the import path.
        if str(spec.code_dir) not in sys.path:
            sys.path.insert(0, str(spec.code_dir))

    def install(self) -> None:
        """Route moto's Lambda invocations to `invoke`."""
        if not hasattr(lambda_models.LambdaFunction, "_invoke_lambda"):
            raise RuntimeError("moto changed: LambdaFunction._invoke_lambda is gone; see docs/local-mode.md")
        self._original = lambda_models.LambdaFunction._invoke_lambda
        runtime = self

        def _invoke_lambda(function: Any, event: Any = None) -> tuple[str, bool, str]:
            if function.function_name not in runtime._functions:
                assert runtime._original is not None
                return runtime._original(function, event)  # type: ignore[no-any-return]
            if isinstance(event, bytes | str):
                event = json.loads(event) if event else {}
            payload, errored = runtime.invoke(function.function_name, event or {})
            return json.dumps(payload, default=str), errored, ""

        lambda_models.LambdaFunction._invoke_lambda = _invoke_lambda  # type: ignore[method-assign]

    def uninstall(self) -> None:
        if self._original is not None:
            lambda_models.LambdaFunction._invoke_lambda = self._original  # type: ignore[method-assign]
            self._original = None
        with self._lock:
            self._environment.restore()

    def invoke(self, name: str, event: dict[str, Any]) -> tuple[Any, bool]:
        """Call the function's handler; returns (payload, errored) like the Invoke API."""
        spec = self._functions[name]
        arn = f"arn:aws:lambda:{self._region}:{self._account}:function:{name}"
        environment = {
            **self._base,
            **spec.environment,
            "AWS_LAMBDA_FUNCTION_NAME": name,
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(spec.memory),
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_REGION": self._region,
            "AWS_DEFAULT_REGION": self._region,
            "_HANDLER": spec.handler,
        }
        with self._lock:
            self._environment.switch_to(environment)
            started = time.monotonic()
            try:
                module_name, function_name = spec.handler.rsplit(".", 1)
                handler = getattr(importlib.import_module(module_name), function_name)
                result = handler(event, LambdaContext(spec, arn))
                errored = False
            except Exception as exc:  # the Lambda runtime reports any exception the same way
                log.exception("%s failed", name)
                result = {
                    "errorMessage": str(exc),
                    "errorType": type(exc).__name__,
                    "stackTrace": traceback.format_exception(exc),
                }
                errored = True
            log.debug("%s took %.0f ms", name, (time.monotonic() - started) * 1000)
        return result, errored


class _FunctionEnvironment:
    """Puts a function's environment in `os.environ` for its invocation, without removing keys on every call.

    Other threads (the emulator's, the job adapters') copy `os.environ`, which iterates its keys and then
    looks each one up: a key removed in between raises KeyError in that thread. Under API load the proxy runs
    dozens of times a second, so its variables are set once and left in place; a variable is removed (or
    given back its value from before local mode) only when a function that does not have it runs next, and
    all of them when the runtime is uninstalled. Callers hold the runtime's lock.
    """

    def __init__(self) -> None:
        self._current: set[str] = set()
        self._before: dict[str, str | None] = {}  # each key's value before any function set it

    def switch_to(self, values: dict[str, str]) -> None:
        for key in self._current - values.keys():
            self._put_back(key)
        for key, value in values.items():
            self._before.setdefault(key, os.environ.get(key))
            if os.environ.get(key) != value:
                os.environ[key] = value
        self._current = set(values)

    def restore(self) -> None:
        for key in list(self._before):
            self._put_back(key)
        self._current.clear()

    def _put_back(self, key: str) -> None:
        value = self._before.pop(key, None)
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


class SqsEventSource:
    """The Lambda service's SQS poller: batches, partial batch responses, retries through visibility.

    Successful messages (and those not named in `batchItemFailures`) are deleted; failed ones become visible
    again after the queue's visibility timeout, and the queue's redrive policy moves them to the DLQ.
    """

    def __init__(
        self,
        sqs: Any,
        runtime: LambdaRuntime,
        function: str,
        queue_url: str,
        queue_arn: str,
        batch_size: int,
        region: str,
        report_batch_item_failures: bool,
    ) -> None:
        self._sqs = sqs
        self._runtime = runtime
        self._function = function
        self._queue_url = queue_url
        self._queue_arn = queue_arn
        self._batch_size = batch_size
        self._region = region
        self._partial = report_batch_item_failures
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sqs-{function}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once(wait_seconds=1)
            except Exception:  # keep polling, like the service does, and say why
                if self._stop.is_set():
                    return
                log.exception("SQS poller for %s failed; retrying", self._function)
                self._stop.wait(1)

    def poll_once(self, wait_seconds: int = 0) -> int:
        """Receive one batch and deliver it; returns the number of messages delivered."""
        received = self._sqs.receive_message(
            QueueUrl=self._queue_url,
            MaxNumberOfMessages=self._batch_size,
            WaitTimeSeconds=wait_seconds,
            AttributeNames=["All"],
            MessageAttributeNames=["All"],
        ).get("Messages", [])
        if not received:
            return 0
        event = {"Records": [self._record(m) for m in received]}
        result, errored = self._runtime.invoke(self._function, event)
        if errored:
            return len(received)  # the whole batch is retried after the visibility timeout
        failed = set()
        if self._partial and isinstance(result, dict):
            failed = {f["itemIdentifier"] for f in result.get("batchItemFailures", [])}
        done = [m for m in received if m["MessageId"] not in failed]
        if done:
            self._sqs.delete_message_batch(
                QueueUrl=self._queue_url,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(done)],
            )
        return len(received)

    def _record(self, message: dict[str, Any]) -> dict[str, Any]:
        return {
            "messageId": message["MessageId"],
            "receiptHandle": message["ReceiptHandle"],
            "body": message["Body"],
            "attributes": message.get("Attributes", {}),
            "messageAttributes": {
                k: {
                    **{_lower_first(f): v for f, v in a.items()},
                    "stringListValues": [],
                    "binaryListValues": [],
                }
                for k, a in message.get("MessageAttributes", {}).items()
            },
            "md5OfBody": message["MD5OfBody"],
            "eventSource": "aws:sqs",
            "eventSourceARN": self._queue_arn,
            "awsRegion": self._region,
        }


def _lower_first(name: str) -> str:
    return name[:1].lower() + name[1:]
