"""Settings of the Lambda functions, read once from the environment variables that template.yaml sets."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields


class ConfigError(RuntimeError):
    """A setting the function needs is missing from its environment."""


@dataclass(frozen=True)
class Settings:
    """Every environment variable conveyor's functions read; each function uses the ones it needs.

    Attribute names are the lower-cased environment variable names of template.yaml.
    """

    stack_name: str = "conveyor"
    processed_bucket: str = ""
    artifacts_bucket: str = ""
    state_machine_arn: str = ""
    notification_topic_arn: str = ""
    max_request_bytes: int = 5_242_880
    # Uploads above this size are preprocessed by a SageMaker Processing job instead of in Lambda.
    lambda_preprocess_max_bytes: int = 1_073_741_824
    # Endpoints nobody called for this many days are deleted (0: never).
    idle_endpoint_days: int = 0
    # The training job's defaults (template parameters); a dataset's conveyor.json may override them.
    training_instance_type: str = "ml.g5.xlarge"
    training_instance_count: int = 1
    training_use_spot: str = "true"
    training_max_wait_seconds: int = 7200
    training_max_runtime_seconds: int = 3600
    # The stack key's ARN with EncryptionMode SSE-KMS; empty with SSE-S3.
    stack_key_arn: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field in fields(cls):
            raw = environ.get(field.name.upper())
            if raw is None or raw == "":
                continue
            values[field.name] = int(raw) if field.type == "int" else raw
        return cls(**values)  # type: ignore[arg-type]

    def require(self, name: str) -> str:
        """Return a string setting, or fail with the environment variable that should hold it."""
        value = getattr(self, name)
        if not value:
            raise ConfigError(f"environment variable {name.upper()} is not set")
        return str(value)
