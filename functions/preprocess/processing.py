"""SageMaker Processing entry point: PreprocessFunction's preprocessing, for uploads too big for Lambda.

The job runs `preprocess.core.preprocess` (for a zip of images, `preprocess.images.preprocess_zip`), the
code the Lambda function runs, on the file SageMaker Processing copied to local disk, and writes what the
function would write to S3 into the job's output directories, which SageMaker uploads when the job ends
(docs/contracts.md, section 7):

    input  "job"         job.json: dataset, version, source object, spec (written by PreprocessFunction)
    input  "dataset"     the uploaded object (an S3Prefix of its key)
    input  "code"        functions/common and functions/preprocess (`conveyor publish-code`)
    output "processed"   train/ validation/ test/ part-00000.csv (a zip: part-00000.zip) and manifest.json
    output "quarantine"  report.json, only when the file is rejected

The local paths come from /opt/ml/config/processingjobconfig.json, where SageMaker writes the job's request.
/opt/ml/output/message becomes DescribeProcessingJob's `ExitMessage`; the pipeline reads it as one JSON
object: `{"outcome": "processed", ...}` or `{"outcome": "quarantined", "reason": ...}`. A rejected file is
a job that did its work (exit status 0): the pipeline notifies and stops. Anything else exits with 1.

Standard library and functions/ code only, and Pillow for a zip of images: the job runs in the PyTorch
training image, which has Pillow (torchvision depends on it) but not smart_open or Powertools. Run it with
`python3 -m preprocess.processing` and functions/ on PYTHONPATH.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import os
import shutil
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, cast

from common.errors import DatasetRejected
from preprocess import images
from preprocess.core import DatasetSpec, Limits, format_of, preprocess

log = logging.getLogger("conveyor.processing")

JOB_DOCUMENT = "job.json"
MANIFEST = "manifest.json"
QUARANTINE_REPORT = "report.json"
SPLIT_FILE = "part-00000.csv"
# SageMaker keeps the first 1 KB of the message file as ExitMessage.
EXIT_MESSAGE_BYTES = 1024
# Room left on the volume for the manifest and the quarantine report when the splits fill it.
DISK_MARGIN = 0.95
WHAT_TO_DO = "Fix the file and upload it again; the original upload was left untouched."


class JobError(RuntimeError):
    """The job cannot run as configured (a missing input, a changed object); the job fails with this."""


def opt_ml() -> Path:
    """The container's /opt/ml. Local mode runs the job outside a container and moves it (CONVEYOR_OPT_ML)."""
    return Path(os.environ.get("CONVEYOR_OPT_ML", "/opt/ml"))


def job_paths(config: dict[str, Any]) -> tuple[dict[str, Path], dict[str, Path]]:
    """Local paths of the job's inputs and outputs by name, from SageMaker's processingjobconfig.json."""
    inputs = {
        item["InputName"]: Path(item["S3Input"]["LocalPath"])
        for item in config.get("ProcessingInputs", [])
        if "S3Input" in item
    }
    outputs = {
        item["OutputName"]: Path(item["S3Output"]["LocalPath"])
        for item in config.get("ProcessingOutputConfig", {}).get("Outputs", [])
        if "S3Output" in item
    }
    for name in ("job", "dataset"):
        if name not in inputs:
            raise JobError(f"the job has no ProcessingInput named {name!r}")
    for name in ("processed", "quarantine"):
        if name not in outputs:
            raise JobError(f"the job has no ProcessingOutput named {name!r}")
    return inputs, outputs


def read_job_document(directory: Path) -> dict[str, Any]:
    path = directory / JOB_DOCUMENT
    if not path.is_file():
        raise JobError(f"no {JOB_DOCUMENT} in the 'job' input ({directory})")
    document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    for key in ("dataset", "version", "source", "spec"):
        if key not in document:
            raise JobError(f"{JOB_DOCUMENT} lacks {key!r}")
    return document


def dataset_file(directory: Path, source: dict[str, Any]) -> Path:
    """The uploaded object among the files the 'dataset' input copied (an S3Prefix may match siblings)."""
    path = directory / Path(source["key"]).name
    if not path.is_file():
        found = sorted(p.name for p in directory.rglob("*") if p.is_file())[:10]
        raise JobError(f"the 'dataset' input has no {path.name} (found: {found or 'nothing'})")
    expected = source.get("size")
    actual = path.stat().st_size
    if expected is not None and actual != int(expected):
        # A ProcessingInput reads the key's current version; this execution is for an older one.
        raise JobError(
            f"s3://{source['bucket']}/{source['key']} is {actual:,} bytes now, not the {int(expected):,} "
            "bytes of the version this job was started for: it was overwritten, and the new version has a "
            "pipeline execution of its own"
        )
    return path


@contextmanager
def _split_writer(path: Path, binary: bool = False) -> Iterator[IO[Any]]:
    # A rejected file leaves no half-written split behind, so the job uploads nothing but the report.
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with path.open("wb") if binary else path.open("w", encoding="utf-8", newline="") as handle:
            yield handle
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def quarantine_report(rejected: DatasetRejected, provenance: dict[str, Any]) -> dict[str, Any]:
    """The report PreprocessFunction writes for a rejected file (functions/preprocess/app.py)."""
    return {
        "dataset": provenance["dataset"],
        "version": provenance["version"],
        "source": provenance["source"],
        "reason": rejected.reason,
        "details": rejected.details,
        "what_to_do": WHAT_TO_DO,
    }


def exit_message(outcome: dict[str, Any]) -> str:
    """`outcome` as JSON within SageMaker's 1 KB ExitMessage; long strings are shortened, never cut mid-JSON."""
    shortened = dict(outcome)
    text = json.dumps(shortened, default=str)
    while len(text.encode("utf-8")) > EXIT_MESSAGE_BYTES:
        longest = max(
            (k for k, v in shortened.items() if isinstance(v, str)), key=lambda k: len(shortened[k])
        )
        value = shortened[longest]
        if len(value) <= 1:
            raise ValueError(f"cannot fit {outcome!r} into {EXIT_MESSAGE_BYTES} bytes")
        overflow = len(text.encode("utf-8")) - EXIT_MESSAGE_BYTES
        shortened[longest] = value[: max(0, len(value) - overflow - 1)] + "…"
        text = json.dumps(shortened, default=str)
    return text


def run(opt_ml_dir: Path) -> dict[str, Any]:
    """Preprocess the job's dataset; return the outcome that becomes the exit message.

    Raises
    ------
    JobError
        An input is missing or the object changed; the job fails.
    """
    config = json.loads((opt_ml_dir / "config" / "processingjobconfig.json").read_text(encoding="utf-8"))
    inputs, outputs = job_paths(config)
    document = read_job_document(inputs["job"])
    source = document["source"]
    provenance = {"dataset": document["dataset"], "version": document["version"], "source": dict(source)}
    path = dataset_file(inputs["dataset"], source)
    fmt = format_of(source["key"])
    if fmt is None:
        raise JobError(f"{source['key']} is not a file type conveyor preprocesses")
    processed, quarantine = outputs["processed"], outputs["quarantine"]
    processed.mkdir(parents=True, exist_ok=True)
    quarantine.mkdir(parents=True, exist_ok=True)
    # The Lambda's limits, and the volume: the splits are the decompressed rows (or images) again.
    limits = Limits.for_object(source["key"], source.get("size"))
    room = int(shutil.disk_usage(processed).free * DISK_MARGIN)
    limits = dataclasses.replace(limits, max_bytes=min(limits.max_bytes or room, room))
    started = time.monotonic()
    log.info("preprocessing %s (%s, %s bytes)", path.name, fmt, f"{path.stat().st_size:,}")
    try:
        spec = DatasetSpec.from_json(document["spec"])
        with path.open("rb") as raw:
            if fmt == "zip":
                manifest = images.preprocess_zip(
                    raw,
                    spec=spec,
                    open_split=lambda split: _split_writer(
                        processed / split / images.SPLIT_FILE, binary=True
                    ),
                    provenance=provenance,
                    limits=limits,
                )
            else:
                gzipped = source["key"].lower().endswith(".gz")
                manifest = preprocess(
                    cast(IO[bytes], gzip.GzipFile(fileobj=raw)) if gzipped else raw,
                    spec=spec,
                    open_split=lambda split: _split_writer(processed / split / SPLIT_FILE),
                    provenance=provenance,
                    fmt=fmt,
                    limits=limits,
                )
    except DatasetRejected as rejected:
        report = quarantine_report(rejected, provenance)
        (quarantine / QUARANTINE_REPORT).write_text(
            json.dumps(report, indent=2, default=str), encoding="utf-8"
        )
        log.warning("quarantined: %s", rejected.reason)
        return {"outcome": "quarantined", "reason": rejected.reason, "report": QUARANTINE_REPORT}
    (processed / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    log.info(
        "preprocessed in %.1f s: %s rows used, dropped %s",
        time.monotonic() - started,
        manifest["counts"]["rows_used"],
        manifest["dropped"],
    )
    return {
        "outcome": "processed",
        "task": manifest["task"],
        "target": manifest["target"],
        "rows_used": manifest["counts"]["rows_used"],
        "manifest": MANIFEST,
    }


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    root = opt_ml()
    message = root / "output" / "message"
    message.parent.mkdir(parents=True, exist_ok=True)
    try:
        outcome = run(root)
    except Exception as exc:
        traceback.print_exc()
        reason = str(exc) if isinstance(exc, JobError) else f"{type(exc).__name__}: {exc}"
        message.write_text(exit_message({"outcome": "failed", "reason": reason}), encoding="utf-8")
        return 1
    message.write_text(exit_message(outcome), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
