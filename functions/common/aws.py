"""boto3 clients created once per Lambda container and shared by every invocation.

Tests and local mode replace them with `set_client` (or by pointing AWS_ENDPOINT_URL at an emulator).
"""

from __future__ import annotations

import threading
from typing import Any

import boto3
from botocore.config import Config

_CONFIG = Config(retries={"mode": "standard", "max_attempts": 5}, connect_timeout=5, read_timeout=60)
_clients: dict[str, Any] = {}
_lock = threading.Lock()


def client(service: str) -> Any:
    """Return the shared client for `service`, creating it on first use."""
    found = _clients.get(service)
    if found is None:
        with _lock:
            found = _clients.get(service)
            if found is None:
                found = boto3.session.Session().client(service, config=_CONFIG)
                _clients[service] = found
    return found


def set_client(service: str, value: Any) -> None:
    """Inject a client (a stub, or one bound to an emulator) for `service`."""
    with _lock:
        _clients[service] = value


def reset_clients() -> None:
    """Forget every cached client, e.g. after the endpoint or credentials changed."""
    with _lock:
        _clients.clear()
