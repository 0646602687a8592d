"""SageMaker training adapter: `CreateTrainingJob` runs the job's script for real, as a subprocess.

moto 5.2.5 records a training job as Completed the moment it is created, with no artefact. Here the job is
InProgress while `training/train.py` (downloaded from `sagemaker_submit_directory`, as the SageMaker
training toolkit does) runs under SageMaker's container contract: `/opt/ml`-style directories under a
temporary root, `SM_*` variables, hyperparameters as arguments. When it ends, `model.tar.gz` and
`output.tar.gz` go to the job's S3 output path and the job is Completed, or Failed with a FailureReason.
A `CheckpointConfig` is honoured as SageMaker does: its S3Uri is copied to `/opt/ml/checkpoints` before the
script starts and the directory is uploaded back when it ends. Spot capacity, network isolation and
inter-container encryption are accepted and recorded (DescribeTrainingJob shows them); locally there is no
spot interruption, no network to cut and one host.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from moto.core.responses import ActionResult
from moto.core.utils import utcnow
from moto.sagemaker import models as sagemaker_models
from moto.sagemaker import responses as sagemaker_responses
from moto.sagemaker.exceptions import ResourceInUseException, ValidationError

from conveyor.local.jobs import (
    JobRunner,
    encryption_args,
    environ_copy,
    requirement_lines,
    terminate,
    volume_key_refusal,
)

log = logging.getLogger("localcloud.training")
HOST = "algo-1"


def split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def download_prefix(s3: Any, uri: str, destination: Path) -> int:
    """Copy every object under an S3Prefix into `destination`, keeping paths below the prefix."""
    bucket, prefix = split_s3(uri)
    count = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            relative = obj["Key"][len(prefix) :].lstrip("/") or Path(obj["Key"]).name
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(target))
            count += 1
    return count


def upload_directory(s3: Any, directory: Path, uri: str, kms_key: str | None = None) -> int:
    """Upload every file below `directory` under the S3 prefix `uri` (encrypted with `kms_key` if given);
    the number of files."""
    bucket, prefix = split_s3(uri)
    prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    count = 0
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        s3.upload_file(
            str(path),
            bucket,
            prefix + path.relative_to(directory).as_posix(),
            ExtraArgs=encryption_args(kms_key),
        )
        count += 1
    return count


def tar_directory(directory: Path, archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(directory.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(directory)), recursive=False)


class TrainingAdapter(JobRunner):
    """Hooks `SageMakerModelBackend.create_training_job` and runs each job in a worker thread."""

    kind = "training"

    def __init__(self, s3_factory: Callable[[], Any], workdir: Path, python: str = sys.executable) -> None:
        super().__init__(s3_factory, workdir, python)
        self._original: Callable[..., Any] | None = None

    def job_name(self, job: Any) -> str:
        return str(job.training_job_name)

    def _fail(self, job: Any, reason: str) -> None:
        _finish(job, "Failed", failure_reason=reason)

    def install(self) -> None:
        backend = sagemaker_models.SageMakerModelBackend
        for name in ("create_training_job", "describe_training_job"):
            if not hasattr(backend, name):
                raise RuntimeError(
                    f"moto changed: SageMakerModelBackend.{name} is gone; see docs/local-mode.md"
                )
        self._original = backend.create_training_job
        adapter = self

        def create_training_job(backend_self: Any, *args: Any, **kwargs: Any) -> Any:
            name = kwargs.get("training_job_name", args[0] if args else None)
            if name in backend_self.training_jobs:
                raise ResourceInUseException(
                    f"Training job names must be unique within an AWS account and region, "
                    f"and a training job with this name already exists ({name})"
                )
            resources = kwargs.get("resource_config") or {}
            refusal = volume_key_refusal(resources.get("InstanceType", ""), resources.get("VolumeKmsKeyId"))
            if refusal:
                raise ValidationError(message=refusal)
            spec = kwargs.get("algorithm_specification") or {}
            requested_metrics = list(spec.get("MetricDefinitions") or [])
            assert adapter._original is not None
            job = adapter._original(backend_self, *args, **kwargs)
            # moto replaces the metric definitions with a canned one; keep what was asked for.
            job.algorithm_specification["MetricDefinitions"] = requested_metrics
            job.training_job_status = "InProgress"
            job.secondary_status = "Starting"
            job.training_end_time = None
            job.final_metric_data_list = []
            adapter.start(job)
            return job

        def stop_training_job(response_self: Any) -> ActionResult:
            # moto 5.2.5 has no StopTrainingJob: SageMaker's is "InProgress → Stopping → Stopped", with the
            # algorithm sent SIGTERM (the pipeline calls it when a polling loop runs out of polls).
            name = response_self._get_param("TrainingJobName")
            job = response_self.sagemaker_backend.training_jobs.get(name)
            if job is None:
                raise ValidationError(message=f"Requested resource not found: training job {name}")
            if job.training_job_status != "InProgress":
                raise ValidationError(
                    message=f"Training job {name} is {job.training_job_status}: only an InProgress job can be stopped"
                )
            job.training_job_status = "Stopping"
            adapter.stop(name)
            return ActionResult({})

        backend.create_training_job = create_training_job  # type: ignore[method-assign]
        sagemaker_responses.SageMakerResponse.stop_training_job = stop_training_job  # type: ignore[attr-defined]

    def uninstall(self) -> None:
        if self._original is not None:
            sagemaker_models.SageMakerModelBackend.create_training_job = self._original  # type: ignore[method-assign]
            self._original = None
        if hasattr(sagemaker_responses.SageMakerResponse, "stop_training_job"):
            del sagemaker_responses.SageMakerResponse.stop_training_job

    def _run(self, job: Any) -> None:
        name = job.training_job_name
        s3 = self._s3_factory()
        root = self._workdir / "training" / name
        if root.exists():
            shutil.rmtree(root)
        ml = root / "opt" / "ml"
        code, model, output_data = ml / "code", ml / "model", ml / "output" / "data"
        config = ml / "input" / "config"
        for directory in (code, model, output_data, config, ml / "checkpoints"):
            directory.mkdir(parents=True)

        job.secondary_status = "Downloading"
        channels: dict[str, str] = {}
        for channel in job.input_data_config:
            destination = ml / "input" / "data" / channel["ChannelName"]
            destination.mkdir(parents=True)
            uri = channel["DataSource"]["S3DataSource"]["S3Uri"]
            if download_prefix(s3, uri, destination) == 0:
                raise ValueError(f"channel {channel['ChannelName']}: no objects under {uri}")
            channels[channel["ChannelName"]] = str(destination)

        # CheckpointConfig: SageMaker copies what the S3Uri holds into LocalPath before the script starts
        # (a resumed spot job finds its last checkpoints there) and uploads LocalPath back.
        checkpoints = ml / "checkpoints"
        checkpoint_uri = (getattr(job, "checkpoint_config", None) or {}).get("S3Uri")
        if checkpoint_uri:
            download_prefix(s3, checkpoint_uri, checkpoints)

        hyperparameters: dict[str, str] = dict(job.hyper_parameters or {})
        submit = hyperparameters.get("sagemaker_submit_directory")
        program = hyperparameters.get("sagemaker_program", "train.py")
        if not submit:
            raise ValueError("no sagemaker_submit_directory hyperparameter: nothing to run")
        archive = root / "sourcedir.tar.gz"
        if submit.startswith("/opt/ml/"):
            # A path in the container, as for a network-isolated job: the "code" channel brought it.
            local = ml / submit[len("/opt/ml/") :]
            if not local.is_file():
                raise ValueError(f"sagemaker_submit_directory {submit} is not in any input channel")
            shutil.copyfile(local, archive)
        else:
            s3.download_file(*split_s3(submit), str(archive))
        with tarfile.open(archive) as tar:
            tar.extractall(code, filter="data")
        packages = install_requirements(code, root / "packages", self._python)

        (config / "hyperparameters.json").write_text(json.dumps(hyperparameters))
        (config / "inputdataconfig.json").write_text(
            json.dumps({c["ChannelName"]: {"TrainingInputMode": "File"} for c in job.input_data_config})
        )
        hosts = [f"algo-{i}" for i in range(1, int((job.resource_config or {}).get("InstanceCount", 1)) + 1)]
        (config / "resourceconfig.json").write_text(json.dumps({"current_host": HOST, "hosts": hosts}))
        user_hps = {k: v for k, v in hyperparameters.items() if not k.startswith("sagemaker_")}
        arguments = [item for k, v in user_hps.items() for item in (f"--{k}", str(v))]
        environment = {
            **environ_copy(),
            "PYTHONUNBUFFERED": "1",
            "TRAINING_JOB_NAME": name,
            "SM_MODEL_DIR": str(model),
            "SM_OUTPUT_DIR": str(ml / "output"),
            "SM_OUTPUT_DATA_DIR": str(output_data),
            "SM_INPUT_DIR": str(ml / "input"),
            "SM_INPUT_CONFIG_DIR": str(config),
            "SM_CHECKPOINT_DIR": str(ml / "checkpoints"),
            "SM_CHANNELS": json.dumps(sorted(channels)),
            "SM_HPS": json.dumps(user_hps),
            "SM_USER_ARGS": json.dumps(arguments),
            "SM_HOSTS": json.dumps(hosts),
            "SM_CURRENT_HOST": HOST,
            "SM_NUM_GPUS": "0",
            "SM_NUM_CPUS": str(os.cpu_count() or 1),
            "SM_MODULE_DIR": submit,
            "SM_MODULE_NAME": Path(program).stem,
            **{f"SM_CHANNEL_{c.upper()}": path for c, path in channels.items()},
            **{f"SM_HP_{k.upper()}": str(v) for k, v in user_hps.items()},
        }
        if packages:  # what the container installed comes first, as its site-packages would
            environment["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(packages), environment.get("PYTHONPATH")])
            )
        # Local jobs must not inherit the emulator's credentials or endpoint: a real job has neither.
        for key in ("AWS_ENDPOINT_URL", "MOTO_PORT"):
            environment.pop(key, None)

        command = [self._python, program, *arguments]
        distributed = hyperparameters.get("sagemaker_torch_distributed_enabled", "").lower() == "true"
        if distributed and len(hosts) > 1:
            # SageMaker's torch_distributed: torchrun on every host, one process per GPU (one on a CPU
            # host). Local mode runs each host's process on this machine, talking over gloo; one host's
            # single process needs no torchrun.
            command[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={len(hosts)}"]
        elif len(hosts) > 1:
            log.warning(
                "training job %s: %d instances but no distribution: SageMaker would run %s on each, "
                "independently; local mode runs it once",
                name,
                len(hosts),
                program,
            )
        job.secondary_status = "Training"
        log.info("training job %s: running %s", name, " ".join(command[1:]))
        max_runtime = int((job.stopping_condition or {}).get("MaxRuntimeInSeconds", 86400))
        log_path = root / "training.log"
        with self._lock:
            if name in self._stopped:  # stopped while its inputs were downloading
                _finish(job, "Stopped", secondary="Stopped")
                return
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                command,
                cwd=code,
                env=environment,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            with self._lock:
                self._processes[name] = process
                stopped_while_starting = name in self._stopped
            if stopped_while_starting:
                terminate(process)
            metrics = _MetricScraper(job.algorithm_specification.get("MetricDefinitions") or [])
            timer = threading.Timer(max_runtime, terminate, args=(process,))
            timer.start()
            started = time.monotonic()
            assert process.stdout is not None
            for line in process.stdout:
                log_file.write(line)
                text = line.decode("utf-8", "replace").rstrip()
                metrics.scan(text)
                log.debug("[%s] %s", name, text)
            returncode = process.wait()
            timer.cancel()
            with self._lock:
                self._processes.pop(name, None)
        job.final_metric_data_list = metrics.final()
        elapsed = time.monotonic() - started
        # SageMaker encrypts the model, the output and the checkpoints with OutputDataConfig's key.
        output_key = (job.output_data_config or {}).get("KmsKeyId")
        if checkpoint_uri:
            # Uploaded however the job ended, as SageMaker does, so a stopped job can be resumed.
            upload_directory(s3, checkpoints, checkpoint_uri, output_key)

        with self._lock:
            stopped = name in self._stopped
        if stopped:
            log.info("training job %s stopped after %.1f s", name, elapsed)
            _finish(job, "Stopped", secondary="Stopped", seconds=elapsed)
        elif returncode == 0:
            job.secondary_status = "Uploading"
            bucket, key = split_s3(job.model_artifacts["S3ModelArtifacts"])
            tar_directory(model, root / "model.tar.gz")
            tar_directory(output_data, root / "output.tar.gz")
            extra = encryption_args(output_key)
            s3.upload_file(str(root / "model.tar.gz"), bucket, key, ExtraArgs=extra)
            output_key_name = key.rsplit("/", 1)[0] + "/output.tar.gz"
            s3.upload_file(str(root / "output.tar.gz"), bucket, output_key_name, ExtraArgs=extra)
            log.info("training job %s completed in %.1f s", name, elapsed)
            _finish(job, "Completed", seconds=elapsed)
        elif elapsed >= max_runtime:
            _finish(
                job,
                "Stopped",
                secondary="MaxRuntimeExceeded",
                seconds=elapsed,
                failure_reason=f"Training job reached its MaxRuntimeInSeconds ({max_runtime})",
            )
        else:
            failure_file = ml / "output" / "failure"
            if failure_file.exists() and failure_file.read_text().strip():
                reason = f"AlgorithmError: {failure_file.read_text().strip()}"
            elif returncode < 0:
                # Killed by a signal: a container reports 128 + the signal number (137 for SIGKILL, which is
                # what the kernel's OOM killer sends).
                reason = (
                    f"AlgorithmError: ExecuteUserScriptError: the training process was killed by "
                    f"{signal.Signals(-returncode).name} (exit code {128 - returncode}): out of memory, or "
                    "killed from outside; a bigger TrainingInstanceType or a smaller batch_size helps with memory"
                )
            else:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                reason = f"AlgorithmError: ExecuteUserScriptError: exit code {returncode}: " + " | ".join(
                    tail
                )
            log.warning("training job %s failed: %s", name, reason)
            _finish(job, "Failed", failure_reason=reason[:1024], seconds=elapsed)


def _finish(
    job: Any,
    status: str,
    *,
    secondary: str | None = None,
    failure_reason: str | None = None,
    seconds: float | None = None,
) -> None:
    if failure_reason:
        job.failure_reason = failure_reason
    if seconds is not None:
        job.training_time_in_seconds = int(seconds)
        job.billable_time_in_seconds = int(seconds)
    job.training_end_time = job.last_modified_time = utcnow()
    job.secondary_status = secondary or status
    # Last, because the pipeline's polling loop acts on it.
    job.training_job_status = status


def install_requirements(code: Path, target: Path, python: str) -> Path | None:
    """What the training container does before it starts the script: pip-install the code's
    requirements.txt (here into `target`, not the environment conveyor runs in). A sourcedir from
    `training_sourcedir` installs from its own wheelhouse, without an index, as a network-isolated job must.

    Returns
    -------
    Path or None
        `target` when something was installed (it goes on the job's PYTHONPATH), else None.

    Raises
    ------
    ValueError
        With pip's reason, when a requirement cannot be installed (the job fails, as SageMaker's would).
    """
    listed = code / "requirements.txt"
    if not listed.exists() or not requirement_lines(listed.read_text()):
        return None
    command = [python, "-m", "pip", "install", "--quiet", "--target", str(target), "-r", "requirements.txt"]
    completed = subprocess.run(command, cwd=code, capture_output=True, text=True, timeout=600)
    if completed.returncode != 0:
        raise ValueError(f"requirements.txt could not be installed: {completed.stderr.strip()[-800:]}")
    return target


class _MetricScraper:
    """What SageMaker does with MetricDefinitions: scrape the job's log; the last value of each wins."""

    def __init__(self, definitions: list[dict[str, str]]) -> None:
        self._patterns = [(d["Name"], re.compile(d["Regex"])) for d in definitions]
        self._latest: dict[str, float] = {}

    def scan(self, line: str) -> None:
        for name, pattern in self._patterns:
            match = pattern.search(line)
            if match:
                with contextlib.suppress(ValueError, IndexError):
                    self._latest[name] = float(match.group(1))

    def final(self) -> list[dict[str, Any]]:
        now = utcnow()
        return [{"MetricName": n, "Value": v, "Timestamp": now} for n, v in sorted(self._latest.items())]
