"""The SageMaker request parameters inside the pipeline definition, which checkov cannot see.

The definition is checked as CloudFormation would deliver it: the ASL file with the template's
DefinitionSubstitutions filled for a given set of parameters (conveyor.local.template.Stack).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from common.config import Settings
from conveyor.local.template import Stack
from preprocess.core import DatasetRejected
from preprocess.resources import LOCAL_STORAGE_FAMILIES, training_resources
from preprocess.spec import check_training_spec

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


def resources_for(stack: Stack, training: dict[str, Any] | None = None) -> dict[str, Any]:
    """$.training.resources as PreprocessFunction resolves it: its environment from the stack, and a
    dataset's conveyor.json `training` block."""
    settings = Settings.from_env(stack.function_environment("PreprocessFunction"))
    return training_resources(check_training_spec(training or {}), settings)


def training_request(document: dict[str, Any], resources: dict[str, Any]) -> dict[str, Any]:
    """StartTrainingJob's ResourceConfig, StoppingCondition and EnableManagedSpotTraining for an execution
    whose $.training.resources is `resources`: TrainingJobEncryption's variants at the indexes it names."""
    states, config = document["States"], configure(document)
    params = states["StartTrainingJob"]["Parameters"]
    assert params["ResourceConfig.$"] == (
        "States.ArrayGetItem($.encryption.training_resources, $.training.resources.volume_key_index)"
    )
    assert params["StoppingCondition.$"] == (
        "States.ArrayGetItem($.encryption.stopping_conditions, $.training.resources.stopping_condition_index)"
    )
    assert params["EnableManagedSpotTraining.$"] == "$.training.resources.spot"

    def fill(value: Any) -> Any:
        if isinstance(value, dict):
            return {k.removesuffix(".$"): fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fill(v) for v in value]
        if isinstance(value, str) and value.startswith("$.training.resources."):
            return resources[value.removeprefix("$.training.resources.")]
        if value == "$.config.training_max_runtime":
            return config["training_max_runtime"]
        return value

    variants = fill(states["TrainingJobEncryption"]["Parameters"])
    return {
        "ResourceConfig": variants["training_resources"][resources["volume_key_index"]],
        "StoppingCondition": variants["stopping_conditions"][resources["stopping_condition_index"]],
        "EnableManagedSpotTraining": resources["spot"],
    }


def stopping_condition(**parameters: str) -> dict[str, Any]:
    """The StoppingCondition StartTrainingJob sends with the stack's defaults."""
    stack = Stack(ROOT, parameters=parameters)
    document = json.loads(stack.state_machine_definition("Pipeline"))
    return training_request(document, resources_for(stack))["StoppingCondition"]


def test_every_job_has_a_max_runtime():
    document = definition()
    jobs = job_states(document)
    assert set(jobs) == {"StartTrainingJob", "StartProcessingJob"}
    assert jobs["StartProcessingJob"]["Parameters"]["StoppingCondition"] == {
        "MaxRuntimeInSeconds.$": "$.config.processing_max_runtime"
    }
    assert stopping_condition()["MaxRuntimeInSeconds"] == 3600


def test_training_runs_on_spot_with_a_max_wait_and_checkpoints_by_default():
    stack = Stack(ROOT)
    document = json.loads(stack.state_machine_definition("Pipeline"))
    params = document["States"]["StartTrainingJob"]["Parameters"]
    request = training_request(document, resources_for(stack))
    assert request["EnableManagedSpotTraining"] is True
    condition = request["StoppingCondition"]
    assert condition == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    assert condition["MaxWaitTimeInSeconds"] >= condition["MaxRuntimeInSeconds"]
    assert params["CheckpointConfig"] == {
        "S3Uri.$": "States.Format('s3://conveyor-artifactsbucket/checkpoints/{}/{}/', $.dataset, $.version)",
        "LocalPath": "/opt/ml/checkpoints",
    }


def test_on_demand_training_sends_no_max_wait():
    # SageMaker accepts MaxWaitTimeInSeconds only with managed spot training.
    stack = Stack(ROOT, parameters={"TrainingUseSpot": "false", "TrainingMaxRuntimeSeconds": "900"})
    document = json.loads(stack.state_machine_definition("Pipeline"))
    request = training_request(document, resources_for(stack))
    assert request["EnableManagedSpotTraining"] is False
    assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 900}


def test_a_dataset_chooses_its_own_training_instances_capacity_and_max_wait():
    stack = Stack(ROOT, parameters={"TrainingInstanceCount": "2"})
    stack.resources["StackKey"].attributes["Arn"] = KEY_ARN
    document = json.loads(stack.state_machine_definition("Pipeline"))
    assert training_request(document, resources_for(stack))["ResourceConfig"] == {
        "InstanceType": "ml.g5.xlarge",
        "InstanceCount": 2,
        "VolumeSizeInGB": 30,
    }
    spec = {"instance_type": "ml.m5.2xlarge", "instance_count": 3, "max_wait_seconds": 86_400}
    request = training_request(document, resources_for(stack, spec))
    assert request == {
        # An EBS volume: the stack key encrypts it.
        "ResourceConfig": {
            "InstanceType": "ml.m5.2xlarge",
            "InstanceCount": 3,
            "VolumeSizeInGB": 30,
            "VolumeKmsKeyId": KEY_ARN,
        },
        "StoppingCondition": {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 86_400},
        "EnableManagedSpotTraining": True,
    }
    on_demand = training_request(document, resources_for(stack, {"spot": False, "max_wait_seconds": 60}))
    assert on_demand["EnableManagedSpotTraining"] is False
    assert on_demand["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600}


@pytest.mark.parametrize(
    "training, message",
    [
        ([1], "training must be an object"),
        ({"instances": 2}, "training has unknown keys: instances"),
        ({"instance_type": "g5.xlarge"}, "training.instance_type must be a SageMaker instance type"),
        ({"instance_count": 0}, "training.instance_count must be a whole number from 1 to 20, not 0"),
        ({"instance_count": 2.0}, "training.instance_count must be a whole number"),
        ({"instance_count": True}, "training.instance_count must be a whole number"),
        ({"spot": "yes"}, "training.spot must be true or false, not 'yes'"),
        ({"max_wait_seconds": -5}, "training.max_wait_seconds must be a whole number of seconds"),
        # SageMaker refuses spot training that may wait less than it may run.
        ({"max_wait_seconds": 600}, "training.max_wait_seconds (600) must be at least the stack's"),
    ],
)
def test_a_bad_training_block_is_refused_naming_the_key(training, message):
    with pytest.raises(DatasetRejected, match=message.replace("(", r"\(").replace(")", r"\)")):
        resources_for(Stack(ROOT), training)


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
    training_resources = training_request(document, resources_for(stack))["ResourceConfig"]
    training, processing = states["TrainingJobEncryption"], states["ProcessingJobEncryption"]
    assert states["StartTrainingJob"]["Parameters"]["OutputDataConfig.$"] == (
        "States.ArrayGetItem($.encryption.output_data_configs, $.config.encryption.output_key_index)"
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
        "training resources": training_resources,
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


def test_the_template_preprocessing_and_local_mode_know_the_same_local_storage_families():
    # Two lists in Python (PreprocessFunction decides the training job's volume key; local mode refuses
    # a volume key on these, as SageMaker does), two in the template's conditions; they must agree.
    from conveyor.local import jobs

    assert jobs.LOCAL_STORAGE_FAMILIES == LOCAL_STORAGE_FAMILIES
    conditions = Stack(ROOT).template["Conditions"]
    for role in ("Processing", "Inference"):
        equals = [
            item["Fn::Equals"]
            for group in conditions[f"{role}HasLocalStorage"]["Fn::Or"]
            for item in group["Fn::Or"]
        ]
        assert all(
            e[1] == {"Fn::Select": [1, {"Fn::Split": [".", {"Ref": f"{role}InstanceType"}]}]} for e in equals
        )
        assert {e[0] for e in equals} == LOCAL_STORAGE_FAMILIES, role
