"""Turn the event shapes that reach conveyor into plain references to uploaded S3 objects.

Handled shapes (examples in tests/events/): an S3 event notification delivered through SQS, the
`s3:TestEvent` S3 sends when notifications are configured, and an EventBridge "Object Created" event
(directly or through SQS).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus


@dataclass(frozen=True)
class ObjectRef:
    """One version of one uploaded object, as the event describes it."""

    bucket: str
    key: str
    size: int | None = None
    etag: str | None = None
    version_id: str | None = None


def objects_in_message(body: str | dict[str, Any]) -> list[ObjectRef]:
    """Return the created objects an SQS message body announces (none for a test event).

    Raises
    ------
    ValueError
        The body is neither an S3 notification nor an EventBridge event.
    """
    message = json.loads(body) if isinstance(body, str) else body
    if not isinstance(message, dict):
        raise ValueError("message body is not a JSON object")
    if message.get("Event") == "s3:TestEvent":
        return []
    if "Records" in message:
        return [_from_s3_record(r) for r in message["Records"] if _is_object_created(r)]
    if message.get("source") == "aws.s3" and message.get("detail-type") == "Object Created":
        return [_from_eventbridge(message)]
    raise ValueError("message is neither an S3 event notification nor an EventBridge S3 event")


def _is_object_created(record: dict[str, Any]) -> bool:
    return record.get("eventSource") == "aws:s3" and str(record.get("eventName", "")).startswith(
        "ObjectCreated:"
    )


def _from_s3_record(record: dict[str, Any]) -> ObjectRef:
    s3 = record["s3"]
    obj = s3["object"]
    # S3 notifications URL-encode keys (a space arrives as '+'); unquote_plus undoes both forms.
    return ObjectRef(
        bucket=s3["bucket"]["name"],
        key=unquote_plus(obj["key"]),
        size=obj.get("size"),
        etag=obj.get("eTag"),
        version_id=obj.get("versionId"),
    )


def _from_eventbridge(event: dict[str, Any]) -> ObjectRef:
    detail = event["detail"]
    obj = detail["object"]
    # EventBridge carries the key as it is, not URL-encoded.
    return ObjectRef(
        bucket=detail["bucket"]["name"],
        key=obj["key"],
        size=obj.get("size"),
        etag=obj.get("etag"),
        version_id=obj.get("version-id"),
    )
