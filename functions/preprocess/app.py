"""PreprocessFunction: S3 uploads (through SQS) → validated splits + manifest → one pipeline execution.

Each SQS message is reported on its own (partial batch responses): a bad file is quarantined and
acknowledged, a transient failure is retried and, after the queue's maxReceiveCount, lands in the DLQ.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import posixpath
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import smart_open
from aws_lambda_powertools import Logger, Tracer, single_metric
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.exceptions import ClientError

from common import aws, base_models, instances
from common.announce import announce
from common.config import Settings
from common.errors import DatasetRejected
from common.events import ObjectRef, objects_in_message
from common.naming import (
    PREPROCESSING_CODE_PREFIX,
    SUBMIT_DIRECTORY,
    SUBMIT_DIRECTORY_HF,
    ResourceNames,
    data_version,
    execution_name,
    object_identity,
    processing_job_name,
    slugify,
)
from common.telemetry import make_metrics
from preprocess import images
from preprocess.core import SUFFIXES, DatasetSpec, Limits, format_of, preprocess
from preprocess.resources import training_resources

logger = Logger()
tracer = Tracer()
metrics = make_metrics()
processor = BatchProcessor(event_type=EventType.SQS)

DATASETS_PREFIX = "datasets/"
SPEC_FILE = "conveyor.json"
# A zip is copied to /tmp (EphemeralStorage) to be read; at most this share of the free space there.
TMP_SHARE = 0.9


def dataset_of(key: str) -> str | None:
    """`datasets/<name>/<file>` → `<name>`; None for keys conveyor does not train on (folder markers, the
    spec file, keys outside datasets/, a dataset folder named `.` or `..`)."""
    if not key.startswith(DATASETS_PREFIX) or key.endswith("/"):
        return None
    parts = key[len(DATASETS_PREFIX) :].split("/")
    if len(parts) < 2 or parts[0] in ("", ".", "..") or parts[-1] == SPEC_FILE:
        return None
    return parts[0]


def _check_key(key: str, name: str) -> str:
    """The format of a dataset file's key, or the reason it cannot be one."""
    if any(part in ("", ".", "..") for part in key[len(DATASETS_PREFIX) :].split("/")):
        raise DatasetRejected(
            "the key has an empty, '.' or '..' path segment; upload the file as datasets/<name>/<file>",
            key=key,
        )
    fmt = format_of(key)
    if fmt is None:
        raise DatasetRejected(
            f"unsupported file type: upload {', '.join(SUFFIXES)} files under datasets/{name}/", key=key
        )
    return fmt


@tracer.capture_method
def process_object(ref: ObjectRef, settings: Settings) -> dict[str, Any]:
    """Preprocess one uploaded object version and start its pipeline execution (idempotently)."""
    name = dataset_of(ref.key)
    if name is None:
        logger.info(
            "ignored: not a dataset file (outside datasets/<name>/, a folder marker or conveyor.json)",
            extra={"bucket": ref.bucket, "key": ref.key},
        )
        return {"status": "ignored", "key": ref.key}
    if ref.size == 0:
        logger.info("ignored: zero-byte object", extra={"key": ref.key})
        return {"status": "ignored", "key": ref.key}

    s3 = aws.client("s3")
    head = s3.head_object(Bucket=ref.bucket, Key=ref.key, **_version_arg(ref.version_id))
    version_id = head.get("VersionId") or ref.version_id
    etag = head.get("ETag") or ref.etag
    identity = object_identity(ref.bucket, ref.key, version_id, etag)
    try:
        slug = slugify(name)
    except ValueError as exc:
        logger.warning("ignored: the dataset folder name has no letters or digits", extra={"key": ref.key})
        return {"status": "ignored", "key": ref.key, "reason": str(exc)}
    version = data_version(head["LastModified"], identity)
    logger.append_keys(dataset=slug, version=version)
    logger.set_correlation_id(f"{slug}/{version}")
    provenance = {
        "dataset": slug,
        "version": version,
        "source": {
            "bucket": ref.bucket,
            "key": ref.key,
            "version_id": version_id,
            "etag": etag,
            "size": head.get("ContentLength"),
        },
    }
    try:
        fmt = _check_key(ref.key, name)
        spec = _read_spec(ref.bucket, name)
        manifest = _manifest_if_done(settings, slug, version)
        if manifest is None and too_big_for_lambda(head.get("ContentLength"), settings, fmt):
            return _hand_to_processing_job(spec, provenance, settings, execution_name(slug, identity))
        manifest = manifest or _preprocess(ref, version_id, spec, provenance, settings, fmt)
        execution_input = _execution_input(manifest, spec, settings)
    except DatasetRejected as rejected:
        return _quarantine(rejected, provenance, settings)

    started = _start_pipeline(settings, execution_name(slug, identity), execution_input)
    return {"status": "started" if started else "duplicate", "dataset": slug, "version": version}


def _version_arg(version_id: str | None) -> dict[str, str]:
    return {"VersionId": version_id} if version_id and version_id != "null" else {}


def _read_spec(bucket: str, name: str) -> DatasetSpec:
    try:
        body = aws.client("s3").get_object(Bucket=bucket, Key=f"{DATASETS_PREFIX}{name}/{SPEC_FILE}")["Body"]
    except ClientError as error:
        if error.response["Error"]["Code"] in ("NoSuchKey", "404"):
            return DatasetSpec()
        raise
    try:
        return DatasetSpec.from_json(json.loads(body.read()))
    except json.JSONDecodeError as exc:
        raise DatasetRejected(f"{SPEC_FILE} is not valid JSON: {exc}") from None


def _processed_uri(settings: Settings, slug: str, version: str, *parts: str) -> str:
    return f"s3://{settings.require('processed_bucket')}/{posixpath.join(slug, version, *parts)}"


def _manifest_if_done(settings: Settings, slug: str, version: str) -> dict[str, Any] | None:
    """A replayed event finds the manifest of its version already written: reuse it, write nothing."""
    try:
        body = aws.client("s3").get_object(
            Bucket=settings.require("processed_bucket"), Key=f"{slug}/{version}/manifest.json"
        )["Body"]
    except ClientError as error:
        if error.response["Error"]["Code"] in ("NoSuchKey", "404"):
            return None
        raise
    logger.info("already preprocessed: reusing the manifest")
    manifest: dict[str, Any] = json.loads(body.read())
    return manifest


def _s3_writer(uri: str) -> Any:
    # Binary smart_open writers abort the multipart upload when the block raises, so a rejected file
    # leaves no half-written split behind.
    return smart_open.open(uri, "wb", transport_params={"client": aws.client("s3")})


@contextmanager
def _s3_text_writer(uri: str) -> Iterator[io.TextIOWrapper]:
    # The text layer is detached, never closed, so that the binary writer sees the exception (above).
    with _s3_writer(uri) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        yield text
        text.flush()
        text.detach()


def _preprocess(
    ref: ObjectRef,
    version_id: str | None,
    spec: DatasetSpec,
    provenance: dict[str, Any],
    settings: Settings,
    fmt: str,
) -> dict[str, Any]:
    slug, version = provenance["dataset"], provenance["version"]
    started = time.monotonic()
    limits = Limits.for_object(ref.key, provenance["source"].get("size"))
    if fmt == "zip":
        # zipfile seeks (a zip's directory is at its end): the upload is read from a copy in /tmp, which
        # too_big_for_lambda keeps it within.
        with tempfile.TemporaryFile() as local:
            aws.client("s3").download_fileobj(ref.bucket, ref.key, local, ExtraArgs=_version_arg(version_id))
            manifest = images.preprocess_zip(
                local,
                spec=spec,
                open_split=lambda split: _s3_writer(
                    _processed_uri(settings, slug, version, split, images.SPLIT_FILE)
                ),
                provenance=provenance,
                limits=limits,
            )
    else:
        params: dict[str, Any] = {"client": aws.client("s3")}
        if version_id and version_id != "null":
            params["version_id"] = version_id
        with smart_open.open(f"s3://{ref.bucket}/{ref.key}", "rb", transport_params=params) as source:
            manifest = preprocess(
                source,
                spec=spec,
                open_split=lambda split: _s3_text_writer(
                    _processed_uri(settings, slug, version, split, "part-00000.csv")
                ),
                provenance=provenance,
                fmt=fmt,
                limits=limits,
            )
    aws.client("s3").put_object(
        Bucket=settings.require("processed_bucket"),
        Key=f"{slug}/{version}/manifest.json",
        Body=json.dumps(manifest, indent=2).encode(),
        ContentType="application/json",
    )
    seconds = time.monotonic() - started
    metrics.add_metric("RowsRead", MetricUnit.Count, manifest["counts"]["rows_read"])
    metrics.add_metric("RowsDropped", MetricUnit.Count, sum(manifest["dropped"].values()))
    for reason, count in manifest["dropped"].items():
        with single_metric(
            name="RowsDroppedByReason",
            unit=MetricUnit.Count,
            value=count,
            namespace=metrics.namespace,
            default_dimensions=metrics.default_dimensions,
        ) as metric:
            metric.add_dimension(name="reason", value=reason)
    metrics.add_metric("BytesRead", MetricUnit.Bytes, manifest["source"].get("bytes_read", 0))
    metrics.add_metric("PreprocessSeconds", MetricUnit.Seconds, seconds)
    logger.info(
        "preprocessed",
        extra={
            "counts": manifest["counts"],
            "dropped": manifest["dropped"],
            "inferred": manifest["inferred"],
            "warnings": manifest["warnings"],
            "seconds": round(seconds, 3),
        },
    )
    return manifest


def _quarantine(rejected: DatasetRejected, provenance: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Write a readable report next to (never over) the data, tell the user, and acknowledge the event."""
    slug, version = provenance["dataset"], provenance["version"]
    report = {
        "dataset": slug,
        "version": version,
        "source": provenance["source"],
        "reason": rejected.reason,
        "details": rejected.details,
        "what_to_do": "Fix the file and upload it again; the original upload was left untouched.",
    }
    key = f"quarantine/{slug}/{version}/report.json"
    bucket = settings.require("processed_bucket")
    aws.client("s3").put_object(
        Bucket=bucket,
        Key=key,
        Body=json.dumps(report, indent=2, default=str).encode(),
        ContentType="application/json",
    )
    summary = {"outcome": "quarantined", **report, "report": f"s3://{bucket}/{key}"}
    if settings.notification_topic_arn:
        aws.client("sns").publish(
            TopicArn=settings.notification_topic_arn,
            Subject=f"conveyor: {slug} {version} quarantined"[:100],
            Message=json.dumps(summary, default=str),
            MessageAttributes={
                "outcome": {"DataType": "String", "StringValue": "quarantined"},
                "dataset": {"DataType": "String", "StringValue": slug},
            },
        )
    announce(summary)
    metrics.add_metric("QuarantinedFiles", MetricUnit.Count, 1)
    logger.warning("quarantined", extra={"reason": rejected.reason, "report": f"s3://{bucket}/{key}"})
    return {"status": "quarantined", "dataset": slug, "version": version, "reason": rejected.reason}


def _execution_input(manifest: dict[str, Any], spec: DatasetSpec, settings: Settings) -> dict[str, Any]:
    slug, version = manifest["dataset"], manifest["version"]
    names = ResourceNames.for_version(settings.stack_name, slug, version)
    artifacts = settings.require("artifacts_bucket")
    hyperparameters = {str(k): str(v) for k, v in spec.hyperparameters.items()}
    hyperparameters.update(
        sagemaker_program="train.py",
        # The code arrives as the job's "code" channel (s3://<artifacts>/code/training/): a network-isolated
        # container cannot download it itself, as the SageMaker SDK does for such jobs.
        sagemaker_submit_directory=SUBMIT_DIRECTORY,
        # SageMaker's torch_distributed (the SDK's distribution={"torch_distributed": {"enabled": True}}):
        # torchrun starts one process per GPU on every instance (one on a CPU instance); train.py trains
        # them together with DistributedDataParallel.
        sagemaker_torch_distributed_enabled="true",
    )
    resources = training_resources(spec.training, settings)
    base, refused = _base_model(spec, manifest, resources, settings)
    if base["index"]:
        hyperparameters.update(
            base_model=base["name"],
            base_model_digest=base["digest"],
            # The code with transformers, tokenizers, safetensors and peft's wheels in it.
            sagemaker_submit_directory=SUBMIT_DIRECTORY_HF,
            adapter=spec.adapter,
            **({"max_length": str(spec.max_length)} if spec.max_length else {}),
        )
        if base["memory"].get("sharding") == "fsdp":  # only the instance's GPUs together hold it
            hyperparameters.setdefault("sharding", "fsdp")
    default_metric = "accuracy" if manifest["task"] == "classification" else "r2"
    execution_input = {
        "dataset": slug,
        "version": version,
        "source": manifest["source"],
        "task": manifest["task"],
        "target": manifest["target"],
        "data": {
            "manifest": _processed_uri(settings, slug, version, "manifest.json"),
            **{
                split: _processed_uri(settings, slug, version, split) + "/"
                for split in ("train", "validation", "test")
            },
        },
        "names": names.as_dict(),
        "training": {
            "hyperparameters": hyperparameters,
            "output_path": f"s3://{artifacts}/training/{slug}/",
            "resources": resources,
            "base": base,
        },
        "gate": {
            "metric": spec.metric or default_metric,
            "threshold": spec.threshold,
            "margin": spec.margin,
            "approval": spec.approval,
        },
        "serving": {"mode": spec.serving},
    }
    if refused is not None:
        # The execution fails at once, with the notification every failure sends: no job starts.
        execution_input["refused"] = {"Error": "BaseModelRefused", "Cause": refused.reason[:4000]}
    return execution_input


def _base_model(
    spec: DatasetSpec, manifest: dict[str, Any], resources: dict[str, Any], settings: Settings
) -> tuple[dict[str, Any], base_models.BaseModelRefused | None]:
    """The training job's ``base`` channel (``index`` 1, its ``uri``, and what the checks found) when the
    spec names a base model, else ``index`` 0; and the refusal, when the base cannot be fine-tuned as asked.

    The checks (common.base_models) read config.json, the tokenizer's files and each safetensors header on
    S3: a bad base fails the execution before a GPU is paid for.
    """
    if spec.base_model is None:
        return {"index": 0, "uri": ""}, None
    refusal = {"index": 0, "uri": "", "name": spec.base_model}
    named = bool(spec.training.get("instance_type"))
    try:
        bucket, prefix = base_models.locate(spec.base_model, settings.require("artifacts_bucket"))
        kind = "image" if manifest.get("format") == "zip" or manifest.get("recipe") == "image" else "text"
        info = base_models.inspect(
            base_models.S3Files(aws.client("s3"), bucket, prefix),
            task_kind=kind,
            # An instance the spec names bounds the model; else the instance is chosen to fit it (below).
            instance_type=resources["instance_type"] if named else None,
            adapter=spec.adapter,
        )
        if not named:
            chosen = instances.instance_for(info.parameters, spec.adapter, resources["instance_type"])
            if chosen and chosen != resources["instance_type"]:
                logger.info(
                    "training instance chosen for the base model",
                    extra={
                        "base_model": spec.base_model,
                        "default": resources["instance_type"],
                        "chosen": chosen,
                    },
                )
                resources.update(training_resources({**spec.training, "instance_type": chosen}, settings))
        fit = base_models.estimate_fit(
            info.parameters,
            resources["instance_type"],
            spec.adapter,
            info.location,
            instance_count=int(resources.get("instance_count", 1)),
        )
    except base_models.BaseModelRefused as refused:
        logger.warning("base model refused", extra={"base_model": spec.base_model, "reason": refused.reason})
        return refusal, refused
    fit["instance_type"] = resources["instance_type"]
    fit["instance_chosen"] = not named and resources["instance_type"] != settings.training_instance_type
    return {
        "index": 1,
        "uri": f"s3://{bucket}/{prefix}",
        "name": spec.base_model,
        "digest": info.digest,
        "model_type": info.model_type,
        "parameters": info.parameters,
        "adapter": spec.adapter,
        "memory": fit,
    }, None


# ---------------------------------------------------------------- bigger than Lambda (SageMaker Processing)
# An upload above LAMBDA_PREPROCESS_MAX_BYTES (or a zip too big for /tmp) is not read here: the pipeline
# preprocesses it with the same code in a SageMaker Processing job (preprocess/processing.py) and then trains
# as usual.


def too_big_for_lambda(size: int | None, settings: Settings, fmt: str | None = None) -> bool:
    """Above LAMBDA_PREPROCESS_MAX_BYTES; or a zip that would not fit in /tmp, where the function copies it."""
    if size is None:
        return False
    if size > settings.lambda_preprocess_max_bytes:
        return True
    return fmt == "zip" and size > shutil.disk_usage(tempfile.gettempdir()).free * TMP_SHARE


def processing_volume_gb(key: str, size: int) -> int:
    """The job's EBS volume: the upload, the splits (its rows again, as large as the decompression limit
    allows), and headroom; SageMaker's minimum is 1 GB and its maximum 16 TB."""
    inflated = Limits.for_object(key, size).max_bytes or size
    return min(16_384, max(30, math.ceil((size + 1.1 * inflated) / 2**30) + 10))


def processing_execution_input(
    spec: DatasetSpec, provenance: dict[str, Any], settings: Settings
) -> dict[str, Any]:
    """The execution input of an upload the pipeline preprocesses itself (docs/contracts.md, section 6).

    The task and target are what conveyor.json says, else null: only preprocessing infers them, so nothing
    before it may need them, and the gate takes its metric from evaluation.json when the spec names none.
    """
    slug, version, source = provenance["dataset"], provenance["version"], provenance["source"]
    artifacts = settings.require("artifacts_bucket")
    execution_input = _execution_input(
        {**provenance, "task": spec.task, "target": spec.target}, spec, settings
    )
    execution_input["gate"]["metric"] = spec.metric
    execution_input["preprocessing"] = {
        "mode": "processing",
        "job_name": processing_job_name(settings.stack_name, slug, version),
        "input": f"s3://{source['bucket']}/{source['key']}",
        "source": source,
        "spec": dataclasses.asdict(spec),
        "code": f"s3://{artifacts}/{PREPROCESSING_CODE_PREFIX}",
        "job_document": f"s3://{artifacts}/preprocessing/{slug}/{version}/job.json",
        "output": {
            "processed": _processed_uri(settings, slug, version) + "/",
            "quarantine": f"s3://{settings.require('processed_bucket')}/quarantine/{slug}/{version}/",
        },
        "volume_size_gb": processing_volume_gb(source["key"], int(source["size"])),
    }
    return execution_input


def _hand_to_processing_job(
    spec: DatasetSpec, provenance: dict[str, Any], settings: Settings, name: str
) -> dict[str, Any]:
    execution_input = processing_execution_input(spec, provenance, settings)
    job = execution_input["preprocessing"]
    document = {**provenance, "spec": job["spec"]}
    bucket, _, key = job["job_document"].removeprefix("s3://").partition("/")
    try:
        # Written once per object version: a replayed event must not change what a running job reads.
        aws.client("s3").put_object(
            Bucket=bucket,
            Key=key,
            Body=json.dumps(document, indent=2, default=str).encode(),
            ContentType="application/json",
            IfNoneMatch="*",
        )
    except ClientError as error:
        if error.response["Error"]["Code"] not in ("PreconditionFailed", "412"):
            raise
    started = _start_pipeline(settings, name, execution_input)
    metrics.add_metric("HandedToProcessingJob", MetricUnit.Count, 1)
    logger.info(
        "too big for Lambda: the pipeline preprocesses it in a SageMaker Processing job",
        extra={"size": provenance["source"].get("size"), "processing_job": job["job_name"]},
    )
    return {
        "status": "started" if started else "duplicate",
        "dataset": provenance["dataset"],
        "version": provenance["version"],
        "preprocessing": job["job_name"],
    }


def _start_pipeline(settings: Settings, name: str, execution_input: dict[str, Any]) -> bool:
    """Start the execution; False when this object version already has one (a replayed event)."""
    try:
        aws.client("stepfunctions").start_execution(
            stateMachineArn=settings.require("state_machine_arn"),
            name=name,
            input=json.dumps(execution_input),
        )
    except ClientError as error:
        if error.response["Error"]["Code"] == "ExecutionAlreadyExists":
            logger.info(
                "duplicate event: this object version already has an execution", extra={"execution": name}
            )
            return False
        raise
    metrics.add_metric("PipelinesStarted", MetricUnit.Count, 1)
    logger.info("pipeline started", extra={"execution": name})
    return True


def record_handler(record: SQSRecord) -> list[dict[str, Any]]:
    settings = Settings.from_env()
    try:
        return [process_object(ref, settings) for ref in objects_in_message(record.body)]
    except Exception:
        # Reported as this message's failure: SQS redelivers it after the visibility timeout, and after the
        # queue's maxReceiveCount moves it to the DLQ. The log says which message and why, every time.
        logger.exception(
            "message failed; SQS retries it, then moves it to the dead-letter queue",
            extra={
                "message_id": record.message_id,
                "receive_count": record.attributes.approximate_receive_count,
                "body": record.body[:500],
            },
        )
        raise


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics(raise_on_empty_metrics=False)
def handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    return process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
