"""What the local SageMaker job adapters (training, processing) share: each job runs in a worker thread as a
subprocess in its own process group; a job can be stopped; an error in the adapter itself fails the job
(with the reason SageMaker would show) instead of leaving it InProgress forever."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("localcloud.jobs")

# Instance families whose instances have local NVMe storage, which a hardware module encrypts: SageMaker
# refuses a volume KMS key on them (CreateTrainingJob, CreateProcessingJob, CreateEndpointConfig). The
# template's <Role>HasLocalStorage conditions list the same families (tests/unit/test_sagemaker_parameters.py).
LOCAL_STORAGE_FAMILIES = frozenset(
    {
        *("g4dn", "g5", "g6", "g6e"),
        *("p3dn", "p4d", "p4de", "p5", "p5e", "p5en", "p6-b200"),
        *("trn1", "trn1n", "trn2"),
        *("c5d", "m5d", "r5d", "c6id", "m6id", "r6id", "c6gd", "m6gd", "r6gd"),
    }
)


def environ_copy() -> dict[str, str]:
    """A copy of `os.environ` for a subprocess, safe while the in-process Lambda runtime changes it from
    another thread (copying iterates the keys, then looks each up: one removed in between raises)."""
    while True:
        try:
            return dict(os.environ)
        except (KeyError, RuntimeError):  # changed while being copied: copy again
            continue


def volume_key_refusal(instance_type: str, volume_key: str | None) -> str | None:
    """SageMaker's reason to refuse a request that puts `volume_key` on `instance_type`, or None."""
    parts = instance_type.split(".")
    if volume_key and len(parts) == 3 and parts[1] in LOCAL_STORAGE_FAMILIES:
        return (
            f"Instance type {instance_type} is not supported with a volume KMS key: its local storage is "
            "encrypted by a hardware module; do not specify VolumeKmsKeyId"
        )
    return None


def requirement_lines(text: str) -> list[str]:
    """The requirements of a requirements.txt: no comments, blank lines or pip options."""
    lines = (line.split(" #")[0].strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith(("#", "-"))]


def encryption_args(kms_key: str | None) -> dict[str, Any] | None:
    """upload_file's ExtraArgs for an output SageMaker encrypts with `kms_key` (None: the bucket's default)."""
    return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": kms_key} if kms_key else None


class JobRunner:
    """Base of the job adapters. Subclasses name their `kind`, and implement `job_name`, `_run` (the job,
    start to finish, registering its process in `_processes` under `_lock`) and `_fail`."""

    kind = "job"

    def __init__(self, s3_factory: Callable[[], Any], workdir: Path, python: str = sys.executable) -> None:
        self._s3_factory = s3_factory
        self._workdir = workdir
        self._python = python
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._stopped: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def job_name(self, job: Any) -> str:
        raise NotImplementedError

    def _run(self, job: Any) -> None:
        raise NotImplementedError

    def _fail(self, job: Any, reason: str) -> None:
        raise NotImplementedError

    def start(self, job: Any) -> None:
        thread = threading.Thread(
            target=self._run_safely, args=(job,), name=f"{self.kind}-{self.job_name(job)}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def process(self, name: str) -> subprocess.Popen[bytes] | None:
        """The running process of job `name` (None once it has ended), e.g. for the fault-injection suite."""
        with self._lock:
            return self._processes.get(name)

    def stop(self, name: str) -> None:
        with self._lock:
            self._stopped.add(name)
            process = self._processes.get(name)
        if process is not None:
            terminate(process)

    def stop_all(self) -> None:
        with self._lock:
            names = list(self._processes)
        for name in names:
            self.stop(name)
        for thread in self._threads:
            thread.join(timeout=10)

    def _run_safely(self, job: Any) -> None:
        try:
            self._run(job)
        except Exception as exc:
            log.exception("%s job %s could not run", self.kind, self.job_name(job))
            self._fail(job, f"ClientError: {exc}")


def terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the job's process group (what SageMaker sends on StopTrainingJob), SIGKILL after 10 s."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
