"""SageMaker Processing adapter: `CreateProcessingJob` runs the job's container command for real, as a subprocess.

moto 5.2.5 records a processing job as Completed the moment it is created, runs nothing, accepts a duplicate
name, and drops `Environment` and `ProcessingResources` from the request. Here the job is InProgress while
its `ContainerEntrypoint` + `ContainerArguments` run (`python3` is this interpreter) under SageMaker
Processing's container contract, with the container's /opt/ml moved under a temporary root:

- each `S3Input` is copied to its `LocalPath` (`S3Prefix`, `File` mode; keys keep their path below the
  prefix's last `/`, as SageMaker does), `/opt/ml/config/processingjobconfig.json` holds the request;
- the job's `Environment` is set, every value and argument starting with /opt/ml moved like the paths,
  and `CONVEYOR_OPT_ML` says where /opt/ml is;
- exit status 0 → each `S3Output`'s `LocalPath` is uploaded and the job is Completed; otherwise Failed with
  a `FailureReason`; past `MaxRuntimeInSeconds` it is Stopped. `/opt/ml/output/message` becomes `ExitMessage`.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from moto.core.responses import ActionResult
from moto.core.utils import utcnow
from moto.sagemaker import models as sagemaker_models
from moto.sagemaker import responses as sagemaker_responses
from moto.sagemaker.exceptions import ResourceInUseException, ValidationError

from conveyor.local.jobs import JobRunner, encryption_args, environ_copy, terminate, volume_key_refusal
from conveyor.local.training import split_s3

log = logging.getLogger("localcloud.processing")
HOST = "algo-1"
CONTAINER_OPT_ML = "/opt/ml"
EXIT_MESSAGE_BYTES = 1024


def download_input(s3: Any, uri: str, destination: Path) -> int:
    """Copy an `S3Prefix` input: every object under the prefix, at its path below the prefix's last `/`."""
    bucket, prefix = split_s3(uri)
    base = prefix[: prefix.rfind("/") + 1]
    count = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            relative = PurePosixPath(obj["Key"][len(base) :])
            if obj["Key"].endswith("/") or ".." in relative.parts:
                continue
            target = destination.joinpath(*relative.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(target))
            count += 1
    return count


def upload_output(s3: Any, source: Path, uri: str, kms_key: str | None = None) -> int:
    """Upload every file under `source` to the `S3Output` URI, keeping relative paths (encrypted with
    `kms_key`, ProcessingOutputConfig's KmsKeyId, if given)."""
    bucket, prefix = split_s3(uri)
    count = 0
    for path in sorted(source.rglob("*")):
        if path.is_file():
            key = prefix.rstrip("/") + "/" + path.relative_to(source).as_posix() if prefix else path.name
            s3.upload_file(str(path), bucket, key, ExtraArgs=encryption_args(kms_key))
            count += 1
    return count


class ProcessingAdapter(JobRunner):
    """Hooks `SageMakerResponse.create_processing_job` and `SageMakerModelBackend.stop_processing_job`.

    CreateProcessingJob is hooked at moto's handler, not its backend: the handler is where moto drops the
    request's `Environment` and `ProcessingResources`, which the job needs and DescribeProcessingJob shows.
    """

    kind = "processing"

    def __init__(self, s3_factory: Callable[[], Any], workdir: Path, python: str = sys.executable) -> None:
        super().__init__(s3_factory, workdir, python)
        self._originals: dict[tuple[type, str], Callable[..., Any]] = {}

    def job_name(self, job: Any) -> str:
        return str(job.processing_job_name)

    def _fail(self, job: Any, reason: str) -> None:
        _finish(job, "Failed", failure_reason=reason)

    def install(self) -> None:
        backend = sagemaker_models.SageMakerModelBackend
        handler = sagemaker_responses.SageMakerResponse
        hooks = [(handler, "create_processing_job"), (backend, "stop_processing_job")]
        for owner, name in [*hooks, (backend, "describe_processing_job")]:
            if not hasattr(owner, name):
                raise RuntimeError(f"moto changed: {owner.__name__}.{name} is gone; see docs/local-mode.md")
        self._originals = {hook: getattr(*hook) for hook in hooks}
        create, stop = (self._originals[hook] for hook in hooks)
        adapter = self

        def create_processing_job(response_self: Any) -> ActionResult:
            name = response_self._get_param("ProcessingJobName")
            jobs = response_self.sagemaker_backend.processing_jobs
            if name in jobs:
                raise ResourceInUseException(
                    "Processing job names must be unique within an AWS account and region, "
                    f"and a processing job with this name already exists ({name})"
                )
            cluster = (response_self._get_param("ProcessingResources") or {}).get("ClusterConfig") or {}
            refusal = volume_key_refusal(cluster.get("InstanceType", ""), cluster.get("VolumeKmsKeyId"))
            if refusal:
                raise ValidationError(message=refusal)
            result = create(response_self)
            job = jobs[name]
            job.environment = response_self._get_param("Environment") or {}
            job.processing_resources = response_self._get_param("ProcessingResources")
            job.processing_job_status = "InProgress"
            job.processing_start_time = utcnow()
            job.processing_end_time = None
            adapter.start(job)
            return result

        def stop_processing_job(backend_self: Any, processing_job_name: str) -> None:
            job = backend_self.processing_jobs.get(processing_job_name)
            if job is None:
                stop(backend_self, processing_job_name)  # moto's "Could not find processing job"
                return
            if job.processing_job_status != "InProgress":
                raise ValidationError(
                    message=f"Processing job {processing_job_name} is {job.processing_job_status}: "
                    "only an InProgress job can be stopped"
                )
            job.processing_job_status = "Stopping"
            adapter.stop(processing_job_name)

        handler.create_processing_job = create_processing_job  # type: ignore[method-assign,assignment]
        backend.stop_processing_job = stop_processing_job  # type: ignore[method-assign,assignment]

    def uninstall(self) -> None:
        for (owner, name), original in self._originals.items():
            setattr(owner, name, original)
        self._originals = {}

    def _run(self, job: Any) -> None:
        name = job.processing_job_name
        s3 = self._s3_factory()
        root = self._workdir / "processing" / name
        if root.exists():
            shutil.rmtree(root)
        opt_ml = root / "opt" / "ml"

        def local(path: str) -> str:
            """The container path `path` on this machine (only /opt/ml is moved)."""
            if path == CONTAINER_OPT_ML or path.startswith(CONTAINER_OPT_ML + "/"):
                return str(opt_ml) + path[len(CONTAINER_OPT_ML) :]
            return path

        request = {
            "ProcessingJobArn": job.arn,
            "ProcessingJobName": name,
            "AppSpecification": job.app_specification,
            "ProcessingInputs": job.processing_inputs or [],
            "ProcessingOutputConfig": job.processing_output_config or {"Outputs": []},
            "StoppingCondition": job.stopping_condition or {},
            "Environment": dict(getattr(job, "environment", None) or {}),
            "RoleArn": job.role_arn,
        }
        for item in request["ProcessingInputs"]:
            s3_input = item.get("S3Input")
            if s3_input is None:
                raise ValueError(f"input {item.get('InputName')}: only S3Input is supported locally")
            if s3_input.get("S3DataType", "S3Prefix") != "S3Prefix" or s3_input.get("S3InputMode") == "Pipe":
                raise ValueError(f"input {item['InputName']}: only S3Prefix inputs in File mode run locally")
            destination = Path(local(s3_input["LocalPath"]))
            destination.mkdir(parents=True, exist_ok=True)
            if download_input(s3, s3_input["S3Uri"], destination) == 0:
                raise ValueError(f"input {item['InputName']}: no objects under {s3_input['S3Uri']}")
        outputs = [
            item for item in request["ProcessingOutputConfig"].get("Outputs", []) if "S3Output" in item
        ]
        for item in outputs:
            Path(local(item["S3Output"]["LocalPath"])).mkdir(parents=True, exist_ok=True)
        (opt_ml / "output").mkdir(parents=True, exist_ok=True)
        config = opt_ml / "config"
        config.mkdir(parents=True)
        # What the container sees: the request with its own paths (here, moved under the root).
        (config / "processingjobconfig.json").write_text(json.dumps(_moved(request, local), default=str))
        (config / "resourceconfig.json").write_text(json.dumps({"current_host": HOST, "hosts": [HOST]}))

        app = request["AppSpecification"]
        command = [
            local(part) for part in [*app.get("ContainerEntrypoint", []), *app.get("ContainerArguments", [])]
        ]
        if not command:
            raise ValueError(
                "the job has no ContainerEntrypoint: local mode cannot run an image's own entrypoint"
            )
        if PurePosixPath(command[0]).name in ("python", "python3") or command[0].startswith("python3."):
            command[0] = self._python
        environment = {
            **environ_copy(),
            **{key: local(value) for key, value in request["Environment"].items()},
            "CONVEYOR_OPT_ML": str(opt_ml),
        }
        # A local job must not inherit the emulator's endpoint: a real one reads and writes only its paths.
        for key in ("AWS_ENDPOINT_URL", "MOTO_PORT"):
            environment.pop(key, None)

        max_runtime = int(request["StoppingCondition"].get("MaxRuntimeInSeconds", 86400))
        log.info("processing job %s: running %s", name, " ".join(command))
        log_path = root / "processing.log"
        started = time.monotonic()
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                command,
                cwd=root,
                env=environment,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            with self._lock:
                self._processes[name] = process
                stopped_while_starting = name in self._stopped
            if stopped_while_starting:
                terminate(process)
            timer = threading.Timer(max_runtime, self.stop, args=(name,))
            timer.start()
            returncode = process.wait()
            timer.cancel()
            with self._lock:
                self._processes.pop(name, None)
                stopped = name in self._stopped
        elapsed = time.monotonic() - started
        message_file = opt_ml / "output" / "message"
        message = (
            message_file.read_bytes()[:EXIT_MESSAGE_BYTES].decode("utf-8", "replace")
            if message_file.exists()
            else ""
        )
        if message:
            job.exit_message = message

        if stopped:
            reason = (
                f"Processing job reached its MaxRuntimeInSeconds ({max_runtime})"
                if elapsed >= max_runtime
                else "Stopped by StopProcessingJob"
            )
            _finish(job, "Stopped", failure_reason=reason)
        elif returncode == 0:
            for item in outputs:
                s3_output = item["S3Output"]
                output_key = request["ProcessingOutputConfig"].get("KmsKeyId")
                upload_output(s3, Path(local(s3_output["LocalPath"])), s3_output["S3Uri"], output_key)
            log.info("processing job %s completed in %.1f s", name, elapsed)
            _finish(job, "Completed")
        else:
            detail = message or " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-5:])
            reason = f"AlgorithmError: exit code {returncode}: {detail}"
            log.warning("processing job %s failed: %s", name, reason)
            _finish(job, "Failed", failure_reason=reason[:1024])


def _moved(value: Any, local: Callable[[str], str]) -> Any:
    if isinstance(value, dict):
        return {k: (local(v) if k == "LocalPath" else _moved(v, local)) for k, v in value.items()}
    if isinstance(value, list):
        return [_moved(v, local) for v in value]
    return value


def _finish(job: Any, status: str, *, failure_reason: str | None = None) -> None:
    if failure_reason:
        job.failure_reason = failure_reason
    job.processing_end_time = job.last_modified_time = utcnow()
    # Last, because the pipeline's polling loop acts on it.
    job.processing_job_status = status
