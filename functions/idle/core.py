"""Which endpoints are idle, as pure functions (IdleEndpointsFunction's logic).

An endpoint of the stack that has answered no request for `days` days, and was not updated in that time,
is deleted to stop its instances billing. Its endpoint config, model and model package stay: the next
upload of the dataset creates the endpoint again, and the registry keeps the history.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class Endpoint:
    name: str
    status: str
    last_modified: datetime
    invocations: float  # in the idle window


def idle(endpoint: Endpoint, days: int, now: datetime) -> str | None:
    """Why `endpoint` should be deleted, or None to keep it."""
    if days <= 0 or endpoint.status != "InService":
        return None
    if now - endpoint.last_modified < timedelta(days=days):
        return None
    if endpoint.invocations > 0:
        return None
    return f"no invocations in {days} days (last changed {endpoint.last_modified:%Y-%m-%d})"
