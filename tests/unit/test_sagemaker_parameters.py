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
