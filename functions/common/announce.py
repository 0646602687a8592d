"""conveyor's EventBridge events: what the pipeline and its functions tell the account's default bus.

Every outcome a subscriber of the SNS topic hears is also an event with source `conveyor`, so rules can
route them (to a chat channel, a ticket, another pipeline) without subscribing to the topic. The
detail is the same summary the SNS message carries. The state machine emits the pipeline's own outcomes
(infra/statemachine/pipeline.asl.json, `Announce*` states); the functions emit the ones they decide.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from common import aws

SOURCE = "conveyor"
BUS = "default"
DETAIL_TYPES = {
    "deployed": "Model Deployed",
    "rejected": "Model Rejected",
    "quarantined": "Dataset Quarantined",
    "failed": "Pipeline Failed",
    "aborted": "Pipeline Aborted",
    "timed_out": "Pipeline Aborted",
}
log = logging.getLogger(__name__)


def announce(summary: dict[str, Any]) -> bool:
    """Put `summary` (which has an `outcome`) on the default bus; False, logged, if EventBridge refused it.

    An event that cannot be delivered never undoes what it reports (the SNS message and the report are
    already out), so a refusal is logged rather than raised.
    """
    entry = {
        "Source": SOURCE,
        "DetailType": DETAIL_TYPES[summary["outcome"]],
        "Detail": json.dumps(summary, default=str),
        "EventBusName": BUS,
    }
    try:
        answer = aws.client("events").put_events(Entries=[entry])
    except Exception as exc:  # any failure to announce is reported the same way
        log.error("event not delivered: %s", exc, extra={"detail_type": entry["DetailType"]})
        return False
    if answer.get("FailedEntryCount"):
        failure = answer["Entries"][0]
        log.error(
            "event not delivered: %s %s",
            failure.get("ErrorCode"),
            failure.get("ErrorMessage"),
            extra={"detail_type": entry["DetailType"]},
        )
        return False
    return True
