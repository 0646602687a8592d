"""Where a dataset's training job runs: the stack's defaults (template parameters), overridden by the
``training`` block of the dataset's conveyor.json, resolved into what CreateTrainingJob needs.

The pipeline definition takes these values as they are (docs/contracts.md, section 6): the resolution,
including whether the instance type may carry the stack key on its volume, happens here, once, in Python.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.config import Settings
from common.errors import DatasetRejected

# Instance families whose instances have local NVMe storage, which a hardware module encrypts: SageMaker
# refuses a volume KMS key on them. The template's <Role>HasLocalStorage conditions and local mode
# (conveyor.local.jobs) list the same families (tests/unit/test_sagemaker_parameters.py).
LOCAL_STORAGE_FAMILIES = frozenset(
    {
        *("g4dn", "g5", "g6", "g6e"),
        *("p3dn", "p4d", "p4de", "p5", "p5e", "p5en", "p6-b200"),
        *("trn1", "trn1n", "trn2"),
        *("c5d", "m5d", "r5d", "c6id", "m6id", "r6id", "c6gd", "m6gd", "r6gd"),
    }
)


def has_local_storage(instance_type: str) -> bool:
    """Whether the instance type's family has local NVMe storage (``ml.g5.xlarge`` → ``g5`` → True)."""
    parts = instance_type.split(".")
    return len(parts) == 3 and parts[1] in LOCAL_STORAGE_FAMILIES


def training_resources(training: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    """The training job's instances, capacity and limits: the spec's `training` block over the stack's.

    Returns
    -------
    dict
        ``instance_type``, ``instance_count``, ``spot``, ``max_wait_seconds``, and two indexes the
        definition picks request variants by: ``volume_key_index`` (1: ``VolumeKmsKeyId`` is the stack
        key; 0: no volume key, without a stack key or on local NVMe storage) and
        ``stopping_condition_index`` (1: with ``MaxWaitTimeInSeconds``, which SageMaker takes only
        with spot capacity).

    Raises
    ------
    DatasetRejected
        When spot training would wait less than the job may run (SageMaker refuses that request).
    """
    instance_type = training.get("instance_type") or settings.training_instance_type
    spot = training["spot"] if training.get("spot") is not None else settings.training_use_spot == "true"
    max_wait = int(training.get("max_wait_seconds") or settings.training_max_wait_seconds)
    if spot and max_wait < settings.training_max_runtime_seconds:
        raise DatasetRejected(
            f"conveyor.json: training.max_wait_seconds ({max_wait}) must be at least the stack's "
            f"TrainingMaxRuntimeSeconds ({settings.training_max_runtime_seconds}) for spot training: "
            'raise it, or set "spot": false'
        )
    return {
        "instance_type": instance_type,
        "instance_count": int(training.get("instance_count") or settings.training_instance_count),
        "spot": spot,
        "max_wait_seconds": max_wait,
        "volume_key_index": int(bool(settings.stack_key_arn) and not has_local_storage(instance_type)),
        "stopping_condition_index": int(spot),
    }
