"""Names derived from a dataset and one version of its uploaded object.

Every name is a pure function of the object's identity, so a replayed event produces the same names and
Step Functions' `ExecutionAlreadyExists` makes the replay harmless.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime

SLUG_MAX = 40
# Where the training jobs' source directory (training/ as sourcedir.tar.gz) lives in ArtifactsBucket.
# Every endpoint config of a dataset names its one variant the same: SageMaker's blue/green deployments
# (deployment guardrails) need the new config's variant to be named as the old one's. Which model answered
# is the model's own `model_version` (its data version) instead.
VARIANT = "AllTraffic"
TRAINING_CODE_KEY = "code/training/sourcedir.tar.gz"
# Where a training job finds that tarball: its "code" input channel, which copies s3://<artifacts>/code/training/.
SUBMIT_DIRECTORY = "/opt/ml/input/data/code/sourcedir.tar.gz"
# The same code with the Hugging Face packages' wheels (the AWS PyTorch images lack them), for the jobs that
# fine-tune a base model; beside the other in the same channel.
TRAINING_CODE_HF_KEY = "code/training/sourcedir-hf.tar.gz"
SUBMIT_DIRECTORY_HF = "/opt/ml/input/data/code/sourcedir-hf.tar.gz"
# Where SageMaker Processing jobs find the preprocessing code (functions/common and functions/preprocess,
# one object per file, so a ProcessingInput copies the packages as a directory tree).
PREPROCESSING_CODE_PREFIX = "code/preprocessing/"
_NOT_SLUG = re.compile(r"[^a-z0-9]+")


def slugify(name: str) -> str:
    """Turn a dataset folder name into the slug used in resource names and the API path.

    >>> slugify("My_Churn.v2")
    'my-churn-v2'
    """
    slug = _NOT_SLUG.sub("-", name.lower()).strip("-")[:SLUG_MAX].strip("-")
    if not slug:
        raise ValueError(f"dataset name {name!r} has no letters or digits to name it by")
    return slug


def object_identity(bucket: str, key: str, version_id: str | None, etag: str | None) -> str:
    """A stable hash of one version of one S3 object (versionId when the bucket has one, else ETag)."""
    marker = f"v:{version_id}" if version_id and version_id != "null" else f"e:{(etag or '').strip(chr(34))}"
    return hashlib.sha256(f"{bucket}\n{key}\n{marker}".encode()).hexdigest()


def data_version(last_modified: datetime, identity: str) -> str:
    """`YYYYMMDDTHHMMSSZ-<hash6>`: sortable by upload time, unique per object version."""
    stamp = last_modified.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{identity[:6]}"


def execution_name(slug: str, identity: str) -> str:
    """Step Functions execution name (at most 80 characters of [A-Za-z0-9-])."""
    return f"{slug}-{identity[:32]}"


@dataclass(frozen=True)
class ResourceNames:
    """Names of the SageMaker resources of one dataset version."""

    training_job: str
    model: str
    endpoint_config: str
    endpoint: str
    model_package_group: str
    variant: str

    @classmethod
    def for_version(cls, stack_name: str, slug: str, version: str) -> ResourceNames:
        per_version = f"{slug}-{version}"[:63]
        per_dataset = f"{stack_name}-{slug}"[:63].rstrip("-")
        return cls(
            training_job=per_version,
            model=per_version,
            endpoint_config=per_version,
            endpoint=per_dataset,
            model_package_group=per_dataset,
            variant=VARIANT,
        )

    def as_dict(self) -> dict[str, str]:
        return dict(self.__dict__)


def processing_job_name(stack_name: str, slug: str, version: str) -> str:
    """The SageMaker Processing job that preprocesses one dataset version when it is too big for Lambda.

    `<stack>-<slug>-<version>` shortened to SageMaker's 63 characters, always starting with `<stack>-` (the
    state machine's IAM policy is scoped to that prefix) and ending with the version (unique per object).
    """
    return f"{stack_name}-{slug}"[: 62 - len(version)].rstrip("-") + "-" + version


def endpoint_name(stack_name: str, slug: str) -> str:
    """The endpoint that serves dataset `slug`; stable across retrains so the API URL never changes."""
    return ResourceNames.for_version(stack_name, slug, "").endpoint
