"""Errors that carry what a user needs to act on them."""

from __future__ import annotations

from typing import Any


class DatasetRejected(Exception):
    """An uploaded file cannot be used for training; it is quarantined with this reason.

    Parameters
    ----------
    reason
        One human-readable sentence: what is wrong and what to do about it.
    details
        Extra facts for the quarantine report (line numbers, samples, counts).
    """

    def __init__(self, reason: str, **details: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.details = details
