"""Checkpoints, so a spot interruption costs minutes: the whole training state, written every N optimizer
steps and at the end of every epoch to the checkpoint directory (SageMaker's CheckpointConfig.LocalPath,
``/opt/ml/checkpoints``, which SageMaker copies to and from S3), and read back when the job starts again.

A checkpoint is named after a fingerprint of what it trains (dataset version, hyperparameters, number of
processes): a job only ever resumes its own training, and never overwrites another one's checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("train")
# SageMaker's CheckpointConfig.LocalPath default; `SM_CHECKPOINT_DIR` points elsewhere (local mode, tests).
DEFAULT_DIRECTORY = "/opt/ml/checkpoints"


def checkpoint_directory() -> Path | None:
    """Where checkpoints go: `SM_CHECKPOINT_DIR`, else /opt/ml/checkpoints when the job has one, else
    nowhere (a job without CheckpointConfig, a laptop run)."""
    named = os.environ.get("SM_CHECKPOINT_DIR")
    if named:
        return Path(named)
    default = Path(DEFAULT_DIRECTORY)
    return default if default.is_dir() else None


class Checkpoints:
    """The checkpoint of one training: `load` it when a job starts, `save` it as training goes."""

    def __init__(self, directory: Path | None, fingerprint: dict[str, Any], every_steps: int) -> None:
        self.every_steps = every_steps
        digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()
        self.path = None if directory is None else directory / f"checkpoint-{digest[:16]}.pt"
        self.fingerprint = fingerprint

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def due(self, step: int) -> bool:
        return self.enabled and self.every_steps > 0 and step % self.every_steps == 0

    def load(self) -> dict[str, Any] | None:
        """The saved state of this training, or None when there is none (a first start)."""
        if self.path is None or not self.path.exists():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if state.get("fingerprint") != self.fingerprint:  # a hash collision; never resume someone else's
            log.warning("ignoring %s: it belongs to another training", self.path)
            return None
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Write atomically (a half-written file is never read back): a temporary file, then a rename."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        torch.save({**state, "fingerprint": self.fingerprint}, partial)
        os.replace(partial, self.path)
