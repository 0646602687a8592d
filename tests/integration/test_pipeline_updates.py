"""Model updates on the local stack, as blue/green with a canary: clients never notice a good update, and a
bad new model is rolled back while the old one keeps serving (issue 6, must-shows 1 and 2)."""

from __future__ import annotations

import json
import random
import shutil
import threading
import time
from pathlib import Path

import pytest
from local_stack import EventInbox, Inbox, aws, signed_post, states_entered

from conveyor import client
from conveyor.local.sourcedir import publish_training_code

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CLOUD_PARAMETERS = {
    "CanaryTrafficPercent": "50",
    "InferenceInstanceCount": "2",
    "DeploymentWaitSeconds": "6",
    "TerminationWaitSeconds": "2",
    "AutoScalingMaxInstances": "4",
    # The other encryption mode (test_pipeline.py runs the default, SSE-KMS): see the last test.
    "EncryptionMode": "SSE-S3",
}


def dataset(n=400, seed=7) -> bytes:
    rng = random.Random(seed)
    lines = ["size,weight,label"]
    for _ in range(n):
        label = rng.choice("ab")
        size = rng.gauss(1.0 if label == "a" else 2.0, 0.4)
        lines.append(f"{size:.3f},{rng.random():.3f},{label}")
    return ("\n".join(lines) + "\n").encode()


INSTANCES = [{"size": 1.0, "weight": 0.5}, {"size": 2.1, "weight": 0.2}]


def upload_and_wait(outputs: dict, name: str, body: bytes) -> dict:
    """Upload a new version of datasets/<name>/data.csv and return its finished execution."""
    s3, sfn = aws(outputs, "s3"), aws(outputs, "stepfunctions")
    machine = outputs["StateMachineArn"]
    before = {e["name"] for e in sfn.list_executions(stateMachineArn=machine)["executions"]}
    s3.put_object(Bucket=outputs["RawBucketName"], Key=f"datasets/{name}/data.csv", Body=body)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for execution in sfn.list_executions(stateMachineArn=machine)["executions"]:
            fresh = execution["name"].startswith(f"{name}-") and execution["name"] not in before
            if fresh and execution["status"] != "RUNNING":
                return sfn.describe_execution(executionArn=execution["executionArn"])
        time.sleep(1)
    raise AssertionError(f"no execution for {name} finished")


class Client(threading.Thread):
    """An app that keeps calling the prediction API, recording what each request got."""

    def __init__(self, outputs: dict, name: str) -> None:
        super().__init__(daemon=True)
        self.outputs, self.path = outputs, f"/models/{name}/predict"
        self.answers: list[tuple[int, str]] = []  # (status, model_version or error text)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                response = signed_post(self.outputs, self.path, {"instances": INSTANCES})
                body = response.json()
                self.answers.append(
                    (response.status_code, body.get("model_version") or json.dumps(body)[:200])
                )
            except Exception as exc:  # a dropped connection is a failed request too
                self.answers.append((0, repr(exc)))
            time.sleep(0.02)

    def stop(self) -> list[tuple[int, str]]:
        self.done.set()
        self.join(timeout=70)
        return self.answers


def test_clients_see_no_failed_request_while_a_new_model_takes_over(cloud):
    outputs = cloud.outputs
    first = upload_and_wait(outputs, "steady", dataset())
    assert json.loads(first["output"])["outcome"] == "deployed", first.get("cause")
    old = json.loads(first["output"])["version"]

    client = Client(outputs, "steady")
    client.start()
    time.sleep(1)
    # The same data again trains the same (seeded) model: as good as the champion, so it deploys.
    second = upload_and_wait(outputs, "steady", dataset())
    time.sleep(1)
    answers = client.stop()

    summary = json.loads(second["output"])
    assert summary["outcome"] == "deployed", second.get("cause")
    new = summary["version"]
    failed = [answer for answer in answers if answer[0] != 200]
    assert failed == [], f"{len(failed)} of {len(answers)} requests failed during the update: {failed[:3]}"
    versions = [version for _, version in answers]
    assert versions[0] == old and versions[-1] == new
    # The canary: for a while both models answered, interleaved, before the new one took everything.
    first_new = versions.index(new)
    assert old in versions[first_new:], "no canary phase: traffic moved in one step"
    assert "UpdateEndpointCanary" in states_entered(aws(outputs, "stepfunctions"), second["executionArn"])

    alarms = aws(outputs, "cloudwatch").describe_alarms(AlarmNamePrefix="conveyor-steady-")["MetricAlarms"]
    assert sorted(a["MetricName"] for a in alarms) == ["Invocation5XXErrors", "ModelLatency"]
    for alarm in alarms:
        dimensions = {d["Name"]: d["Value"] for d in alarm["Dimensions"]}
        assert dimensions == {"EndpointName": "conveyor-steady", "VariantName": "AllTraffic"}
        assert alarm["StateValue"] == "OK"

    # The endpoint scales between InferenceInstanceCount and AutoScalingMaxInstances on invocations.
    scaling = aws(outputs, "application-autoscaling")
    (target,) = scaling.describe_scalable_targets(
        ServiceNamespace="sagemaker", ResourceIds=["endpoint/conveyor-steady/variant/AllTraffic"]
    )["ScalableTargets"]
    assert (target["MinCapacity"], target["MaxCapacity"]) == (2, 4)
    (policy,) = scaling.describe_scaling_policies(
        ServiceNamespace="sagemaker", ResourceId="endpoint/conveyor-steady/variant/AllTraffic"
    )["ScalingPolicies"]
    tracking = policy["TargetTrackingScalingPolicyConfiguration"]
    assert (
        tracking["PredefinedMetricSpecification"]["PredefinedMetricType"]
        == "SageMakerVariantInvocationsPerInstance"
    )
    assert tracking["TargetValue"] == 100


BREAKAGES = {
    # Loads and answers /ping, fails every prediction: only the canary's 5XX alarm can catch it.
    "predictions": "def predict_fn(data, model):\n    raise RuntimeError('this model is broken')\n",
    # Never becomes healthy: the new fleet does not start, so traffic never moves.
    "loading": "def model_fn(model_dir):\n    raise RuntimeError('this model cannot load')\n",
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_broken_new_model_is_rolled_back_and_the_old_one_keeps_serving(cloud, tmp_path, breakage):
    outputs = cloud.outputs
    name = f"broken-{breakage}"
    sagemaker, s3 = aws(outputs, "sagemaker"), aws(outputs, "s3")
    first = upload_and_wait(outputs, name, dataset(seed=3))
    assert json.loads(first["output"])["outcome"] == "deployed", first.get("cause")
    old = json.loads(first["output"])["version"]
    inbox = Inbox(outputs, f"{name}-notifications")

    # The next model's code is broken (training itself is fine: it does not use the serving handlers).
    shutil.copytree(ROOT / "training", tmp_path / "training", ignore=shutil.ignore_patterns("__pycache__"))
    inference = tmp_path / "training" / "inference.py"
    inference.write_text(inference.read_text() + "\n\n" + BREAKAGES[breakage])
    publish_training_code(s3, outputs["ArtifactsBucketName"], tmp_path, hf_wheels=False)
    client = Client(outputs, name)
    client.start()
    try:
        execution = upload_and_wait(outputs, name, dataset(seed=3))
    finally:
        publish_training_code(s3, outputs["ArtifactsBucketName"], ROOT, hf_wheels=False)
        answers = client.stop()

    assert execution["status"] == "FAILED"
    assert execution["error"] == "DeploymentRolledBack"
    assert f"serves {name}-{old} instead of" in execution["cause"]
    if breakage == "predictions":
        assert "alarm conveyor-broken-predictions-5xx-errors went into ALARM" in execution["cause"]
        alarm = aws(outputs, "cloudwatch").describe_alarms(AlarmNames=[f"conveyor-{name}-5xx-errors"])
        assert alarm["MetricAlarms"][0]["StateValue"] == "ALARM"
        assert any(status != 200 for status, _ in answers), "the canary took no traffic"
    else:
        assert "this model cannot load" in execution["cause"]
        assert all(status == 200 for status, _ in answers), "a model that never started took traffic"
    assert (
        sagemaker.describe_endpoint(EndpointName=f"conveyor-{name}")["EndpointConfigName"] == f"{name}-{old}"
    )
    after = signed_post(outputs, f"/models/{name}/predict", {"instances": INSTANCES})
    assert after.status_code == 200 and after.json()["model_version"] == old
    assert answers[-1] == (200, old), "the old model did not take all traffic back"
    notices = [m for m in inbox.messages() if m["outcome"] == "failed"]
    assert notices and notices[0]["error"] == "DeploymentRolledBack"


def test_a_model_that_waits_for_approval_deploys_when_a_person_approves_it(cloud, tmp_path):
    outputs = cloud.outputs
    s3, sfn, sagemaker = (aws(outputs, s) for s in ("s3", "stepfunctions", "sagemaker"))
    s3.put_object(
        Bucket=outputs["RawBucketName"], Key="datasets/careful/conveyor.json", Body=b'{"approval": "manual"}'
    )
    inbox, events = Inbox(outputs, "careful-notifications"), EventInbox(outputs, "careful-events", "careful")

    trained = upload_and_wait(outputs, "careful", dataset(seed=5))
    summary = json.loads(trained["output"])
    assert summary["outcome"] == "pending_approval", trained.get("cause")
    version = summary["version"]
    assert summary["approve_with"] == f"conveyor approve careful --version {version}"
    assert "conveyor-careful" not in [e["EndpointName"] for e in sagemaker.list_endpoints()["Endpoints"]]
    (package,) = sagemaker.list_model_packages(ModelPackageGroupName="conveyor-careful")[
        "ModelPackageSummaryList"
    ]
    assert package["ModelApprovalStatus"] == "PendingManualApproval"
    assert [m["outcome"] for m in inbox.messages()] == ["pending_approval"]
    assert [e["detail-type"] for e in events.events()] == ["Model Awaiting Approval"]

    # A person approves it, as `conveyor approve careful` does: SageMaker's state change event deploys it.
    outputs_file = tmp_path / "outputs.json"
    outputs_file.write_text(json.dumps(outputs))
    target = client.load_target(outputs_file)
    approval = client.approve(target, "careful", version, note="looks right to me")
    assert approval.package_arn == package["ModelPackageArn"]
    deployed = client.follow_execution(target, approval.execution_arn, timeout=300)
    assert deployed["status"] == "SUCCEEDED" and deployed["outcome"] == "deployed", deployed
    assert deployed["version"] == version and deployed["model_package"] == package["ModelPackageArn"]
    assert deployed["reason"].startswith("approved in the Model Registry")
    entered = states_entered(sfn, approval.execution_arn)
    assert "UseApprovedPackage" in entered and "StartTrainingJob" not in entered
    registered = [s for s in entered if s.startswith("Register") and s.endswith("Model")]
    assert not registered, "the approved package is not registered again"
    answer = signed_post(outputs, "/models/careful/predict", {"instances": INSTANCES})
    assert answer.status_code == 200 and answer.json()["model_version"] == version
    (package,) = sagemaker.list_model_packages(ModelPackageGroupName="conveyor-careful")[
        "ModelPackageSummaryList"
    ]
    assert package["ModelApprovalStatus"] == "Approved"
    with pytest.raises(client.ConveyorError, match="no model of 'careful' waits for approval"):
        client.approve(target, "careful")


def test_a_small_model_can_be_served_serverless(cloud):
    outputs = cloud.outputs
    s3, sfn, sagemaker = (aws(outputs, s) for s in ("s3", "stepfunctions", "sagemaker"))
    s3.put_object(
        Bucket=outputs["RawBucketName"], Key="datasets/tiny/conveyor.json", Body=b'{"serving": "serverless"}'
    )
    first = upload_and_wait(outputs, "tiny", dataset(seed=9))
    assert json.loads(first["output"])["outcome"] == "deployed", first.get("cause")
    second = upload_and_wait(outputs, "tiny", dataset(seed=9))
    summary = json.loads(second["output"])
    assert summary["outcome"] == "deployed", second.get("cause")

    config = sagemaker.describe_endpoint_config(EndpointConfigName=f"tiny-{summary['version']}")
    (variant,) = config["ProductionVariants"]
    assert variant["ServerlessConfig"] == {"MemorySizeInMB": 2048, "MaxConcurrency": 5}
    assert "InstanceType" not in variant
    entered = states_entered(sfn, second["executionArn"])
    # Serverless updates shift all at once, and serverless endpoints have no instances to scale.
    assert "UpdateEndpoint" in entered and "UpdateEndpointCanary" not in entered
    assert "RegisterScalableTarget" not in entered
    answer = signed_post(outputs, "/models/tiny/predict", {"instances": INSTANCES})
    assert answer.status_code == 200 and answer.json()["model_version"] == summary["version"]


def test_sse_s3_mode_sends_sagemaker_no_key_and_stores_with_s3_managed_keys(cloud):
    # This module's stack runs with EncryptionMode SSE-S3 (CLOUD_PARAMETERS), after the tests above trained
    # and deployed: no stack key exists, and no SageMaker request names one (an empty KmsKeyId is not "none").
    outputs = cloud.outputs
    s3, sqs, sns, sagemaker, kms = (aws(outputs, s) for s in ("s3", "sqs", "sns", "sagemaker", "kms"))
    assert kms.list_aliases()["Aliases"] == [] or all(
        a["AliasName"] != "alias/conveyor" for a in kms.list_aliases()["Aliases"]
    )
    for bucket in ("RawBucketName", "ProcessedBucketName", "ArtifactsBucketName"):
        (rule,) = s3.get_bucket_encryption(Bucket=outputs[bucket])["ServerSideEncryptionConfiguration"][
            "Rules"
        ]
        assert rule["ApplyServerSideEncryptionByDefault"] == {"SSEAlgorithm": "AES256"}
    for url in (queue.attributes["Ref"] for queue in cloud.stack.of_type("AWS::SQS::Queue")):
        attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        assert "KmsMasterKeyId" not in attributes and attributes["SqsManagedSseEnabled"] == "true"
    assert (
        "KmsMasterKeyId"
        not in sns.get_topic_attributes(TopicArn=outputs["NotificationTopicArn"])["Attributes"]
    )
    jobs = sagemaker.list_training_jobs()["TrainingJobSummaries"]
    assert jobs
    for summary in jobs:
        job = sagemaker.describe_training_job(TrainingJobName=summary["TrainingJobName"])
        assert "KmsKeyId" not in job["OutputDataConfig"] and "VolumeKmsKeyId" not in job["ResourceConfig"]
    configs = sagemaker.list_endpoint_configs()["EndpointConfigs"]
    assert configs
    for summary in configs:
        assert "KmsKeyId" not in sagemaker.describe_endpoint_config(
            EndpointConfigName=summary["EndpointConfigName"]
        )
