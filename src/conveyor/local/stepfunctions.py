"""Step Functions adapter: the aws-sdk integration names services and their errors as Step Functions does.

moto 5.2.5's executor hands the service name of an `arn:aws:states:::aws-sdk:<service>:<action>` resource to
boto3 as it is, and names a failed call's error `<service as written>.<exception>Exception`. Step Functions
(and every Retry and Catch in our definition) says `SageMaker.ResourceLimitExceededException`, and
`SageMaker.AmazonSageMakerException` for an error the service model does not define (ThrottlingException
among them: the name of the Java SDK's base exception). So:

- `applicationautoscaling` reaches boto3's `application-autoscaling` (the endpoints' auto scaling);
- errors of `aws-sdk:sagemaker:*` calls are named as Step Functions names them, so a throttled SageMaker
  call is retried locally as on AWS;
- an aws-sdk call that cannot reach the emulator, or loses its connection (the emulator is restarting: the
  fault-injection suite), fails as an unavailable service does on AWS, where SageMaker answers 503
  ServiceUnavailable, an unmodelled error: `SageMaker.AmazonSageMakerException`, which the definition
  retries. (moto's executor makes one attempt per call and would name it `States.Runtime`.)

The optimised integrations (`arn:aws:states:::sagemaker:createModel`, ...) are a different path in moto;
their errors stay `States.Runtime` (docs/local-mode.md).
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotocoreConnectionError
from moto.stepfunctions.parser.asl.component.state.exec.state_task.service import (
    state_task_service_aws_sdk as aws_sdk,
)
from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.state_task_service import (
    StateTaskService,
)

# aws-sdk service names that boto3 spells differently.
SDK_SERVICE_NAMES = {"applicationautoscaling": "application-autoscaling"}
# How Step Functions writes the service in an aws-sdk error name, and its name for an unmodelled error.
SDK_ERROR_NAMES = {"sagemaker": ("SageMaker", "AmazonSageMakerException")}


class StepFunctionsAdapter:
    def __init__(self) -> None:
        self._names_added: list[str] = []
        self._errors_added: list[str] = []
        self._original_exception_name: Any = None
        self._original_from_error: Any = None

    def install(self) -> None:
        overrides = StateTaskService._SERVICE_NAME_SFN_TO_BOTO_OVERRIDES
        errors = getattr(aws_sdk, "_SERVICE_ERROR_NAMES", None)
        service = getattr(aws_sdk, "StateTaskServiceAwsSdk", None)
        if (
            not isinstance(errors, dict)
            or service is None
            or not hasattr(service, "_normalise_exception_name")
            or "_from_error" not in service.__dict__
        ):
            raise RuntimeError("moto changed: the aws-sdk task's error naming moved; see docs/local-mode.md")
        self._names_added = [name for name in SDK_SERVICE_NAMES if name not in overrides]
        overrides.update({name: SDK_SERVICE_NAMES[name] for name in self._names_added})  # type: ignore[attr-defined]
        self._errors_added = [name for name in SDK_ERROR_NAMES if name not in errors]
        errors.update({name: SDK_ERROR_NAMES[name][0] for name in self._errors_added})
        self._original_exception_name = service.__dict__["_normalise_exception_name"]
        original = self._original_exception_name.__func__
        unmodelled = {written: base for written, base in SDK_ERROR_NAMES.values()}

        def normalise_exception_name(norm_service_name: str, ex: Exception) -> str:
            if type(ex) is ClientError and norm_service_name in unmodelled:
                return f"{norm_service_name}.{unmodelled[norm_service_name]}"
            return original(norm_service_name, ex)

        service._normalise_exception_name = staticmethod(normalise_exception_name)

        self._original_from_error = service.__dict__["_from_error"]
        original_from_error = self._original_from_error

        def from_error(task: Any, env: Any, ex: Exception) -> Any:
            written = task._normalise_service_error_name(task.resource.api_name)
            if isinstance(ex, (BotocoreConnectionError, HTTPClientError)) and written in unmodelled:
                cause = f"{ex} (Service: {written}, Status Code: 503: the service could not be reached)"
                return task._get_task_failure_event(
                    env=env, error=f"{written}.{unmodelled[written]}", cause=cause
                )
            return original_from_error(task, env, ex)

        service._from_error = from_error

    def uninstall(self) -> None:
        for name in self._names_added:
            StateTaskService._SERVICE_NAME_SFN_TO_BOTO_OVERRIDES.pop(name, None)  # type: ignore[attr-defined]
        for name in self._errors_added:
            aws_sdk._SERVICE_ERROR_NAMES.pop(name, None)
        if self._original_exception_name is not None:
            aws_sdk.StateTaskServiceAwsSdk._normalise_exception_name = self._original_exception_name
        if self._original_from_error is not None:
            aws_sdk.StateTaskServiceAwsSdk._from_error = self._original_from_error
        self._names_added, self._errors_added, self._original_exception_name = [], [], None
        self._original_from_error = None
