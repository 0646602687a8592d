"""The SageMaker request parameters inside the pipeline definition, which checkov cannot see.

The definition is checked as CloudFormation would deliver it: the ASL file with the template's
DefinitionSubstitutions filled for a given set of parameters (conveyor.local.template.Stack).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conveyor.local.template import Stack

ROOT = Path(__file__).resolve().parents[2]
CREATE_JOB = ("createTrainingJob", "createProcessingJob")


def definition(**parameters: str) -> dict[str, Any]:
    stack = Stack(ROOT, parameters=parameters)
    return json.loads(stack.state_machine_definition("Pipeline"))


def job_states(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: state
        for name, state in document["States"].items()
        if state.get("Resource", "").endswith(CREATE_JOB)
    }


def configure(document: dict[str, Any]) -> dict[str, Any]:
    """Configure's parameters with every `States.StringToJson('<literal>')` evaluated."""

    def evaluate(value: Any) -> Any:
        if isinstance(value, dict):
            return {k.removesuffix(".$"): evaluate(v) for k, v in value.items()}
        if isinstance(value, list):
            return [evaluate(v) for v in value]
        if isinstance(value, str) and value.startswith("States.StringToJson('"):
            return json.loads(value.removeprefix("States.StringToJson('").removesuffix("')"))
        return value

    return evaluate(document["States"]["Configure"]["Parameters"])


def stopping_condition(document: dict[str, Any]) -> dict[str, Any]:
    """The StoppingCondition StartTrainingJob sends: Configure's variant at Configure's index."""
    params = document["States"]["StartTrainingJob"]["Parameters"]
    expression = params["StoppingCondition.$"]
    assert expression == (
        "States.ArrayGetItem($.config.training_stopping_conditions, $.config.training_stopping_condition_index)"
    )
    config = configure(document)
    return config["training_stopping_conditions"][config["training_stopping_condition_index"]]


def test_every_job_has_a_max_runtime():
    document = definition()
    jobs = job_states(document)
    assert set(jobs) == {"StartTrainingJob", "StartProcessingJob"}
    assert jobs["StartProcessingJob"]["Parameters"]["StoppingCondition"] == {
        "MaxRuntimeInSeconds.$": "$.config.processing_max_runtime"
    }
    assert stopping_condition(document)["MaxRuntimeInSeconds"] == 3600


def test_training_runs_on_spot_with_a_max_wait_and_checkpoints_by_default():
    document = definition()
    params = document["States"]["StartTrainingJob"]["Parameters"]
    config = configure(document)
    assert (
        params["EnableManagedSpotTraining.$"] == "$.config.training_spot" and config["training_spot"] is True
    )
    condition = stopping_condition(document)
    assert condition == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    assert condition["MaxWaitTimeInSeconds"] >= condition["MaxRuntimeInSeconds"]
    assert params["CheckpointConfig"] == {
        "S3Uri.$": "States.Format('s3://conveyor-artifactsbucket/checkpoints/{}/{}/', $.dataset, $.version)",
        "LocalPath": "/opt/ml/checkpoints",
    }


def test_on_demand_training_sends_no_max_wait():
    # SageMaker accepts MaxWaitTimeInSeconds only with managed spot training.
    document = definition(TrainingUseSpot="false", TrainingMaxRuntimeSeconds="900")
    assert configure(document)["training_spot"] is False
    assert stopping_condition(document) == {"MaxRuntimeInSeconds": 900}


def test_the_template_default_max_wait_covers_the_max_runtime():
    stack = Stack(ROOT)
    assert int(stack.parameters["TrainingMaxWaitSeconds"]) >= int(
        stack.parameters["TrainingMaxRuntimeSeconds"]
    )


@pytest.mark.parametrize("isolation", ["true", "false"])
@pytest.mark.parametrize("encryption", ["true", "false"])
def test_network_isolation_and_inter_container_encryption_follow_the_parameters(isolation, encryption):
    document = definition(EnableNetworkIsolation=isolation, EnableInterContainerTrafficEncryption=encryption)
    config = configure(document)
    assert config["network_isolation"] is (isolation == "true")
    assert config["inter_container_encryption"] is (encryption == "true")
    training = document["States"]["StartTrainingJob"]["Parameters"]
    assert training["EnableNetworkIsolation.$"] == "$.config.network_isolation"
    assert training["EnableInterContainerTrafficEncryption.$"] == "$.config.inter_container_encryption"
    processing = document["States"]["StartProcessingJob"]["Parameters"]["NetworkConfig"]
    assert processing == {
        "EnableNetworkIsolation.$": "$.config.network_isolation",
        "EnableInterContainerTrafficEncryption.$": "$.config.inter_container_encryption",
    }


def test_security_and_cost_parameters_default_to_on():
    defaults = Stack(ROOT).parameters
    assert defaults["EnableNetworkIsolation"] == "true"
    assert defaults["EnableInterContainerTrafficEncryption"] == "true"
    assert defaults["TrainingUseSpot"] == "true"


# ---------------------------------------------------------------- EncryptionMode
KEY_ARN = "arn:aws:kms:us-east-1:123456789012:key/0f1e2d3c-test"


def encrypted_requests(**parameters: str) -> dict[str, Any]:
    """What each SageMaker request carries under the stack's EncryptionMode: the variant of each two-way
    choice that Configure's indexes name (the key's ARN stands in for the one KMS would assign)."""
    stack = Stack(ROOT, parameters=parameters)
    if "StackKey" in stack.resources:
        stack.resources["StackKey"].attributes["Arn"] = KEY_ARN
    document = json.loads(stack.state_machine_definition("Pipeline"))
    states, choice = document["States"], configure(document)["encryption"]
    training, processing = states["TrainingJobEncryption"], states["ProcessingJobEncryption"]
    assert states["StartTrainingJob"]["Parameters"]["OutputDataConfig.$"] == (
        "States.ArrayGetItem($.encryption.output_data_configs, $.config.encryption.output_key_index)"
    )
    assert states["StartTrainingJob"]["Parameters"]["ResourceConfig.$"] == (
        "States.ArrayGetItem($.config.encryption.training_resources, "
        "$.config.encryption.training_volume_key_index)"
    )
    assert states["StartProcessingJob"]["Parameters"]["ProcessingOutputConfig.$"] == (
        "States.ArrayGetItem($.encryption.processing_output_configs, $.config.encryption.output_key_index)"
    )
    assert states["StartProcessingJob"]["Parameters"]["ProcessingResources"] == {
        "ClusterConfig.$": "States.ArrayGetItem($.encryption.processing_clusters, "
        "$.config.encryption.processing_volume_key_index)"
    }
    endpoint_choice = states["ServerlessOrInstances?"]["Choices"][-1]
    assert endpoint_choice == {
        "Variable": "$.config.encryption.inference_volume_key",
        "BooleanEquals": True,
        "Next": "CreateEncryptedEndpointConfig",
    }
    endpoint = states[
        "CreateEncryptedEndpointConfig" if choice["inference_volume_key"] else "CreateEndpointConfig"
    ]
    return {
        "training output": training["Parameters"]["output_data_configs"][choice["output_key_index"]],
        "training resources": choice["training_resources"][choice["training_volume_key_index"]],
        "processing output": processing["Parameters"]["processing_output_configs"][
            choice["output_key_index"]
        ],
        "processing cluster": processing["Parameters"]["processing_clusters"][
            choice["processing_volume_key_index"]
        ],
        "endpoint config": endpoint["Parameters"],
    }


def keys_in(requests: dict[str, Any]) -> dict[str, str]:
    return {
        f"{request}.{field}": value
        for request, parameters in requests.items()
        for field, value in parameters.items()
        if "Kms" in field
    }


def test_sse_kms_puts_the_stack_key_on_outputs_and_on_volumes_without_local_storage():
    # The defaults: training on ml.g5 (local NVMe, hardware-encrypted: SageMaker refuses a volume key),
    # processing on ml.m5.xlarge and endpoints on ml.m5.large (EBS volumes: the stack key).
    assert keys_in(encrypted_requests()) == {
        "training output.KmsKeyId": KEY_ARN,
        "processing output.KmsKeyId": KEY_ARN,
        "processing cluster.VolumeKmsKeyId": KEY_ARN,
        "endpoint config.KmsKeyId": KEY_ARN,
    }


def test_a_training_instance_with_ebs_storage_gets_the_volume_key_and_nvme_ones_do_not():
    requests = encrypted_requests(
        TrainingInstanceType="ml.m5.xlarge",
        ProcessingInstanceType="ml.c5d.xlarge",
        InferenceInstanceType="ml.g5.xlarge",
    )
    assert keys_in(requests) == {
        "training output.KmsKeyId": KEY_ARN,
        "training resources.VolumeKmsKeyId": KEY_ARN,
        "processing output.KmsKeyId": KEY_ARN,
    }
    assert requests["training resources"]["InstanceType"] == "ml.m5.xlarge"


def test_sse_s3_sends_no_key_field_at_all():
    # SageMaker's KmsKeyId fields must be absent, not empty, when there is no key.
    stack = Stack(ROOT, parameters={"EncryptionMode": "SSE-S3"})
    assert {"StackKey", "StackKeyAlias", "StackKeyUse", "StackKeyGrants"}.isdisjoint(stack.resources)
    assert keys_in(encrypted_requests(EncryptionMode="SSE-S3", TrainingInstanceType="ml.m5.xlarge")) == {}


@pytest.mark.parametrize("mode, algorithm", [("SSE-KMS", "aws:kms"), ("SSE-S3", "AES256")])
def test_buckets_queues_and_topic_follow_the_encryption_mode(mode, algorithm):
    stack = Stack(ROOT, parameters={"EncryptionMode": mode})
    if mode == "SSE-KMS":
        stack.resources["StackKey"].attributes["Arn"] = KEY_ARN
    for bucket in stack.of_type("AWS::S3::Bucket"):
        (rule,) = stack.resolve(bucket.properties["BucketEncryption"])["ServerSideEncryptionConfiguration"]
        assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] == algorithm, bucket.logical_id
        assert rule["ServerSideEncryptionByDefault"].get("KMSMasterKeyID") == (
            KEY_ARN if mode == "SSE-KMS" else None
        )
    for queue in stack.of_type("AWS::SQS::Queue"):
        props = stack.resolve(queue.properties)
        assert (props.get("KmsMasterKeyId"), props.get("SqsManagedSseEnabled")) == (
            (KEY_ARN, None) if mode == "SSE-KMS" else (None, True)
        ), queue.logical_id
    (topic,) = stack.of_type("AWS::SNS::Topic")
    assert stack.resolve(topic.properties).get("KmsMasterKeyId") == (KEY_ARN if mode == "SSE-KMS" else None)


def test_the_template_and_local_mode_know_the_same_local_storage_families():
    # One list in Python (local mode refuses a volume key on these, as SageMaker does), three in the
    # template's conditions; they must agree.
    from conveyor.local.jobs import LOCAL_STORAGE_FAMILIES

    conditions = Stack(ROOT).template["Conditions"]
    for role in ("Training", "Processing", "Inference"):
        equals = [
            item["Fn::Equals"]
            for group in conditions[f"{role}HasLocalStorage"]["Fn::Or"]
            for item in group["Fn::Or"]
        ]
        assert all(
            e[1] == {"Fn::Select": [1, {"Fn::Split": [".", {"Ref": f"{role}InstanceType"}]}]} for e in equals
        )
        assert {e[0] for e in equals} == LOCAL_STORAGE_FAMILIES, role
