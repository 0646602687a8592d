"""Uploads too big for Lambda, end to end on the local stack: with LambdaPreprocessMaxBytes lowered, an upload
is preprocessed by a SageMaker Processing job (a real subprocess running preprocess/processing.py), then
trained, deployed and served; an unusable one ends as a quarantine report and a notification."""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
import time
from pathlib import Path

import pytest
from local_stack import Inbox, aws, signed_post, states_entered, wait_for_execution

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
THRESHOLD = 4096


CLOUD_PARAMETERS = {"LambdaPreprocessMaxBytes": str(THRESHOLD)}


def sensor_rows(n=800, seed=21) -> bytes:
    rng = random.Random(seed)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["temperature", "vibration", "line", "status"])
    for _ in range(n):
        status = rng.choice(["ok", "worn", "broken"])
        base = {"ok": 40, "worn": 55, "broken": 70}[status]
        writer.writerow(
            [
                round(base + rng.gauss(0, 4), 2),
                round(base / 10 + rng.gauss(0, 0.8), 3),
                rng.choice("ab"),
                status,
            ]
        )
    return out.getvalue().encode()


def test_a_big_upload_is_preprocessed_by_a_processing_job_then_trained_and_served(cloud):
    outputs = cloud.outputs
    s3, sfn, sagemaker = (aws(outputs, s) for s in ("s3", "stepfunctions", "sagemaker"))
    body = gzip.compress(sensor_rows())
    assert len(body) > THRESHOLD
    s3.put_object(Bucket=outputs["RawBucketName"], Key="datasets/Sensors/week 1.csv.gz", Body=body)

    execution = wait_for_execution(sfn, outputs["StateMachineArn"], "sensors-")
    assert execution["status"] == "SUCCEEDED", execution.get("cause")
    summary = json.loads(execution["output"])
    assert summary["outcome"] == "deployed", summary
    assert summary["metric"] == "accuracy" and summary["value"] > summary["baseline"]
    entered = states_entered(sfn, execution["executionArn"])
    assert entered.index("StartProcessingJob") < entered.index("StartTrainingJob")

    # The execution was handed the raw upload; the job, not the function, wrote the processed layout.
    execution_input = json.loads(execution["input"])
    job_name = execution_input["preprocessing"]["job_name"]
    assert execution_input["task"] is None and execution_input["target"] is None
    job = sagemaker.describe_processing_job(ProcessingJobName=job_name)
    assert job["ProcessingJobStatus"] == "Completed"
    assert json.loads(job["ExitMessage"])["outcome"] == "processed"
    assert job["Environment"]["PYTHONPATH"] == "/opt/ml/processing/input/code"
    version = summary["version"]
    processed = outputs["ProcessedBucketName"]
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=processed, Prefix=f"sensors/{version}/")["Contents"]}
    assert keys == {
        f"sensors/{version}/{part}"
        for part in (
            "manifest.json",
            "train/part-00000.csv",
            "validation/part-00000.csv",
            "test/part-00000.csv",
        )
    }
    manifest = json.loads(
        s3.get_object(Bucket=processed, Key=f"sensors/{version}/manifest.json")["Body"].read()
    )
    assert manifest["target"] == "status" and manifest["labels"] == ["broken", "ok", "worn"]
    assert manifest["source"]["key"] == "datasets/Sensors/week 1.csv.gz"

    rows = list(csv.DictReader(io.StringIO(gzip.decompress(body).decode())))[:200]
    instances = [{k: v for k, v in r.items() if k != "status"} for r in rows]
    answer = signed_post(outputs, "/models/sensors/predict", {"instances": instances})
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] == version
    predictions = answer.json()["predictions"]
    accuracy = sum(p["label"] == r["status"] for p, r in zip(predictions, rows, strict=True)) / len(rows)
    assert accuracy > 0.6, accuracy


def test_a_big_unusable_upload_is_quarantined_by_the_job_and_nothing_trains(cloud):
    outputs = cloud.outputs
    s3, sfn, sagemaker = (aws(outputs, s) for s in ("s3", "stepfunctions", "sagemaker"))
    inbox = Inbox(outputs, "quarantine-notifications")
    body = b"reading,station,label\n" + b"".join(f"{i},{i % 9},same\n".encode() for i in range(600))
    assert len(body) > THRESHOLD
    key = "datasets/flat/readings.csv"
    s3.put_object(Bucket=outputs["RawBucketName"], Key=key, Body=body)

    execution = wait_for_execution(sfn, outputs["StateMachineArn"], "flat-", timeout=120)
    assert execution["status"] == "SUCCEEDED", execution.get("cause")
    summary = json.loads(execution["output"])
    assert summary["outcome"] == "quarantined"
    version = summary["version"]
    report_uri = f"s3://{outputs['ProcessedBucketName']}/quarantine/flat/{version}/report.json"
    assert summary["report"] == report_uri
    report = json.loads(
        s3.get_object(Bucket=outputs["ProcessedBucketName"], Key=f"quarantine/flat/{version}/report.json")[
            "Body"
        ].read()
    )
    assert report["reason"] == summary["reason"] and report["source"]["key"] == key
    assert "StartTrainingJob" not in states_entered(sfn, execution["executionArn"])
    assert not [
        j for j in sagemaker.list_training_jobs()["TrainingJobSummaries"] if "flat" in j["TrainingJobName"]
    ]
    assert not s3.list_objects_v2(Bucket=outputs["ProcessedBucketName"], Prefix=f"flat/{version}/").get(
        "Contents"
    )
    assert s3.get_object(Bucket=outputs["RawBucketName"], Key=key)["Body"].read() == body

    notes = inbox.messages()
    assert {"outcome": "quarantined", "report": report_uri}.items() <= notes[-1].items()


def test_a_failing_job_fails_the_execution_with_the_jobs_reason(cloud):
    from common.config import Settings
    from preprocess.app import processing_execution_input
    from preprocess.core import DatasetSpec

    outputs = cloud.outputs
    s3, sfn = aws(outputs, "s3"), aws(outputs, "stepfunctions")
    key = "staging/changing/data.csv"  # outside datasets/: no event, this test starts the execution itself
    put = s3.put_object(Bucket=outputs["RawBucketName"], Key=key, Body=sensor_rows(n=300))
    # This execution is for a version of 10 bytes: the key holds another one now.
    provenance = {
        "dataset": "changing",
        "version": "20261122T175500Z-abcdef",
        "source": {
            "bucket": outputs["RawBucketName"],
            "key": key,
            "version_id": put["VersionId"],
            "size": 10,
        },
    }
    settings = Settings(
        processed_bucket=outputs["ProcessedBucketName"], artifacts_bucket=outputs["ArtifactsBucketName"]
    )
    execution_input = processing_execution_input(DatasetSpec(), provenance, settings)
    document = execution_input["preprocessing"]["job_document"].removeprefix("s3://").split("/", 1)
    s3.put_object(Bucket=document[0], Key=document[1], Body=json.dumps({**provenance, "spec": {}}).encode())
    sfn.start_execution(
        stateMachineArn=outputs["StateMachineArn"], name="manual-changing", input=json.dumps(execution_input)
    )
    execution = wait_for_execution(sfn, outputs["StateMachineArn"], "manual-changing", timeout=120)
    assert execution["status"] == "FAILED"
    assert execution["error"] == "ProcessingJobFailed"
    assert "overwritten" in execution["cause"]
    assert "StartTrainingJob" not in states_entered(sfn, execution["executionArn"])


def test_the_processing_adapter_behaves_like_sagemaker(cloud, tmp_path):
    """Names are unique, a failing container fails the job with its message, a stop stops it."""
    outputs = cloud.outputs
    sagemaker = aws(outputs, "sagemaker")
    role = "arn:aws:iam::123456789012:role/conveyor-SageMakerExecutionRole"

    def create(name: str, code: str) -> None:
        sagemaker.create_processing_job(
            ProcessingJobName=name,
            RoleArn=role,
            AppSpecification={"ImageUri": "python:3.11", "ContainerEntrypoint": ["python3", "-c", code]},
            ProcessingResources={
                "ClusterConfig": {"InstanceCount": 1, "InstanceType": "ml.m5.large", "VolumeSizeInGB": 1}
            },
            Environment={"MESSAGE": "/opt/ml/output/message"},
        )

    def wait(name: str) -> dict:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            job = sagemaker.describe_processing_job(ProcessingJobName=name)
            if job["ProcessingJobStatus"] not in ("InProgress", "Stopping"):
                return job
            time.sleep(0.2)
        raise AssertionError(f"{name} did not finish")

    create("adapter-fails", "import os, sys; open(os.environ['MESSAGE'], 'w').write('no rows'); sys.exit(3)")
    failed = wait("adapter-fails")
    assert failed["ProcessingJobStatus"] == "Failed"
    assert failed["ExitMessage"] == "no rows" and "no rows" in failed["FailureReason"]
    with pytest.raises(sagemaker.exceptions.ResourceInUse):
        create("adapter-fails", "pass")

    create("adapter-sleeps", "import time; time.sleep(60)")
    time.sleep(0.5)
    sagemaker.stop_processing_job(ProcessingJobName="adapter-sleeps")
    stopped = wait("adapter-sleeps")
    assert stopped["ProcessingJobStatus"] == "Stopped"
